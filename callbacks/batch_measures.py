"""Batch measures for Lightning's ``ThroughputMonitor`` (samples/s, tokens/s, and MFU when the stage
sets ``flops_per_batch``), referenced from YAML as ``batch_size_fn: callbacks.batch_measures.samples``.
"""

from __future__ import annotations

import torch


def samples(batch: dict) -> int:
    """Examples in a dict batch: the leading size of its first tensor."""
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError(f"no tensor in batch with keys {sorted(batch)}")


def tokens(batch: dict) -> int:
    """Tokens that carry a training target in an LLM batch (labels != -100)."""
    if "labels" in batch:
        return int((batch["labels"] != -100).sum())
    return int(batch["input_ids"].numel())
