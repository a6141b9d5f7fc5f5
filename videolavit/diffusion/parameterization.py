"""A detokenizer's diffusion by name: the denoiser scaling, its matched loss weighting and the training σ sampler.

Both detokenizers name their diffusion with the same words, and this is the one place the words become objects,
so the three parts always match (λ = 1/c_out² of the scaling; discrete-time scalings on their DDPM schedule):

* ``eps_discrete`` / ``v_discrete``: ε- / v-prediction of a discrete-time network (SDXL) conditioned on the
  nearest DDPM timestep index, trained at uniformly drawn timesteps (needs the schedule's ᾱ);
* ``edm``: EDM's preconditioning with ``sigma_data``, log-normal training noise;
* ``v_edm``: v-prediction with EDM's log-σ noise conditioning (SVD's), log-normal training noise.

Names of earlier versions (``RENAMED_SCALINGS``: the video detokenizer's ``"v"``) still work with a
``DeprecatedScalingWarning``, so existing exports and configs load unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from videolavit.diffusion.denoiser_scaling import (
    DenoiserScaling,
    DiscreteTimeScaling,
    EDMScaling,
    EpsScaling,
    VScaling,
    VScalingWithEDMcNoise,
)
from videolavit.diffusion.loss_weighting import LossWeighting, weighting_for
from videolavit.diffusion.sigma_sampling import DiscreteSigmaSampler, LogNormalSigmaSampler, SigmaSampler

SCALINGS = ("eps_discrete", "v_discrete", "edm", "v_edm")
DISCRETE_SCALINGS = ("eps_discrete", "v_discrete")
RENAMED_SCALINGS = {"v": "v_edm"}  # old name -> the name it has now
TRAIN_SIGMAS = ("discrete", "log_normal")


class DeprecatedScalingWarning(FutureWarning):
    """A config or export names a scaling by a name of an earlier version (shown to users by default)."""


def scaling_name(name: str, allowed: Sequence[str] = SCALINGS, field: str = "scaling") -> str:
    """``name`` as it is called now (an old name mapped, with a warning); ValueError naming ``field`` if it is not
    one of ``allowed``."""
    if name in RENAMED_SCALINGS:
        new = RENAMED_SCALINGS[name]
        warnings.warn(f"{field} {name!r} is deprecated, it is called {new!r} now (same diffusion); set {field}: "
                      f"{new} in the config (exports written with {name!r} keep loading)",
                      DeprecatedScalingWarning, stacklevel=3)
        name = new
    if name not in allowed:
        raise ValueError(f"{field} must be one of {tuple(allowed)}, got {name!r}")
    return name


def is_discrete(name: str) -> bool:
    """Whether the scaling conditions on DDPM timestep indices (and so needs a DDPM schedule)."""
    return name in DISCRETE_SCALINGS


@dataclass(frozen=True)
class DiffusionParameterization:
    """The matched parts ``DiffusionLoss`` and ``Denoiser`` are built from."""

    scaling: DenoiserScaling
    loss_weighting: LossWeighting
    sigma_sampler: SigmaSampler


def build_parameterization(name: str, *, sigma_data: float = 0.5, alphas_cumprod: torch.Tensor | None = None,
                           train_sigmas: str | None = None, p_mean: float = 1.0,
                           p_std: float = 1.2) -> DiffusionParameterization:
    """The parts of scaling ``name`` (module docstring).

    ``sigma_data``: ``edm`` only. ``alphas_cumprod``: ᾱ_t of the DDPM schedule, needed by the discrete scalings.
    ``train_sigmas``: ``"discrete"`` (uniform timesteps, discrete scalings only) | ``"log_normal"``
    (log σ ~ N(p_mean, p_std²)) | None (discrete for the discrete scalings, log-normal otherwise).
    """
    name = scaling_name(name)
    discrete = is_discrete(name)
    if discrete and alphas_cumprod is None:
        raise ValueError(f"scaling {name!r} runs on a DDPM schedule: pass its alphas_cumprod")
    train_sigmas = train_sigmas or ("discrete" if discrete else "log_normal")
    if train_sigmas not in TRAIN_SIGMAS:
        raise ValueError(f"train_sigmas must be one of {TRAIN_SIGMAS} or None, got {train_sigmas!r}")
    if train_sigmas == "discrete" and not discrete:
        raise ValueError(f"train_sigmas 'discrete' needs a discrete scaling, not {name!r}")
    if name == "edm":
        scaling: DenoiserScaling = EDMScaling(sigma_data)
    elif name == "v_edm":
        scaling = VScalingWithEDMcNoise()
    else:
        scaling = DiscreteTimeScaling(EpsScaling() if name == "eps_discrete" else VScaling(), alphas_cumprod)
    sampler: SigmaSampler = (DiscreteSigmaSampler(alphas_cumprod) if train_sigmas == "discrete"
                             else LogNormalSigmaSampler(p_mean, p_std))
    return DiffusionParameterization(scaling, weighting_for(scaling), sampler)
