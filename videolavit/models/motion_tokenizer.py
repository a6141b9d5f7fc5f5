"""Motion tokenizer (stage 1a): a VQ-VAE that turns a clip's motion-vector field into a few discrete codes.

A space-time transformer encoder down-samples the field to a small grid of tokens, quantised by an
L2-normalised codebook; the decoder mirrors it (layers: ``MotionTokenizer``'s docstring; docs/design.md §5).
Variants are configuration, not code branches (see ``MotionTokenizerConfig.preset``):
* ``release``: 24x20x36 input, strided 3x3x3 Conv3d down-sampling -> 3x5x9 = 135 tokens; parameter
  names match the public release so its checkpoint loads strictly (``load_release_state_dict``).
* ``paper256`` / ``paper64``: 24x16x16 input, 3-D average pooling -> 4x8x8 = 256 or 4x4x4 = 64 tokens.

The model consumes the tokenizer-scaled motion field (standardised vectors x10, docs/design.md §4) and does not
normalise it. Initialisation: std 0.02 / zero bias everywhere (blocks, convs, task heads; the release lineage)
except the two token embeddings (``encoder.in_proj`` 2->dim, ``decoder.in_proj`` code_dim->dim), which get
fan-in init: with std 0.02 their tokens are too small to survive the LayerNorms and the model learns to
predict zero motion (``init_token_embedding``). Release checkpoints overwrite all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .spatiotemporal_transformer import SpatioTemporalBlock, init_token_embedding, init_transformer_weights
from .vector_quantizer import VectorQuantizer

Grid = tuple[int, int, int]  # (frames, height, width)

DOWNSAMPLE_KINDS = ("conv", "avgpool")


@dataclass
class MotionTokenizerConfig:
    """Every size of the tokenizer; defaults are the release model."""

    in_channels: int = 2
    num_frames: int = 24
    height: int = 20
    width: int = 36
    dim: int = 512
    num_heads: int = 8
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    blocks_per_stage: tuple[int, ...] = (3, 3, 3, 3)
    # per-stage (t, h, w) reduction of the encoder; the decoder undoes them in reverse order
    stage_factors: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 1, 1), (2, 1, 1), (2, 2, 2))
    downsample: str = "conv"  # "conv" (strided Conv3d, release) | "avgpool" (paper)
    conv_kernel_size: int = 3  # Conv3d kernel of the down- and up-sampling layers
    num_codes: int = 1024
    code_dim: int = 32
    ema_decay: float = 0.995
    commitment_beta: float = 1.0
    dead_code_threshold: float = 0.03  # fraction of a uniform share below which a code is dead
    dead_code_interval: int = 100  # training forwards (EMA updates) between dead-code checks; 0: never

    PRESETS: ClassVar[dict[str, dict]] = {
        "release": {},
        "paper256": dict(height=16, width=16, downsample="avgpool",
                         stage_factors=((1, 2, 2), (2, 1, 1), (3, 1, 1), (1, 1, 1))),
        "paper64": dict(height=16, width=16, downsample="avgpool",
                        stage_factors=((1, 2, 2), (2, 1, 1), (3, 1, 1), (1, 2, 2))),
    }

    def __post_init__(self):
        # JSON / YAML hand us lists; keep tuples so configs compare and hash the same way.
        self.blocks_per_stage = tuple(int(n) for n in self.blocks_per_stage)
        self.stage_factors = tuple(tuple(int(f) for f in factors) for factors in self.stage_factors)
        if self.downsample not in DOWNSAMPLE_KINDS:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_KINDS}, got {self.downsample!r}")
        if len(self.blocks_per_stage) != len(self.stage_factors):
            raise ValueError(f"{len(self.blocks_per_stage)} block groups but {len(self.stage_factors)} "
                             "stage factors; give one factor triple per group")
        for factors in self.stage_factors:
            if len(factors) != 3 or min(factors) < 1:
                raise ValueError(f"stage factors must be positive (t, h, w) triples, got {factors}")
            if self.downsample == "conv" and max(factors) > self.conv_kernel_size:
                raise ValueError(f"conv stride {factors} exceeds kernel size {self.conv_kernel_size}")
        self.grids()  # validates that no stage shrinks a dimension to zero

    @classmethod
    def preset(cls, name: str, **overrides) -> "MotionTokenizerConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown motion tokenizer preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def grids(self) -> list[Grid]:
        """Token grid entering each encoder stage, plus the final (code) grid last."""
        grid = (self.num_frames, self.height, self.width)
        grids = [grid]
        for factors in self.stage_factors:
            if self.downsample == "conv":
                # padded by (kernel - stride) in total, the output is floor((n - stride) / stride) + 1
                grid = tuple((n - s) // s + 1 for n, s in zip(grid, factors))
            else:
                grid = tuple(n // s for n, s in zip(grid, factors))
            if min(grid) < 1:
                raise ValueError(f"stage factors {self.stage_factors} shrink the input "
                                 f"{grids[0]} to an empty grid")
            grids.append(grid)
        return grids

    @property
    def token_grid(self) -> Grid:
        return self.grids()[-1]

    @property
    def num_tokens(self) -> int:
        t, h, w = self.token_grid
        return t * h * w


class ConvDownsample(nn.Module):
    """Strided Conv3d with the release's zero padding: (kernel - stride) split as floor left, rest right.

    For kernel 3 that is (1, 1) at stride 1 and (0, 1) at stride 2, so odd-sized inputs lose nothing
    and the release's sampling positions (and thus its weights' meaning) are kept.
    """

    def __init__(self, dim: int, factors: Grid, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size, stride=factors)
        pads = []
        for stride in reversed(factors):  # F.pad wants (w_left, w_right, h_left, h_right, t_left, t_right)
            total = kernel_size - stride
            pads += [total // 2, total - total // 2]
        self.padding = tuple(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))  # [b, dim, t, h, w] -> [b, dim, t', h', w']


class PoolDownsample(nn.Module):
    def __init__(self, factors: Grid):
        super().__init__()
        self.factors = tuple(factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, self.factors) if self.factors != (1, 1, 1) else x


class Upsample(nn.Module):
    """Nearest-neighbour resize to a target grid (in fp32, as the release), then a 3x3x3 Conv3d."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, size: Grid) -> torch.Tensor:
        x = F.interpolate(x.float(), size=size, mode="nearest").to(x.dtype)
        return self.conv(x)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[b, dim, t, h, w] -> [b, t, h*w, dim] (the blocks' layout)."""
    return x.permute(0, 2, 3, 4, 1).flatten(2, 3)


def _to_volume(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """[b, t, h*w, dim] -> [b, dim, t, h, w]."""
    t, h, w = grid
    return x.reshape(x.shape[0], t, h, w, x.shape[-1]).permute(0, 4, 1, 2, 3)


def _block_groups(config: MotionTokenizerConfig) -> list[range]:
    groups, start = [], 0
    for count in config.blocks_per_stage:
        groups.append(range(start, start + count))
        start += count
    return groups


class MotionEncoder(nn.Module):
    def __init__(self, config: MotionTokenizerConfig):
        super().__init__()
        self.config = config
        self.grids = config.grids()
        dim = config.dim
        self.blocks = nn.ModuleList(
            SpatioTemporalBlock(dim, config.num_heads, config.mlp_ratio, config.norm_eps)
            for _ in range(sum(config.blocks_per_stage)))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.height * config.width, dim))
        self.temp_pos = nn.Parameter(torch.zeros(1, config.num_frames, dim))
        if config.downsample == "conv":
            layers = [ConvDownsample(dim, f, config.conv_kernel_size) for f in config.stage_factors]
        else:
            layers = [PoolDownsample(f) for f in config.stage_factors]
        self.down_sample_layers = nn.ModuleList(layers)
        self.in_proj = nn.Linear(config.in_channels, dim)
        self.apply(init_transformer_weights)
        init_token_embedding(self.in_proj)  # see init_token_embedding: std 0.02 here stalls training
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.temp_pos, std=0.02)

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """[b, 2, T, H, W] -> features [b, t, h, w, dim] on the token grid."""
        x = self.in_proj(motion.permute(0, 2, 3, 4, 1)).flatten(2, 3)  # [b, T, H*W, dim]
        x = x + self.pos_embed.unsqueeze(0) + self.temp_pos.unsqueeze(2)
        for stage, group in enumerate(_block_groups(self.config)):
            for i in group:
                x = self.blocks[i](x)
            x = _to_tokens(self.down_sample_layers[stage](_to_volume(x, self.grids[stage])))
        x = self.norm(x)
        t, h, w = self.grids[-1]
        return x.reshape(x.shape[0], t, h, w, -1)


class MotionDecoder(nn.Module):
    def __init__(self, config: MotionTokenizerConfig):
        super().__init__()
        self.config = config
        self.grids = config.grids()
        dim = config.dim
        self.blocks = nn.ModuleList(
            SpatioTemporalBlock(dim, config.num_heads, config.mlp_ratio, config.norm_eps)
            for _ in range(sum(config.blocks_per_stage)))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.in_proj = nn.Linear(config.code_dim, dim)
        self.up_sample_layers = nn.ModuleList(
            Upsample(dim, config.conv_kernel_size) for _ in config.stage_factors)
        self.apply(init_transformer_weights)
        init_token_embedding(self.in_proj)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [b, t, h, w, code_dim] -> features [b, T, H, W, dim] on the input grid."""
        x = self.in_proj(codes).permute(0, 4, 1, 2, 3)  # [b, dim, t, h, w]
        # the decoder walks the encoder's grids backwards: stage s restores grid (n_stages - 1 - s)
        targets = self.grids[-2::-1]
        for stage, group in enumerate(_block_groups(self.config)):
            grid = targets[stage]
            x = _to_tokens(self.up_sample_layers[stage](x, grid))
            for i in group:
                x = self.blocks[i](x)
            x = _to_volume(x, grid)
        x = self.norm(x.permute(0, 2, 3, 4, 1))
        return x


def _task_head(dim: int, out_dim: int) -> nn.Sequential:
    """dim -> dim -> tanh -> out_dim, initialised like the blocks (std 0.02, zero bias) as BEiT-v2's VQ-KD
    task layers are. PyTorch's default init gives the decoder head random biases of up to 1/sqrt(dim):
    a constant offset on the predicted field (initial recon/zero-motion MSE ratio ~3 instead of ~1)
    whose removal pushes the features toward the content-free mean (see ``init_token_embedding``).
    Measured on the tiny corpus: this and the fan-in token embeddings are both needed; either alone
    still stalls near ratio 1 (or crawls)."""
    head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out_dim))
    head.apply(init_transformer_weights)
    return head


class MotionTokenizer(nn.Module):
    """The motion VQ-VAE: encoder -> L2-normalised codebook -> decoder.

    Encoder: in_proj 2->dim, learned spatial + temporal position embeddings, space-time transformer blocks in
    stages, each stage followed by a down-sampling step, final LayerNorm, then a small task head (dim->dim, tanh,
    dim->code_dim) run in full precision before the L2-normalised codebook. Decoder: in_proj code_dim->dim, then per
    stage an up-sampling step back to the encoder's mirrored grid followed by blocks, LayerNorm, and a task head
    dim->dim->2.
    """

    def __init__(self, config: MotionTokenizerConfig | None = None):
        super().__init__()
        self.config = config = config or MotionTokenizerConfig()
        self.encoder = MotionEncoder(config)
        self.decoder = MotionDecoder(config)
        self.encode_task_layer = _task_head(config.dim, config.code_dim)
        self.decode_task_layer = _task_head(config.dim, config.in_channels)
        self.quantize = VectorQuantizer(
            num_codes=config.num_codes, code_dim=config.code_dim, decay=config.ema_decay,
            commitment_beta=config.commitment_beta, dead_code_threshold=config.dead_code_threshold,
            dead_code_interval=config.dead_code_interval)

    @property
    def token_grid(self) -> Grid:
        return self.config.token_grid

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    # ---- pieces --------------------------------------------------------------------------------

    def _check_motion(self, motion: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.num_frames, c.height, c.width)
        if motion.dim() != 5 or tuple(motion.shape[1:]) != expected:
            raise ValueError(f"motion must be [batch, {', '.join(map(str, expected))}] "
                             f"(channels, frames, height, width), got {list(motion.shape)}")

    def encode_latents(self, motion: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents [b, t, h, w, code_dim].

        The task head runs with autocast off and in its weights' dtype (fp32 under mixed precision):
        the tanh head feeds a cosine lookup, where low-precision rounding flips code choices.
        """
        self._check_motion(motion)
        features = self.encoder(motion)
        with torch.autocast(features.device.type, enabled=False):
            return self.encode_task_layer(features.to(self.encode_task_layer[0].weight.dtype))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors [b, t, h, w, code_dim] -> motion [b, 2, T, H, W]."""
        return self.decode_task_layer(self.decoder(codes)).permute(0, 4, 1, 2, 3)

    # ---- public API ----------------------------------------------------------------------------

    def encode(self, motion: torch.Tensor) -> torch.Tensor:
        """motion [b, 2, T, H, W] -> code ids [b, num_tokens] (t-major, then h, then w)."""
        return self.quantize.encode(self.encode_latents(motion)).flatten(1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """code ids [b, num_tokens] -> motion [b, 2, T, H, W]."""
        if ids.dim() != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(f"ids must be [batch, {self.num_tokens}], got {list(ids.shape)}")
        codes = self.quantize.lookup(ids).view(ids.shape[0], *self.token_grid, -1)
        return self.decode_codes(codes)

    def forward(self, motion: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training/eval pass: reconstruction, losses and codebook statistics.

        In training mode this also advances the codebook EMA (and, on schedule, restarts dead codes).
        """
        quantized = self.quantize(self.encode_latents(motion))
        recon = self.decode_codes(quantized.quantized)
        recon_loss = F.mse_loss(recon.float(), motion.float())
        return {
            "recon": recon,
            "loss": recon_loss + quantized.commit_loss,
            "recon_loss": recon_loss,
            "commit_loss": quantized.commit_loss,
            "ids": quantized.ids.flatten(1),
            "usage": quantized.usage,
            "perplexity": quantized.perplexity,
        }

    # ---- release checkpoints -------------------------------------------------------------------

    def load_release_state_dict(self, state_dict: Mapping[str, torch.Tensor]):
        """Load a state dict in the public release's layout, strictly.

        Every release key must be consumed and no key may be missing except the quantizer's EMA
        statistics, which the release does not store and which start afresh (see vector_quantizer).
        """
        if self.config.downsample != "conv":
            raise ValueError("release checkpoints use conv down-sampling; build the model with "
                             "MotionTokenizerConfig.preset('release')")
        return self.load_state_dict(dict(state_dict), strict=True)
