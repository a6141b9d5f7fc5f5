"""Bytes of the tensors autograd keeps for the backward pass, counted while a forward runs.

Why: activation memory is what a plan cannot read off the parameter count. Every tensor an operation
saves for backward goes through ``torch.autograd.graph.saved_tensors_hooks``; counting each storage once
(views of one tensor and one tensor saved by several operations share it) gives the activation bytes
of a forward, on real tensors or on the meta device (shapes only, no memory, so a 7B model is cheap).
Parameters are left out: they are counted as parameters (under FSDP2 the unsharded copy a layer saves
is freed after its forward and gathered again for its backward).

On the meta device ``torch.nn.functional.scaled_dot_product_attention`` takes the math path, which keeps
the T x T attention matrix that no GPU kernel keeps; ``flash_attention_on_meta`` swaps in the fused
kernel's memory behaviour (query, key, value, output and a log-sum-exp per row), which is what the
CPU kernel keeps too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class SavedTensorBytes(contextlib.AbstractContextManager):
    """``with SavedTensorBytes(exclude=model.parameters()) as saved: loss = f(x)``; then ``saved.bytes``."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {id(t.untyped_storage()) for t in exclude}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if id(storage) not in self._excluded:
            self._storages.setdefault(id(storage), storage)  # kept alive, so ids stay unique
        return tensor

    @property
    def bytes(self) -> int:
        return sum(s.nbytes() for s in self._storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal or attn_mask is not None, scale=scale)
    return out


@contextlib.contextmanager
def flash_attention_on_meta() -> Iterator[None]:
    """Within the block, ``scaled_dot_product_attention`` keeps what a fused kernel keeps (meta device)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
