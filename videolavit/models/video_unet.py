"""The video detokenizer's 3-D U-Net (docs/design.md §7): SVD img2vid-xt's layout with per-frame motion context.

g_V starts from Stable Video Diffusion's weights yet is conditioned on motion, frame by frame and place by place.
``VideoUNet`` is diffusers' ``UNetSpatioTemporalConditionModel`` with the same modules and parameter names
(``load_svd_unet_weights`` loads SVD into it); only the forward pass differs: the input holds the keyframe latent
and the motion field beside the noisy latent, spatial cross-attention gives each frame its own motion tokens, and
temporal cross-attention gives each feature-map location the motion at its own place
(``MotionTransformerSpatioTemporal``, ``per_location_motion_context``). Why it is built this way, and what
gradient checkpointing recomputes: docs/design.md §7.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import FrozenDict, register_to_config
from diffusers.models.transformers.transformer_temporal import (
    TransformerSpatioTemporalModel,
    TransformerTemporalModelOutput,
)
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionModel
from torch import nn

from videolavit.metrics.weights import require_directory

CONTEXT_RESIZE_MODES = ("nearest", "bilinear")


@dataclass
class VideoUNetConfig:
    """Every size of the video U-Net; defaults are SVD img2vid-xt's (the release initialises from it)."""

    latent_channels: int = 4  # C of the latent space (4: SD/SVD VAE, 3: pixel space)
    motion_channels: int = 2  # (x, y) of the motion field concatenated to the input
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                                         "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
    up_block_types: tuple[str, ...] = ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                                       "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # multiples of 32 (GroupNorm groups)
    layers_per_block: int = 2
    transformer_layers_per_block: int = 1
    num_attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: int = 1024  # = the motion-condition encoder's out_dim
    addition_time_embed_dim: int = 256  # sinusoidal width of each added time id
    num_added_time_ids: int = 3  # (fps, motion bucket, noise augmentation)
    motion_grid: tuple[int, int] = (16, 16)  # gh×gw of the motion context tokens (the encoder's H×W)
    norm_num_groups: int = 32  # groups of every GroupNorm (SVD: 32). Narrow U-Nets need fewer: with one
    #                            channel per group each norm is an instance norm, which erases every
    #                            channel's per-frame mean, i.e. the flat colours of a background
    temporal_context_resize: str = "bilinear"  # motion grid -> each level's map for the temporal layers:
    #                                            "nearest" (release, paper) | "bilinear" (ours, anti-aliased)

    def __post_init__(self):
        # JSON / YAML hand us lists; keep tuples so configs compare equal after a round trip.
        for name in ("down_block_types", "up_block_types", "block_out_channels", "num_attention_heads",
                     "motion_grid"):
            setattr(self, name, tuple(getattr(self, name)))
        if len(self.motion_grid) != 2:
            raise ValueError(f"motion_grid must be (height, width), got {self.motion_grid}")
        bad = [c for c in self.block_out_channels if c % 32]
        if bad:
            raise ValueError(f"block_out_channels must be multiples of 32 (diffusers builds GroupNorms of 32 "
                             f"groups), got {bad}")
        if self.norm_num_groups < 1 or 32 % self.norm_num_groups:
            raise ValueError(f"norm_num_groups must divide 32, got {self.norm_num_groups}")
        if self.temporal_context_resize not in CONTEXT_RESIZE_MODES:
            raise ValueError(f"temporal_context_resize must be one of {CONTEXT_RESIZE_MODES}, "
                             f"got {self.temporal_context_resize!r}")

    @property
    def in_channels(self) -> int:
        return 2 * self.latent_channels + self.motion_channels

    @property
    def out_channels(self) -> int:
        return self.latent_channels


def per_location_motion_context(context: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                                num_frames: int, mode: str = "bilinear") -> torch.Tensor:
    """Per-frame motion tokens -> the temporal layers' context at each feature-map location.

    context [b*T, gh*gw, D] (frame-major, as the spatial layers get it) -> [b*h*w, T, D]: for location
    (i, j) of an h×w map, the T tokens found at that place of the (resampled) motion grid. ``mode``:
    ``"nearest"`` (the release: the cell's token, float32, scale factor h/gh as the release passes it) or
    ``"bilinear"`` (anti-aliased when shrinking).
    """
    batch_frames, tokens, dim = context.shape
    gh, gw = grid
    if tokens != gh * gw:
        raise ValueError(f"motion context has {tokens} tokens per frame, expected the {gh}x{gw} motion grid")
    h, w = size
    maps = context.transpose(1, 2).reshape(batch_frames, dim, gh, gw)
    if (h, w) != (gh, gw) and mode == "nearest":
        maps = F.interpolate(maps.float(), scale_factor=(h / gh, w / gw), mode="nearest").to(context.dtype)
    elif (h, w) != (gh, gw):
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False,
                             antialias=h < gh or w < gw)
    if tuple(maps.shape[-2:]) != (h, w):
        raise ValueError(f"the {gh}x{gw} motion grid does not resample to the {h}x{w} feature map")
    batch = batch_frames // num_frames
    maps = maps.reshape(batch, num_frames, dim, h, w).permute(0, 3, 4, 1, 2)  # [b, h, w, T, D]
    return maps.reshape(batch * h * w, num_frames, dim)


class MotionTransformerSpatioTemporal(TransformerSpatioTemporalModel):
    """diffusers' spatio-temporal transformer with per-frame spatial context and per-location temporal
    context (docs/design.md §7). ``motion_grid`` is set by ``VideoUNet``."""

    motion_grid: tuple[int, int]
    context_resize: str = "bilinear"

    @classmethod
    def like(cls, stock: TransformerSpatioTemporalModel, motion_grid: tuple[int, int],
             context_resize: str) -> MotionTransformerSpatioTemporal:
        """One built with ``stock``'s sizes (on the meta device: nothing is initialised twice) that takes over
        ``stock``'s parameters and buffers, so the same tensors sit under the same names."""
        cross = stock.transformer_blocks[0].attn2 if len(stock.transformer_blocks) else None
        with torch.device("meta"):
            motion = cls(num_attention_heads=stock.num_attention_heads, attention_head_dim=stock.attention_head_dim,
                         in_channels=stock.in_channels, out_channels=stock.out_channels,
                         num_layers=len(stock.transformer_blocks),
                         cross_attention_dim=None if cross is None else cross.cross_attention_dim)
        motion.load_state_dict(stock.state_dict(keep_vars=True), strict=True, assign=True)
        stock_on_meta = any(t.is_meta for t in (*stock.parameters(), *stock.buffers()))  # diffusers' empty init
        left = [n for n, t in (*motion.named_parameters(), *motion.named_buffers()) if t.is_meta]
        if left and not stock_on_meta:
            raise RuntimeError(f"MotionTransformerSpatioTemporal.like: tensors not taken over: {left}")
        motion.train(stock.training)
        motion.motion_grid = motion_grid
        motion.context_resize = context_resize
        return motion

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                image_only_indicator: torch.Tensor | None = None, return_dict: bool = True):
        # hidden_states [b*T, C, h, w]; encoder_hidden_states [b*T, N, D] (frame t's own motion tokens)
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            # The whole transformer is one checkpointed unit (diffusers checkpoints its spatial blocks only):
            # at the finest level its temporal blocks, the time mixer and the per-location context hold many
            # times the input map. Nesting its blocks' checkpoints inside would hold less during the backward
            # recomputation, for a third forward pass of the spatial attention.
            out = self._gradient_checkpointing_func(self.transform, hidden_states, encoder_hidden_states,
                                                    image_only_indicator)
        else:
            out = self.transform(hidden_states, encoder_hidden_states, image_only_indicator)
        return TransformerTemporalModelOutput(sample=out) if return_dict else (out,)

    def transform(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  image_only_indicator: torch.Tensor) -> torch.Tensor:
        """The forward pass without the output wrapper and without checkpointing: [b*T, C, h, w] -> same."""
        batch_frames, _, height, width = hidden_states.shape
        num_frames = image_only_indicator.shape[-1]
        time_context = per_location_motion_context(encoder_hidden_states, self.motion_grid, (height, width),
                                                   num_frames, self.context_resize)  # [b*h*w, T, D]

        residual = hidden_states
        x = self.norm(hidden_states)
        channels = x.shape[1]
        x = self.proj_in(x.permute(0, 2, 3, 1).reshape(batch_frames, height * width, channels))

        # which frame each row is, embedded like SVD does (sinusoid -> MLP), added before temporal mixing
        frame_index = torch.arange(num_frames, device=x.device).repeat(batch_frames // num_frames)
        frame_emb = self.time_pos_embed(self.time_proj(frame_index).to(x.dtype))[:, None, :]

        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            x = block(x, encoder_hidden_states=encoder_hidden_states)
            mixed = temporal_block(x + frame_emb, num_frames=num_frames, encoder_hidden_states=time_context)
            x = self.time_mixer(x_spatial=x, x_temporal=mixed, image_only_indicator=image_only_indicator)

        x = self.proj_out(x)
        x = x.reshape(batch_frames, height, width, -1).permute(0, 3, 1, 2).contiguous()
        return x + residual


class TemporalConv3d(nn.Conv3d):
    """SVD's temporal convolutions (kernel (k, 1, 1)) run as 2-D convolutions over [b, C, T, h·w].

    Same parameters, same result: CPU builds of PyTorch have no fast kernel for 3-D convolutions and fall
    back to a slow generic one (its cost: docs/measurements.md); the 2-D kernel is fast.
    """

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        return (type(module) is nn.Conv3d and module.kernel_size[1:] == (1, 1) and module.stride == (1, 1, 1)
                and module.dilation == (1, 1, 1) and module.groups == 1 and module.padding_mode == "zeros"
                and isinstance(module.padding, tuple) and module.padding[1:] == (0, 0))

    @classmethod
    def like(cls, conv: nn.Conv3d) -> TemporalConv3d:
        """A ``TemporalConv3d`` with ``conv``'s settings that holds ``conv``'s own weight and bias."""
        fast = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                   padding_mode=conv.padding_mode, device="meta")
        fast.weight = conv.weight
        fast.bias = conv.bias
        fast.train(conv.training)
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [b, C, T, h, w]
        batch, _, frames, height, width = x.shape
        out = F.conv2d(x.reshape(batch, -1, frames, height * width), self.weight.squeeze(-1), self.bias,
                       padding=(self.padding[0], 0))
        return out.reshape(batch, -1, out.shape[2], height, width)


_D = VideoUNetConfig  # its field defaults are VideoUNet's constructor defaults


class VideoUNet(UNetSpatioTemporalConditionModel):
    """SVD's spatio-temporal U-Net conditioned per frame on motion context (docs/design.md §7).

    A diffusers ``ModelMixin``/``ConfigMixin`` whose registered config is :class:`VideoUNetConfig`'s fields:
    ``save_pretrained`` writes them to ``config.json`` and ``VideoUNet.from_pretrained(folder)`` rebuilds the
    network. Build it as ``VideoUNet(video_unet_config)`` or ``VideoUNet(**fields)``; ``video_config`` holds the
    :class:`VideoUNetConfig` (``config`` is diffusers' frozen dict of the same fields), ``svd_config`` the config
    of the stock ``UNetSpatioTemporalConditionModel`` with the same parameters (an SVD ``unet/config.json``).
    """

    @register_to_config
    def __init__(self, latent_channels: int | VideoUNetConfig | None = _D.latent_channels,
                 motion_channels: int = _D.motion_channels, down_block_types: tuple[str, ...] = _D.down_block_types,
                 up_block_types: tuple[str, ...] = _D.up_block_types,
                 block_out_channels: tuple[int, ...] = _D.block_out_channels,
                 layers_per_block: int = _D.layers_per_block,
                 transformer_layers_per_block: int = _D.transformer_layers_per_block,
                 num_attention_heads: tuple[int, ...] = _D.num_attention_heads,
                 cross_attention_dim: int = _D.cross_attention_dim,
                 addition_time_embed_dim: int = _D.addition_time_embed_dim,
                 num_added_time_ids: int = _D.num_added_time_ids, motion_grid: tuple[int, int] = _D.motion_grid,
                 norm_num_groups: int = _D.norm_num_groups, temporal_context_resize: str = _D.temporal_context_resize):
        if isinstance(latent_channels, VideoUNetConfig):
            config = latent_channels
        elif latent_channels is None:
            config = VideoUNetConfig()
        else:
            config = VideoUNetConfig(
                latent_channels=latent_channels, motion_channels=motion_channels, down_block_types=down_block_types,
                up_block_types=up_block_types, block_out_channels=block_out_channels,
                layers_per_block=layers_per_block, transformer_layers_per_block=transformer_layers_per_block,
                num_attention_heads=num_attention_heads, cross_attention_dim=cross_attention_dim,
                addition_time_embed_dim=addition_time_embed_dim, num_added_time_ids=num_added_time_ids,
                motion_grid=motion_grid, norm_num_groups=norm_num_groups,
                temporal_context_resize=temporal_context_resize)
        if len(config.num_attention_heads) != len(config.block_out_channels):
            raise ValueError(f"{len(config.num_attention_heads)} attention head counts for "
                             f"{len(config.block_out_channels)} resolution levels")
        svd = dict(
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            down_block_types=config.down_block_types,
            up_block_types=config.up_block_types,
            block_out_channels=config.block_out_channels,
            addition_time_embed_dim=config.addition_time_embed_dim,
            projection_class_embeddings_input_dim=config.num_added_time_ids * config.addition_time_embed_dim,
            layers_per_block=config.layers_per_block,
            cross_attention_dim=config.cross_attention_dim,
            transformer_layers_per_block=config.transformer_layers_per_block,
            num_attention_heads=config.num_attention_heads,
        )
        super().__init__(**svd)
        stock = inspect.signature(UNetSpatioTemporalConditionModel.__init__).parameters
        self.svd_config = {k: v for k, v in self._internal_dict.items() if k in stock and k != "self"}
        # what save_pretrained writes and from_pretrained passes back: our fields alone (not the parent's arguments,
        # nor a VideoUNetConfig given positionally)
        self._internal_dict = FrozenDict(dataclasses.asdict(config))
        self.video_config = config
        for name, module in list(self.named_modules()):
            if type(module) is TransformerSpatioTemporalModel:
                self._replace(name, MotionTransformerSpatioTemporal.like(
                    module, config.motion_grid, config.temporal_context_resize))
            elif TemporalConv3d.applies_to(module):
                self._replace(name, TemporalConv3d.like(module))
        for module in self.modules():
            if isinstance(module, nn.GroupNorm):
                module.num_groups = config.norm_num_groups  # per-channel affine parameters: layout unchanged

    def _replace(self, name: str, module: nn.Module) -> None:
        """Put ``module`` where submodule ``name`` is (its place in the parent's children, so in the state dict)."""
        parent, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent), child, module)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, motion_context: torch.Tensor,
                added_time_ids: torch.Tensor) -> torch.Tensor:
        """sample [b, T, 2C+2, h, w]; timestep (EDM c_noise) scalar or [b]; motion_context [b, T, N, D];
        added_time_ids [b, num_added_time_ids] -> [b, T, C, h, w]."""
        c = self.video_config
        if sample.dim() != 5 or sample.shape[2] != c.in_channels:
            raise ValueError(f"sample must be [batch, frames, {c.in_channels}, height, width], "
                             f"got {list(sample.shape)}")
        batch, frames = sample.shape[:2]
        gh, gw = c.motion_grid
        expected = (batch, frames, gh * gw, c.cross_attention_dim)
        if tuple(motion_context.shape) != expected:
            raise ValueError(f"motion_context must be [batch, frames, {gh}x{gw} tokens, {c.cross_attention_dim}] = "
                             f"{list(expected)}, got {list(motion_context.shape)}")
        if tuple(added_time_ids.shape) != (batch, c.num_added_time_ids):
            raise ValueError(f"added_time_ids must be [{batch}, {c.num_added_time_ids}], "
                             f"got {list(added_time_ids.shape)}")

        # 1. noise level + added time ids -> one embedding per video, repeated over its frames
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if not timesteps.is_floating_point():
            timesteps = timesteps.float()
        timesteps = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        time_ids = self.add_time_proj(added_time_ids.flatten()).reshape(batch, -1).to(emb.dtype)
        emb = (emb + self.add_embedding(time_ids)).repeat_interleave(frames, dim=0)  # [b*T, E]
        context = motion_context.flatten(0, 1)  # [b*T, N, D]: each frame its own tokens

        # 2. the U-Net over b*T frames
        x = self.conv_in(sample.flatten(0, 1))
        indicator = torch.zeros(batch, frames, dtype=x.dtype, device=x.device)
        up_factor = 2 ** self.num_upsamplers
        force_sizes = any(s % up_factor for s in sample.shape[-2:])

        skips = (x,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=context,
                               image_only_indicator=indicator)
            else:
                x, res = block(hidden_states=x, temb=emb, image_only_indicator=indicator)
            skips += res
        x = self.mid_block(hidden_states=x, temb=emb, encoder_hidden_states=context, image_only_indicator=indicator)
        for i, block in enumerate(self.up_blocks):
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            size = skips[-1].shape[2:] if force_sizes and i < len(self.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context,
                          upsample_size=size, image_only_indicator=indicator)
            else:
                x = block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=size,
                          image_only_indicator=indicator)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return x.reshape(batch, frames, *x.shape[1:])


# ---- SVD weights ---------------------------------------------------------------------------------

FRESH_PATTERNS = ("conv_in.", ".attn2.")  # trained from scratch (docs/design.md §7): the input layer, cross-attention


class SvdLoadReport(NamedTuple):
    loaded: list[str]  # our keys taken from the SVD file
    fresh: list[str]  # our keys left at their initialisation (new, re-purposed, or shaped differently)
    unused: list[str]  # keys of the SVD file we have no place for


def _svd_weight_files(directory: Path) -> list[Path]:
    """The U-Net's safetensors file(s) in a diffusers directory (the ``unet/`` folder or the pipeline root)."""
    if (directory / "unet").is_dir() and not list(directory.glob("*.safetensors")):
        directory = directory / "unet"
    index = sorted(directory.glob("diffusion_pytorch_model*.safetensors.index.json"))
    if index:
        import json

        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [directory / name for name in shards]
    files = sorted(directory.glob("*.safetensors"))
    plain = [f for f in files if f.name == "diffusion_pytorch_model.safetensors"]
    if plain:
        return plain
    if len(files) == 1:  # e.g. only the fp16 variant
        return files
    if not files:
        raise FileNotFoundError(f"no U-Net safetensors file in '{directory}' (expected "
                                "diffusion_pytorch_model.safetensors, as save_pretrained writes it)")
    raise FileNotFoundError(f"several safetensors files in '{directory}' and no index: {[f.name for f in files]}")


@torch.no_grad()
def load_svd_unet_weights(unet: VideoUNet, directory: str | Path, *, fresh_patterns: tuple[str, ...] = FRESH_PATTERNS,
                          zero_fresh_cross_attention_output: bool = True, verbose: bool = True) -> SvdLoadReport:
    """Initialise ``unet`` from a local SVD ``unet`` (diffusers ``save_pretrained`` directory, safetensors).

    Every weight whose name and shape match is copied, except names containing ``fresh_patterns`` (the
    input conv and all cross-attention, which the paper trains from scratch). With
    ``zero_fresh_cross_attention_output`` the fresh cross-attention output projections start at zero, so
    at step 0 the loaded network computes what SVD computes and the new branches grow from there.
    """
    from safetensors import safe_open

    root = require_directory(directory, "unet_init", "SVD U-Net")
    ours = unet.state_dict()
    loaded, unused = [], []
    for path in _svd_weight_files(root):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                target = ours.get(key)
                if target is None:
                    unused.append(key)
                    continue
                if any(p in key for p in fresh_patterns):
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(target.shape):
                    continue
                target.copy_(tensor.to(target.dtype))
                loaded.append(key)
    taken = set(loaded)
    fresh = sorted(k for k in ours if k not in taken)
    if zero_fresh_cross_attention_output:
        for name, module in unet.named_modules():
            if name.endswith(".attn2") and f"{name}.to_out.0.weight" in fresh:
                nn.init.zeros_(module.to_out[0].weight)
                if module.to_out[0].bias is not None:
                    nn.init.zeros_(module.to_out[0].bias)
    report = SvdLoadReport(sorted(loaded), fresh, sorted(unused))
    if verbose:
        print(f"load_svd_unet_weights: {len(report.loaded)} tensors loaded from {root}, {len(report.fresh)} fresh, "
              f"{len(report.unused)} unused")
        for key in report.fresh:
            print(f"  fresh: {key}")
        for key in report.unused:
            print(f"  unused: {key}")
    return report
