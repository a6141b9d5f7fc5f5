"""The peak bytes a training step allocates, measured on fake tensors (shapes and dtypes, no memory).

Why: the stage-1 networks are too large to run on the planning machine, and what a GPU needs is the peak
of live tensors during forward and backward, not a sum of layer sizes. ``PeakMemory`` is a dispatch mode
that sees every operation's outputs, counts each new storage once (views share one) and subtracts it when
the last tensor on it dies, as a caching allocator's ``max_memory_allocated`` would (without its rounding
and fragmentation). Run under ``FakeTensorMode`` on the CPU, ``torch.autocast("cpu", bfloat16)`` casts as
on a GPU, activation checkpointing frees and recomputes as it does there, and autograd's saved tensors
live until backward frees them.

Operations whose output shape or value depends on the data (``bincount``, ``nonzero``, ``.item()``) get
the planning stand-ins below: the largest output shape (every element kept) and a value of one; a
stage's forward then takes the branch those values lead to. ``standins_used`` names the operations that
were stood in for, so a plan can say so.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


def _standin(func, args, kwargs):
    """An output of the largest shape for a data-dependent operation, or None for any other one."""
    packet = func.overloadpacket
    if packet is aten._local_scalar_dense:
        dtype = args[0].dtype
        return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
    if packet is aten.bincount:
        values = args[0]
        minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
        weights = kwargs.get("weights", args[1] if len(args) > 1 else None)
        dtype = weights.dtype if weights is not None else torch.long
        return torch.zeros(max(int(minlength), 1), dtype=dtype, device=values.device)
    if packet is aten.nonzero:
        values = args[0]
        return torch.zeros(values.numel(), values.dim(), dtype=torch.long, device=values.device)
    if packet is aten.masked_select:
        values, mask = args[0], args[1]
        return torch.zeros(torch.broadcast_shapes(values.shape, mask.shape).numel(), dtype=values.dtype,
                           device=values.device)
    if packet in (aten._unique2, aten.unique_dim, aten.unique_consecutive):
        values = args[0]
        flat = torch.zeros(values.numel(), dtype=values.dtype, device=values.device)
        counts = torch.ones(values.numel(), dtype=torch.long, device=values.device)
        inverse = torch.zeros(values.shape, dtype=torch.long, device=values.device)
        return flat, inverse, counts
    if packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
        indices = []
        for index in args[1]:
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:  # every element kept
                indices += [torch.zeros(index.numel(), dtype=torch.long, device=index.device)] * index.dim()
            else:
                indices.append(index)
        return func(args[0], indices, *args[2:], **kwargs)
    return None


class PeakMemory(TorchDispatchMode):
    """``with FakeTensorMode(), PeakMemory() as peak: step()``; then ``peak.peak_bytes`` (above what was
    live before) and ``peak.live_bytes`` (still live from the block, e.g. gradients)."""

    def __init__(self):
        super().__init__()
        self._tracked: set[int] = set()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.standins_used: Counter[str] = Counter()

    def _free(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= size

    def _track(self, outputs, inputs) -> None:
        known = {id(t.untyped_storage()) for t in inputs if isinstance(t, torch.Tensor)}
        for tensor in outputs:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in known or key in self._tracked:
                continue  # a view or an in-place result: no new memory
            size = storage.nbytes()
            self._tracked.add(key)
            self.live_bytes += size
            weakref.finalize(storage, self._free, key, size)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _standin(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        else:
            self.standins_used[str(func.overloadpacket)] += 1
        self._track(tree_leaves(out), tree_leaves((args, kwargs)))
        return out


def _fake_attributes(owner, mode: FakeTensorMode, device: str) -> None:
    for name, value in list(vars(owner).items()):
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and (
                value.is_meta or not isinstance(value, FakeTensor)):
            with mode:
                setattr(owner, name, torch.zeros(value.shape, dtype=value.dtype, device=device))


def fake_module(module: torch.nn.Module, mode: FakeTensorMode, device: str = "cpu") -> torch.nn.Module:
    """Replace every parameter and buffer of ``module`` (e.g. built on the meta device) in place by a fake
    tensor of its shape, dtype and ``requires_grad`` on ``device``."""
    for child in module.modules():
        for name, param in list(child._parameters.items()):
            if param is not None:
                with mode:
                    fake = torch.empty(param.shape, dtype=param.dtype, device=device)
                child._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(child._buffers.items()):
            if buffer is not None:
                with mode:
                    child._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
        _fake_attributes(child, mode, device)
        for value in vars(child).values():  # helper objects holding tensors (e.g. a noise schedule)
            if not isinstance(value, (torch.nn.Module, torch.Tensor, type)) and hasattr(value, "__dict__"):
                _fake_attributes(value, mode, device)
    return module
