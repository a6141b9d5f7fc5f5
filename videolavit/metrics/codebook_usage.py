"""Codebook usage and perplexity over a whole evaluation epoch (a code histogram summed over ranks).

Per-batch usage under-counts a large codebook; the epoch histogram tells how many codes the
tokenizer really uses and how evenly (perplexity = exp(entropy of code frequencies)).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    full_state_update = False

    def __init__(self, num_codes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_codes = num_codes
        self.add_state("counts", default=torch.zeros(num_codes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ids: torch.Tensor) -> None:
        ids = ids[ids >= 0].flatten()  # -1 marks padding in variable-length token sets
        self.counts += torch.bincount(ids, minlength=self.num_codes).to(self.counts)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.counts.sum().clamp_min(1)
        probs = self.counts / total
        nonzero = probs[probs > 0]
        return {"usage": (self.counts > 0).double().mean(), "perplexity": torch.exp(-(nonzero * nonzero.log()).sum())}
