"""Classifier-free guidance for the detokenizers.

A guidance rule combines the unconditional and conditional denoiser outputs; ``GuidedDenoiser``
turns a denoiser plus (cond, uncond) into a plain ``denoise(x, σ)`` for the samplers, running both
branches as one batched forward over [uncond, cond] (the release's order).

Guiding D rather than the raw network output is the same thing: D = c_skip·x + c_out·F is affine in
F with the same x and σ in both branches, so D_u + s·(D_c − D_u) = c_skip·x + c_out·(F_u + s·(F_c − F_u)).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from videolavit.diffusion.denoiser import sigma_per_sample


class ConstantGuidance:
    """d_u + s·(d_c − d_u) with one scale for every frame."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, d_uncond: torch.Tensor, d_cond: torch.Tensor) -> torch.Tensor:
        return d_uncond + self.scale * (d_cond - d_uncond)


class LinearFrameGuidance:
    """Per-frame scale ramp linspace(min_scale, max_scale, T): weak guidance near the keyframe.

    Release (and SVD) values are 1.0 -> 4.0 over the clip's T frames: frame 0, which should repeat the
    keyframe, is purely conditional; later frames, further from it, are guided harder.
    Inputs are [B, T, ...]; T is read from them.
    """

    def __init__(self, min_scale: float = 1.0, max_scale: float = 4.0):
        self.min_scale = float(min_scale)
        self.max_scale = float(max_scale)

    def scales(self, num_frames: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[T]"""
        return torch.linspace(self.min_scale, self.max_scale, num_frames, device=device, dtype=dtype)

    def __call__(self, d_uncond: torch.Tensor, d_cond: torch.Tensor) -> torch.Tensor:
        if d_cond.ndim < 3:
            raise ValueError(f"per-frame guidance needs [B, T, ...] inputs, got shape {tuple(d_cond.shape)}")
        scale = self.scales(d_cond.shape[1], d_cond.device, d_cond.dtype)
        scale = scale.reshape((1, -1) + (1,) * (d_cond.ndim - 2))  # [1, T, 1, ...]
        return d_uncond + scale * (d_cond - d_uncond)


def unconditional(cond: dict, zero_keys: Iterable[str]) -> dict:
    """The uncond dict: ``cond`` with the tensors under ``zero_keys`` replaced by zeros.

    The release zeroes the keyframe latents, the motion field and the motion context and keeps the
    added time ids; which keys those are is the caller's naming.
    """
    zero_keys = set(zero_keys)
    missing = zero_keys - cond.keys()
    if missing:
        raise KeyError(f"keys to zero are not in cond: {sorted(missing)}")
    return {k: torch.zeros_like(v) if k in zero_keys else v for k, v in cond.items()}


def _batch_pair(uncond: dict, cond: dict) -> dict:
    if uncond.keys() != cond.keys():
        raise KeyError(f"cond and uncond differ in keys: {sorted(cond.keys() ^ uncond.keys())}")
    out = {}
    for k, c in cond.items():
        u = uncond[k]
        if isinstance(c, torch.Tensor):
            out[k] = torch.cat([u, c], dim=0)
        elif c is u or c == u:
            out[k] = c
        else:
            raise ValueError(f"non-tensor conditioning {k!r} differs between cond and uncond")
    return out


class GuidedDenoiser:
    """denoise(x, σ) = guidance(D(x, σ, **uncond), D(x, σ, **cond)), one forward of batch 2B."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], guidance: Callable, cond: dict, uncond: dict):
        self.denoiser = denoiser
        self.guidance = guidance
        self.pair = _batch_pair(uncond, cond)

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        sigma = sigma_per_sample(sigma, x)
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **self.pair)
        d_uncond, d_cond = out.chunk(2)
        return self.guidance(d_uncond, d_cond)
