"""A latent space with a VAE's channel count and stride but no weights, for planning only.

Why: the detokenizer stages open their VAE directory at construction; ``plan`` builds those stages on
the meta device to count their trainable parameters on a machine where that directory is absent. The
frozen VAE's own weights are then not counted (the plan says so).
"""

from __future__ import annotations

import torch

from videolavit.models.latent_space import LatentSpace


class ShapeOnlyLatentSpace(LatentSpace):
    """``channels`` latent channels at 1/``downsample`` resolution; encoding is not available."""

    def __init__(self, channels: int = 4, downsample: int = 8, **_ignored):
        super().__init__()
        self.channels, self.downsample = int(channels), int(downsample)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("ShapeOnlyLatentSpace exists for planning; it has no VAE")

    def decode(self, latents: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        raise NotImplementedError("ShapeOnlyLatentSpace exists for planning; it has no VAE")
