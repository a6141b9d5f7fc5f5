"""EVA-CLIP vision transformer, the frozen backbone of the LaVIT keyframe tokenizer.

Parameter names follow the released EVA-CLIP ViT-g/14 checkpoint (``eva_vitg_psz14.bin``) so the
released weights load strictly; inside the tokenizer the module lives under the ``encoder.`` prefix.
The tokenizer consumes :meth:`EvaViT.forward_features` (output of the last block, *before* ``norm``);
``norm`` and ``head`` only produce the CLIP image embedding and are kept for checkpoint compatibility.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EvaViTConfig:
    """Sizes of the EVA-CLIP ViT; defaults are the release's ViT-g/14 at 224 px."""

    image_size: int = 224
    patch_size: int = 14
    in_channels: int = 3
    width: int = 1408
    depth: int = 40
    num_heads: int = 16  # head width 88
    mlp_dim: int = 6144  # int(1408 * 4.3637)
    embed_dim: int = 1024  # CLIP joint embedding size (``head``)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class EvaPatchEmbed(nn.Module):
    def __init__(self, config: EvaViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.width, config.patch_size, stride=config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [B, N, C]


class EvaAttention(nn.Module):
    """Self-attention with EVA's split bias: q and v have biases, k has none (zeros in the fused qkv)."""

    def __init__(self, config: EvaViTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(config.width))
        self.v_bias = nn.Parameter(torch.zeros(config.width))
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, Dh]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class EvaMlp(nn.Module):
    def __init__(self, config: EvaViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_dim, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, config: EvaViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = EvaAttention(config)
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = EvaMlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BackboneWeightsError(RuntimeError):
    """A backbone weight file is missing or does not match the model's parameter layout."""


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensors-only state dict from safetensors or a ``weights_only`` torch file (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses pickled objects; report which file and why
        raise BackboneWeightsError(f"cannot read {path} as a weights-only torch file: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{path} does not hold a flat name -> tensor state dict")
    return state


class EvaViT(nn.Module):
    """EVA-CLIP ViT (pre-norm blocks, cls token, absolute position embedding, no layer scale)."""

    def __init__(self, config: EvaViTConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = EvaPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))
        self.blocks = nn.ModuleList(EvaBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.head = nn.Linear(width, config.embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels [B, 3, H, W] -> last-block tokens [B, 1 + N, C] (cls first, no final norm)."""
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"EvaViT expects {size}x{size} images, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding [B, embed_dim] from the normalised cls token."""
        return self.head(self.norm(self.forward_features(pixels))[:, 0])

    def load_backbone_weights(self, path: str | Path, prefix: str = "") -> None:
        """Load released EVA-CLIP weights strictly from a local file.

        ``prefix`` selects and strips a key prefix, e.g. ``"encoder."`` to take the backbone out of a
        full tokenizer checkpoint. Raises :class:`BackboneWeightsError` naming missing, unexpected and
        mis-shaped keys.
        """
        state = read_weight_file(path)
        if prefix:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mis_shaped = sorted(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(state) & set(expected)
            if state[k].shape != expected[k].shape
        )
        if missing or unexpected or mis_shaped:
            raise BackboneWeightsError(
                f"{path} does not match the EvaViT layout (prefix {prefix!r}): "
                f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}, "
                f"{len(mis_shaped)} mis-shaped {mis_shaped[:8]}"
            )
        self.load_state_dict(state, strict=True)
