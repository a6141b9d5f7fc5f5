"""Training objective of the LaVIT keyframe tokenizer (paper §3.1).

The tokenizer is trained to keep the *semantics* of the frozen ViT: the decoder reconstructs every
patch feature from the codes and is scored by cosine similarity. A ratio regulariser holds the share of
kept patches near a target (otherwise keeping everything is always best for reconstruction), and the
quantizer's commitment term (``KeyframeEncoding.commitment_loss``, weighted by the tokenizer's
``commitment_beta``) pulls the latents onto their codes while the codebook itself follows by EMA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from videolavit.models.keyframe_tokenizer import KeyframeEncoding


@dataclass
class KeyframeTokenizerLossConfig:
    """Selector regulariser. ``target_keep_ratio`` 1/3 keeps ~85 of 256 patches (release: ~90 on average)."""

    target_keep_ratio: float = 1.0 / 3.0
    keep_ratio_weight: float = 1.0


def feature_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target); [..., C] inputs, computed in fp32."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def keep_ratio_loss(keep: torch.Tensor, target_ratio: float) -> torch.Tensor:
    """(share of kept patches - target)^2 per image, averaged over the batch; keep [B, N] in {0, 1}."""
    return (keep.float().mean(dim=1) - target_ratio).pow(2).mean()


def keyframe_tokenizer_loss(
    reconstruction: torch.Tensor, encoding: KeyframeEncoding, config: KeyframeTokenizerLossConfig
) -> dict[str, torch.Tensor]:
    """All terms and their weighted sum (``loss``); ``reconstruction`` is the decoder's [B, N, C] output."""
    terms = {
        "reconstruction": feature_reconstruction_loss(reconstruction, encoding.vit_features),
        "keep_ratio": keep_ratio_loss(encoding.keep, config.target_keep_ratio),
        "commitment": encoding.commitment_loss,
    }
    terms["loss"] = terms["reconstruction"] + config.keep_ratio_weight * terms["keep_ratio"] + terms["commitment"]
    return terms
