"""Training-time noise levels: which σ each sample of a batch is trained at."""

from __future__ import annotations

import torch


class LogNormalSigmaSampler:
    """log σ ~ N(p_mean, p_std²), one σ per sample.

    Defaults are the Video-LaVIT paper's (log σ ~ N(1.0, 1.2²)); EDM uses (−1.2, 1.2) for images
    and SVD (0.7, 1.6) — both are just other ``p_mean``/``p_std`` values.
    """

    def __init__(self, p_mean: float = 1.0, p_std: float = 1.2):
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """σ [batch_size], float32."""
        log_sigma = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
        return (self.p_mean + self.p_std * log_sigma).exp()
