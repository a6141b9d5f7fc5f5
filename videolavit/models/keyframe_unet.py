"""The keyframe U-Net of g_I: a diffusers ``UNet2DConditionModel`` in the SDXL layout (docs/design.md §6).

SDXL conditions on two text encoders: a token sequence (768 ‖ 1280 = 2048-d per token) read by cross-attention,
and a pooled 1280-d vector added to the timestep embedding together with six "micro-conditioning" sizes
(original height/width, crop top/left, target height/width; ``addition_embed_type="text_time"``). The keyframe
detokenizer fills exactly these slots with what the feature decoder makes of the keyframe codes (256 context
tokens and a pooled vector), so the release's U-Net — an SDXL U-Net — keeps SDXL's layout and can start from
SDXL's weights. Defaults below are SDXL base 1.0's (and the release's); tiny runs shrink them by config.

:class:`KeyframeUNet` is the raw network ``F(c_in·x, c_noise, context=, pooled=, time_ids=)`` that
``videolavit.diffusion.denoiser.Denoiser`` preconditions. :func:`load_shared_unet_weights` copies the tensors
of a local SDXL ``unet/`` directory (``save_pretrained`` layout) whose names and shapes match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from videolavit.metrics.weights import MissingWeightsError, require_directory
from videolavit.release.checkpoint import load_bin_state_dict

NUM_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w): SDXL's micro-conditioning
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")  # .bin: the release's
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.fp16.json",
               "diffusion_pytorch_model.fp16.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


@dataclass
class KeyframeUNetConfig:
    """Sizes of the keyframe U-Net; defaults are SDXL base 1.0's (the release's keyframe U-Net)."""

    in_channels: int = 4  # latent channels of the latent space (SDXL VAE: 4; pixel space: 3)
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    num_heads: tuple[int, ...] = (5, 10, 20)  # diffusers' ``attention_head_dim`` (really the head count)
    context_dim: int = 2048  # cross-attention width: the feature decoder's context (768 + 1280)
    pooled_dim: int = 1280  # the feature decoder's pooled vector
    addition_time_embed_dim: int = 256
    norm_num_groups: int = 32
    use_linear_projection: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "down_block_types", "up_block_types", "transformer_layers_per_block",
                     "num_heads"):
            setattr(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "transformer_layers_per_block", "num_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"unet.{name} has {len(getattr(self, name))} entries but block_out_channels has {n}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"unet.block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")

    @property
    def downsample(self) -> int:
        """Overall down-sampling of the U-Net: latent sizes must be divisible by it."""
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_config(self) -> dict:
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels,
            block_out_channels=self.block_out_channels, down_block_types=self.down_block_types,
            up_block_types=self.up_block_types, layers_per_block=self.layers_per_block,
            transformer_layers_per_block=self.transformer_layers_per_block, attention_head_dim=self.num_heads,
            cross_attention_dim=self.context_dim, addition_embed_type="text_time",
            addition_time_embed_dim=self.addition_time_embed_dim,
            projection_class_embeddings_input_dim=self.pooled_dim + NUM_TIME_IDS * self.addition_time_embed_dim,
            norm_num_groups=self.norm_num_groups, use_linear_projection=self.use_linear_projection,
            flip_sin_to_cos=True, freq_shift=0, act_fn="silu")


class KeyframeUNet(nn.Module):
    """x [B, C, h, w], c_noise [B] + context [B, N, context_dim], pooled [B, pooled_dim], time_ids [B, 6] -> [B, C, h, w]."""

    def __init__(self, config: KeyframeUNetConfig):
        super().__init__()
        self.config = config
        self.net = UNet2DConditionModel(**config.diffusers_config())
        if config.gradient_checkpointing:
            self.net.enable_gradient_checkpointing()

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, *, context: torch.Tensor, pooled: torch.Tensor,
                time_ids: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        cfg = self.config
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"context must be [{b}, tokens, {cfg.context_dim}], got {list(context.shape)}")
        if pooled.shape != (b, cfg.pooled_dim):
            raise ValueError(f"pooled must be [{b}, {cfg.pooled_dim}], got {list(pooled.shape)}")
        if time_ids.shape != (b, NUM_TIME_IDS):
            raise ValueError(f"time_ids must be [{b}, {NUM_TIME_IDS}], got {list(time_ids.shape)}")
        dtype = self.net.conv_in.weight.dtype
        out = self.net(x.to(dtype), c_noise, encoder_hidden_states=context.to(dtype),
                       added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids},
                       return_dict=False)[0]
        return out.to(x.dtype)


def time_ids(batch_size: int, height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """SDXL micro-conditioning of an uncropped image generated at its own size: [B, 6] float32.

    (original h, w, crop top, left, target h, w) = (h, w, 0, 0, h, w), as the release passes them.
    """
    row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return row.expand(batch_size, -1).clone()


class SharedWeights(NamedTuple):
    """What :func:`load_shared_unet_weights` copied."""

    loaded: list[str]  # names copied
    mismatched: list[str]  # in both, different shapes (left at their init)
    missing: list[str]  # ours only (left at their init)
    unexpected: list[str]  # theirs only (ignored)


def _unet_weight_files(directory: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    for name in INDEX_FILES:
        if (directory / name).is_file():
            shards = sorted(set(json.loads((directory / name).read_text())["weight_map"].values()))
            return [directory / shard for shard in shards]
    raise MissingWeightsError(
        f"no U-Net weights in '{directory}': expected one of {list(WEIGHT_FILES)} or a sharded index "
        f"{list(INDEX_FILES)} (a diffusers save_pretrained `unet/` directory)")


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a `.bin` torch file read with ``weights_only`` (tensors only)."""
    if path.suffix == ".bin":
        return load_bin_state_dict(path)
    return load_file(str(path))


def load_shared_unet_weights(unet: KeyframeUNet, directory: str | Path,
                             argument: str = "unet_weights") -> SharedWeights:
    """Copy the tensors of a local SDXL U-Net (``unet/`` of a pipeline directory, or that directory itself)
    whose names and shapes match ours; everything else keeps its fresh init.

    With the default (SDXL) sizes every tensor matches. Raises ``MissingWeightsError`` naming ``argument``
    when the directory or its weights are missing, and ``ValueError`` when nothing at all matches (wrong model).
    """
    root = require_directory(directory, argument, "SDXL U-Net")
    if (root / "unet").is_dir():
        root = root / "unet"
    theirs: dict[str, torch.Tensor] = {}
    for path in _unet_weight_files(root):
        if not path.is_file():
            raise MissingWeightsError(f"U-Net weight shard '{path}' (listed in its index) does not exist")
        theirs.update(read_weight_file(path))
    ours = unet.net.state_dict()
    loaded = [k for k, v in theirs.items() if k in ours and ours[k].shape == v.shape]
    mismatched = [k for k, v in theirs.items() if k in ours and ours[k].shape != v.shape]
    if not loaded:
        raise ValueError(f"no tensor of the U-Net in '{root}' matches the keyframe U-Net by name and shape; is it a "
                         "diffusers UNet2DConditionModel?")
    with torch.no_grad():
        for name in loaded:
            ours[name].copy_(theirs[name].to(ours[name].dtype))
    return SharedWeights(loaded=sorted(loaded), mismatched=sorted(mismatched),
                         missing=sorted(set(ours) - set(theirs)), unexpected=sorted(set(theirs) - set(ours)))
