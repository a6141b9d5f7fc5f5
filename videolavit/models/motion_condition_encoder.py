"""Motion-condition encoder: the video U-Net's cross-attention context from the motion field (docs/design.md §7).

The same space-time transformer blocks as the motion tokenizer but without down-sampling, so every
macroblock of every frame yields one context token: [b, 2, 24, 16, 16] -> [b, 24, 256, 1024], used
per frame by the spatial and temporal cross-attention layers. The release adds no temporal position
embedding here (its layout has only ``pos_embed``): frame order reaches the U-Net through its own
temporal layers. ``temporal_pos_embed=True`` adds one (``temp_pos``) for experiments.

Initialisation: std 0.02 / zero bias (the release lineage) except ``in_proj`` (2 -> dim), which gets
fan-in init: motion fields are sparse and 2-channel, and with std 0.02 their tokens drown under the
position embedding, so every clip starts with nearly the same context (``init_token_embedding``).
Release checkpoints overwrite all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .spatiotemporal_transformer import SpatioTemporalBlock, init_token_embedding, init_transformer_weights


@dataclass
class MotionConditionEncoderConfig:
    """Every size of the encoder; defaults are the release model."""

    in_channels: int = 2
    num_frames: int = 24
    height: int = 16
    width: int = 16
    dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    out_dim: int = 1024  # the U-Net's cross-attention dimension
    temporal_pos_embed: bool = False


class MotionConditionEncoder(nn.Module):
    def __init__(self, config: MotionConditionEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or MotionConditionEncoderConfig()
        self.blocks = nn.ModuleList(
            SpatioTemporalBlock(config.dim, config.num_heads, config.mlp_ratio, config.norm_eps)
            for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.in_proj = nn.Linear(config.in_channels, config.dim)
        self.out_proj = nn.Linear(config.dim, config.out_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.height * config.width, config.dim))
        if config.temporal_pos_embed:
            self.temp_pos = nn.Parameter(torch.zeros(1, config.num_frames, config.dim))
        else:
            self.register_parameter("temp_pos", None)
        self.apply(init_transformer_weights)
        init_token_embedding(self.in_proj)  # std 0.02 leaves the content below the position embedding
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.temp_pos is not None:
            nn.init.trunc_normal_(self.temp_pos, std=0.02)

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [b, 2, T, H, W] -> context [b, T, H*W, out_dim]."""
        c = self.config
        if motion.dim() != 5 or motion.shape[1] != c.in_channels or tuple(motion.shape[3:]) != (c.height, c.width):
            raise ValueError(f"motion must be [batch, {c.in_channels}, frames, {c.height}, {c.width}], "
                             f"got {list(motion.shape)}")
        if self.temp_pos is not None and motion.shape[2] != c.num_frames:
            raise ValueError(f"temporal position embedding is for {c.num_frames} frames, "
                             f"got {motion.shape[2]}")
        x = self.in_proj(motion.permute(0, 2, 3, 4, 1).flatten(2, 3))  # [b, T, H*W, dim]
        x = x + self.pos_embed.unsqueeze(0)
        if self.temp_pos is not None:
            x = x + self.temp_pos.unsqueeze(2)
        for block in self.blocks:
            x = block(x)
        return self.out_proj(self.norm(x))

    def load_release_state_dict(self, state_dict):
        """Load a release-layout state dict strictly (every key consumed, none missing)."""
        return self.load_state_dict(dict(state_dict), strict=True)
