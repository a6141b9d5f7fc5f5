"""Decoder of keyframe codes into ViT features and into the keyframe U-Net's conditions (LaVIT's
``HighresVQDecoder``).

A fixed set of learned queries (one per ViT patch) cross-attends to the variable number of codes, so
the output always has the 256 patch positions whatever the image kept. Stage 1 trains it to reconstruct
the frozen ViT patch features (cosine, see ``keyframe_tokenizer_loss``); the keyframe detokenizer then
turns these features into an SDXL-style condition: a 2048-d context per patch (768 ‖ 1280 projections)
and a pooled 1280-d vector. Parameter names follow the release so its checkpoint loads strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MASKED_SCORE = -10000.0  # additive score of padding codes, as in the release (finite: no NaN if all padded)


@dataclass
class KeyframeFeatureDecoderConfig:
    """Sizes of the code -> feature decoder; defaults are the release's."""

    code_dim: int = 32
    width: int = 1408
    depth: int = 12
    num_heads: int = 16
    mlp_dim: int = 6144
    num_queries: int = 256  # ViT patches reconstructed (16 x 16)
    max_codes: int = 256  # longest code sequence (positions of ``pos_embed``)
    feature_dim: int = 1408  # reconstructed ViT feature width
    unet_context_dims: tuple[int, int] = (768, 1280)  # SDXL's two text-encoder widths, concatenated
    unet_pooled_dim: int = 1280
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.unet_context_dims = tuple(self.unet_context_dims)
        for name, dim in (("width", self.width), ("feature_dim", self.feature_dim)):
            if dim % self.num_heads:
                raise ValueError(f"{name} {dim} is not divisible by num_heads {self.num_heads}")

    @property
    def unet_context_dim(self) -> int:
        return sum(self.unet_context_dims)


class DecoderSelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderCrossAttention(nn.Module):
    """Queries attend to the real (unpadded) codes."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, codes: torch.Tensor, score_bias: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, dh = self.num_heads, c // self.num_heads
        q = self.query(x).reshape(b, n, h, dh).transpose(1, 2)
        k = self.key(codes).reshape(b, -1, h, dh).transpose(1, 2)
        v = self.value(codes).reshape(b, -1, h, dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=score_bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DecoderBlock(nn.Module):
    def __init__(self, config: KeyframeFeatureDecoderConfig):
        super().__init__()
        w = config.width
        self.norm0 = nn.LayerNorm(w, eps=config.norm_eps)
        self.self_attn = DecoderSelfAttention(w, config.num_heads)
        self.norm1 = nn.LayerNorm(w, eps=config.norm_eps)
        self.cross_attn = DecoderCrossAttention(w, config.num_heads)
        self.norm2 = nn.LayerNorm(w, eps=config.norm_eps)
        self.mlp = DecoderMlp(w, config.mlp_dim)

    def forward(self, x: torch.Tensor, codes: torch.Tensor, score_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), codes, score_bias)
        return x + self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    """CLIP-style attention pooling: the mean token (plus position) attends over all tokens -> one vector."""

    def __init__(self, num_tokens: int, width: int, num_heads: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(num_tokens + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, out_dim]."""
        b, _, c = x.shape
        h, dh = self.num_heads, c // self.num_heads
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        q = self.q_proj(x[:, :1]).reshape(b, 1, h, dh).transpose(1, 2)  # only the mean token's output is used
        k = self.k_proj(x).reshape(b, -1, h, dh).transpose(1, 2)
        v = self.v_proj(x).reshape(b, -1, h, dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).reshape(b, c)
        return self.c_proj(out)


class KeyframeFeatureDecoder(nn.Module):
    """Codes [B, L, code_dim] + mask -> ViT features [B, num_queries, feature_dim] -> U-Net condition."""

    def __init__(self, config: KeyframeFeatureDecoderConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.in_proj = nn.Linear(config.code_dim, w)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.max_codes, w))  # position within the code sequence
        self.query_embed = nn.Parameter(torch.zeros(1, config.num_queries, w))  # one query per patch
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(w, eps=config.norm_eps)
        self.decode_task_layer = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, config.feature_dim))
        context_1, context_2 = config.unet_context_dims
        self.unet_proj_1 = nn.Linear(config.feature_dim, context_1)
        self.unet_proj_2 = nn.Linear(config.feature_dim, context_2)
        self.unet_attnpool = AttentionPool(config.num_queries, config.feature_dim, config.num_heads,
                                           config.unet_pooled_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # The release initialises both embeddings to zeros, which makes all queries identical at step 0;
        # small random values break that symmetry from the start.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.query_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """codes [B, L, code_dim] (padding anywhere ``mask`` is False) -> features [B, num_queries, feature_dim]."""
        b, length, _ = codes.shape
        if length > self.config.max_codes:
            raise ValueError(f"{length} codes exceed the decoder's max_codes={self.config.max_codes}")
        x = self.in_proj(codes) + self.pos_embed[:, :length]
        score_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, MASKED_SCORE)
        score_bias = score_bias[:, None, None, :]  # [B, 1, 1, L]
        queries = self.query_embed.expand(b, -1, -1)
        for block in self.blocks:
            queries = block(queries, x, score_bias)
        return self.decode_task_layer(self.norm(queries))

    def unet_condition(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, N, feature_dim] -> (context [B, N, 768 + 1280], pooled [B, 1280]) for the keyframe U-Net."""
        context = torch.cat([self.unet_proj_1(features), self.unet_proj_2(features)], dim=-1)
        return context, self.unet_attnpool(features)
