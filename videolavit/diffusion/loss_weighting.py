"""Per-σ loss weights λ(σ) for the denoising loss λ(σ)·‖D(x0 + σn, σ) − x0‖².

EDM's rule is λ(σ) = 1/c_out(σ)²: then λ·‖D − x0‖² = ‖F − F_target‖², i.e. every noise level
trains the raw network on a unit-weight target. Each weighting below is that rule for the scaling
of the same name, so pick them in pairs (``weighting_for`` does it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from videolavit.diffusion.denoiser_scaling import (
    DenoiserScaling,
    DiscreteTimeScaling,
    EDMScaling,
    EpsScaling,
    VScaling,
    VScalingWithEDMcNoise,
)


class LossWeighting(ABC):
    """σ [B] -> λ(σ) [B]."""

    @abstractmethod
    def __call__(self, sigma: torch.Tensor) -> torch.Tensor: ...


class UnitWeighting(LossWeighting):
    """λ = 1: plain x0-MSE (over-weights high σ for EDM-scaled networks; for ablations)."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)


class EDMWeighting(LossWeighting):
    """λ = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out² of ``EDMScaling(sigma_data)``."""

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VWeighting(EDMWeighting):
    """λ = (σ² + 1)/σ² = 1/c_out² of the v-scalings (EDM weighting with σ_d = 1)."""

    def __init__(self):
        super().__init__(sigma_data=1.0)


class EpsWeighting(LossWeighting):
    """λ = 1/σ² = 1/c_out² of ``EpsScaling``: the classic ε-MSE."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma**-2.0


def weighting_for(scaling: DenoiserScaling) -> LossWeighting:
    """The weighting that makes λ·c_out² = 1 for ``scaling``."""
    if isinstance(scaling, DiscreteTimeScaling):
        return weighting_for(scaling.base)
    if isinstance(scaling, EDMScaling):
        return EDMWeighting(scaling.sigma_data)
    if isinstance(scaling, (VScalingWithEDMcNoise, VScaling)):
        return VWeighting()
    if isinstance(scaling, EpsScaling):
        return EpsWeighting()
    raise TypeError(f"no matching loss weighting known for {type(scaling).__name__}; pass one explicitly")
