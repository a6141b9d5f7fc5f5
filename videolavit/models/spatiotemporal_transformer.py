"""Factorised space-time transformer blocks shared by the motion tokenizer and the motion-condition encoder.

A motion clip is a (T, H, W) grid of tokens. Full 3-D attention over 24x720 tokens is costly, so each
block attends within a frame (spatial), then along time at each location (temporal), then applies an
MLP. Module and parameter names follow the public Video-LaVIT release so its checkpoints load as-is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with the release's parameterisation.

    The release (BEiT lineage) keeps one bias-free ``qkv`` projection plus separate ``q_bias`` and
    ``v_bias``; the key bias is fixed at zero because a constant key offset cancels in the softmax.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, seq, dim]
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        batch, seq, _ = x.shape
        q, k, v = qkv.view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each [b, heads, seq, hd]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SpatioTemporalBlock(nn.Module):
    """Pre-norm block: x += spatial_attn(norm0 x); x += temporal_attn(norm1 x); x += mlp(norm2 x).

    Input and output are ``[batch, frames, positions, dim]`` (positions = H*W of the current grid).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-5,
                 qkv_bias: bool = True):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=norm_eps)
        self.spatial_attention = Attention(dim, num_heads, qkv_bias)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attention = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, positions, dim = x.shape
        x = x.reshape(batch * frames, positions, dim)
        x = x + self.spatial_attention(self.norm0(x))
        # regroup so each sequence is one spatial location over time: [b*positions, frames, dim]
        x = x.view(batch, frames, positions, dim).transpose(1, 2).reshape(batch * positions, frames, dim)
        x = x + self.temporal_attention(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.view(batch, positions, frames, dim).transpose(1, 2)


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases, the release's initialisation."""
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_token_embedding(layer: nn.Linear) -> None:
    """Fan-in (LeCun normal) init for a layer that turns a few input channels into tokens; zero bias.

    std 0.02 (``init_transformer_weights``) suits a ViT patch embedding, whose fan-in of 768 pixels
    makes unit-scale tokens. A motion vector has fan-in 2 (and on sparse fields most vectors are zero),
    a unit-norm code ``code_dim``: std 0.02 gives tokens of ~0.005-0.02 rms, below the std-0.02
    position embeddings and below what a few Adam steps add to the content-independent (mean) part of
    the residual stream. Behind LayerNorms (pre-norm blocks, final norms) that mean then owns the
    normalised features, every clip looks the same, the gradient reaching the content path shrinks as
    1/|mean| and the model settles on predicting the mean (the motion tokenizer stalled at "no motion",
    val/recon_ratio ~1). With fan-in init the content dominates the stream from the first step.
    Initialisation only: names and shapes (the release layout) are unchanged.
    """
    nn.init.normal_(layer.weight, std=layer.weight.shape[1] ** -0.5)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
