"""Training objective of the LaVIT keyframe tokenizer (paper §3.1).

The tokenizer is trained to keep the *semantics* of the frozen ViT: the decoder reconstructs every
patch feature from the codes and is scored by cosine similarity. A ratio regulariser holds the share of
kept patches near a target (otherwise keeping everything is always best for reconstruction), and the
quantizer's commitment term (``KeyframeEncoding.commitment_loss``, weighted by the tokenizer's
``commitment_beta``) pulls the latents onto their codes while the codebook itself follows by EMA.
With the default :class:`KeyframeTokenizerLossConfig` that is the whole objective (the paper's).

Where one object covers a patch or two of a plain background (the tiny moving-shapes corpus) the paper's
objective is met by reconstructing the background: the selector keeps the object's patch no more often than
any other, and training turns the object's code into a background code. Three optional terms (off by default,
listed in :class:`KeyframeTokenizerLossConfig`) address that; which of them helped on the tiny corpus is in
docs/measurements.md. Each term is reported under its own name in the dict :func:`keyframe_tokenizer_loss`
returns; ``reconstruction`` is always the paper's unweighted term so runs stay comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from videolavit.models.keyframe_tokenizer import KeyframeEncoding

PATCH_WEIGHTINGS = ("none", "deviation")


@dataclass
class KeyframeTokenizerLossConfig:
    """Weights of the objective's terms; the defaults are the paper's objective.

    ``target_keep_ratio`` 1/3 keeps ~85 of 256 patches (what the release keeps: docs/measurements.md).
    ``patch_weighting`` ``"none"`` (paper: the mean of 1 - cos over patches) or ``"deviation"``;
    ``deviation_power`` sharpens (> 1) or flattens (< 1) those weights. ``selector_weight``,
    ``similarity_weight``: 0 = off. ``similarity_max_tokens`` caps the kept tokens (a random subset) that enter
    the pairwise similarity term, whose cost grows with their square.

    The options for small objects on plain backgrounds (why: the module docstring):

    * ``patch_weighting="deviation"``: each patch's 1 - cos is weighted by how far its ViT feature lies from
      its image's mean feature (weights mean 1 per image, no gradient), so the patches that make an image
      differ from a plain one dominate the reconstruction.
    * ``selector_weight``: negative log-likelihood of the selector keeping the ``ceil(target_keep_ratio * N)``
      patches of each image that deviate most from its mean feature and dropping the others, i.e. a prior
      that the distinctive patches are the ones worth a token.
    * ``similarity_weight``: the kept tokens' latents must keep the ViT's geometry: over all pairs of kept
      tokens in the batch, the squared gap between the cosine of their latents and the cosine of their own
      patches' ViT features (centred on the batch mean). The quantizer's codes then cluster what the ViT tells
      apart (an object's colour) instead of whatever helps the decoder most.
    """

    target_keep_ratio: float = 1.0 / 3.0
    keep_ratio_weight: float = 1.0
    patch_weighting: str = "none"
    deviation_power: float = 1.0
    selector_weight: float = 0.0
    similarity_weight: float = 0.0
    similarity_max_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.patch_weighting not in PATCH_WEIGHTINGS:
            raise ValueError(f"patch_weighting must be one of {PATCH_WEIGHTINGS}, got {self.patch_weighting!r}")
        if not 0.0 < self.target_keep_ratio <= 1.0:
            raise ValueError(f"target_keep_ratio must be in (0, 1], got {self.target_keep_ratio}")
        for name in ("keep_ratio_weight", "deviation_power", "selector_weight", "similarity_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.similarity_max_tokens < 2:
            raise ValueError(f"similarity_max_tokens must be >= 2, got {self.similarity_max_tokens}")


def feature_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target); [..., C] inputs, computed in fp32.

    ``weights`` [...] (optional, >= 0) makes it the weighted mean sum(w (1 - cos)) / sum(w).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    distance = 1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)
    if weights is None:
        return distance.mean()
    if weights.shape != distance.shape:
        raise ValueError(f"weights {tuple(weights.shape)} do not match the tokens {tuple(distance.shape)}")
    weights = weights.float()
    return (weights * distance).sum() / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)


def patch_deviation(features: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B, N]: distance of each patch's feature from its image's mean feature (fp32, no grad)."""
    features = features.detach().float()
    return (features - features.mean(dim=1, keepdim=True)).norm(dim=-1)


def deviation_weights(features: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """[B, N, C] -> [B, N] patch weights proportional to deviation**power, mean 1 in every image.

    An image whose patches are all alike gets uniform weights.
    """
    score = patch_deviation(features).pow(power)
    # A floor relative to the image's largest score: no patch weighs exactly 0, and all-equal stays uniform.
    score = score + 1e-6 * score.amax(dim=1, keepdim=True) + torch.finfo(torch.float32).tiny
    return score / score.mean(dim=1, keepdim=True)


def keep_ratio_loss(keep: torch.Tensor, target_ratio: float) -> torch.Tensor:
    """(share of kept patches - target)^2 per image, averaged over the batch; keep [B, N] in {0, 1}."""
    return (keep.float().mean(dim=1) - target_ratio).pow(2).mean()


def selector_deviation_loss(keep_log_probs: torch.Tensor, features: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean NLL of keeping the ceil(ratio N) most deviant patches of each image and dropping the rest.

    ``keep_log_probs`` [B, N, 2] (index 0 = keep, the tokenizer's convention), ``features`` [B, N, C].
    """
    n = features.shape[1]
    top = min(n, max(1, math.ceil(ratio * n - 1e-9)))
    order = patch_deviation(features).argsort(dim=1, descending=True)
    wanted = torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter(1, order[:, :top], True)
    chosen = torch.where(wanted, keep_log_probs[..., 0], keep_log_probs[..., 1])
    return -chosen.float().mean()


def similarity_preservation_loss(encoding: KeyframeEncoding, max_tokens: int | None = None) -> torch.Tensor:
    """Mean over pairs of kept tokens of (cos(latent_i, latent_j) - cos(f_i, f_j))^2, with f a token's own
    patch's ViT feature centred on the mean over all patches of the batch (the component every patch
    shares says nothing about what tells them apart).

    ``max_tokens``: above that many kept tokens a random subset of them is used.
    """
    features = encoding.vit_features.detach().float()  # [B, N, C]
    features = features - features.flatten(0, 1).mean(dim=0)
    index = encoding.positions.clamp(min=0)[..., None].expand(-1, -1, features.shape[-1])
    own = F.normalize(torch.gather(features, 1, index)[encoding.mask], dim=-1)  # [M, C]
    latents = F.normalize(encoding.latents[encoding.mask].float(), dim=-1)  # [M, D]
    if max_tokens is not None and latents.shape[0] > max_tokens:
        subset = torch.randperm(latents.shape[0], device=latents.device)[:max_tokens]
        own, latents = own[subset], latents[subset]
    return (latents @ latents.t() - own @ own.t()).pow(2).mean()


def keyframe_tokenizer_loss(
    reconstruction: torch.Tensor, encoding: KeyframeEncoding, config: KeyframeTokenizerLossConfig
) -> dict[str, torch.Tensor]:
    """All terms and their weighted sum (``loss``); ``reconstruction`` is the decoder's [B, N, C] output.

    Always: ``reconstruction`` (the paper's unweighted term), ``keep_ratio``, ``commitment``, ``loss``.
    When switched on: ``weighted_reconstruction`` (replaces ``reconstruction`` in the sum),
    ``selector_deviation`` and ``similarity`` (unweighted values; the sum applies the config's weights).
    """
    target = encoding.vit_features
    terms = {
        "reconstruction": feature_reconstruction_loss(reconstruction, target),
        "keep_ratio": keep_ratio_loss(encoding.keep, config.target_keep_ratio),
        "commitment": encoding.commitment_loss,
    }
    fit = terms["reconstruction"]
    if config.patch_weighting == "deviation":
        weights = deviation_weights(target, config.deviation_power)
        fit = terms["weighted_reconstruction"] = feature_reconstruction_loss(reconstruction, target, weights)
    loss = fit + config.keep_ratio_weight * terms["keep_ratio"] + terms["commitment"]
    if config.selector_weight > 0:
        terms["selector_deviation"] = selector_deviation_loss(encoding.keep_log_probs, target,
                                                              config.target_keep_ratio)
        loss = loss + config.selector_weight * terms["selector_deviation"]
    if config.similarity_weight > 0:
        terms["similarity"] = similarity_preservation_loss(encoding, config.similarity_max_tokens)
        loss = loss + config.similarity_weight * terms["similarity"]
    terms["loss"] = loss
    return terms
