"""LaVIT dynamic keyframe tokenizer: frozen EVA-CLIP ViT -> token selector -> token merger -> codebook.

A keyframe becomes a *variable* number of discrete codes (about a third of the patches in the release:
docs/measurements.md): the selector keeps the informative patches, the merger folds what the dropped patches carry
into the kept ones, and each kept token is quantised to its nearest entry of an L2-normalised codebook.
Parameter names follow the release (``encoder.``, ``token_predictor.``, ``causal_encoder.``,
``encode_task_layer.``, ``quantize.``, ``vit_proj.``) so released checkpoints load strictly (the codebook's
EMA statistics, which the release does not store, start afresh: see ``vector_quantizer``).

Selection: training draws hard Gumbel-softmax samples (straight-through, so the reconstruction's gradient
reaches the selector through the merger's attention weights). Outside training the default is the
deterministic ``p(keep) >= 0.5``; the release's inference code samples instead (``eval_selection="sample"``).
A batch's images keep different numbers of tokens: :class:`KeyframeEncoding` packs and pads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from videolavit.models.eva_vit import EvaViT, EvaViTConfig
from videolavit.models.vector_quantizer import VectorQuantizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
POLICY_EPS = 1e-6  # smoothing of the release's masked softmax; part of the trained function


@dataclass
class KeyframeTokenizerConfig:
    """Sizes of the keyframe tokenizer; defaults are the release's (EVA-CLIP ViT-g/14, 16384x32 codes)."""

    vit: EvaViTConfig = field(default_factory=EvaViTConfig)
    merger_depth: int = 12
    merger_heads: int = 16
    merger_mlp_dim: int = 6144
    norm_eps: float = 1e-5
    num_codes: int = 16384
    code_dim: int = 32
    llm_dim: int = 4096  # width of ``vit_proj`` (LLaMA-7B embeddings), see KeyframeTokenizer.llm_features
    # Codebook training (see vector_quantizer): EMA decay as in BEiT-v2's VQ-KD, which LaVIT follows.
    ema_decay: float = 0.99
    commitment_beta: float = 1.0
    dead_code_threshold: float = 0.03
    dead_code_interval: int = 100
    pixel_mean: tuple[float, float, float] = CLIP_MEAN
    pixel_std: tuple[float, float, float] = CLIP_STD
    gumbel_tau: float = 1.0
    # Selection outside training: "threshold" keeps patches with p(keep) >= keep_threshold
    # (deterministic); "sample" draws hard Gumbel samples like the release's inference code.
    eval_selection: str = "threshold"
    keep_threshold: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.vit, dict):  # from JSON exports / YAML
            self.vit = EvaViTConfig(**self.vit)
        self.pixel_mean = tuple(self.pixel_mean)
        self.pixel_std = tuple(self.pixel_std)
        if self.eval_selection not in ("threshold", "sample"):
            raise ValueError(f"eval_selection must be 'threshold' or 'sample', got {self.eval_selection!r}")
        if self.vit.width % self.merger_heads:
            raise ValueError(f"ViT width {self.vit.width} is not divisible by merger_heads {self.merger_heads}")


@dataclass
class KeyframeEncoding:
    """Tokens of a batch of keyframes, packed left and padded.

    Images of a batch keep different numbers of tokens, so their tokens are packed to the left in patch raster order
    and padded on the right to ``L = max(lengths)``: ``ids`` is ``-1`` at padding, ``mask`` is False there and
    ``codes``/``latents`` are zero. Every image keeps at least one token (if the selector drops all, its most
    confident patch is kept).
    """

    ids: torch.Tensor  # [B, L] long, -1 at padding
    codes: torch.Tensor  # [B, L, D] quantised codes (straight-through in training), 0 at padding
    latents: torch.Tensor  # [B, L, D] L2-normalised pre-quantisation latents, 0 at padding
    mask: torch.Tensor  # [B, L] bool, True for real tokens
    lengths: torch.Tensor  # [B] long, >= 1
    positions: torch.Tensor  # [B, L] long, patch index of each token, -1 at padding
    keep: torch.Tensor  # [B, N] 0/1 per patch (straight-through Gumbel sample in training)
    keep_log_probs: torch.Tensor  # [B, N, 2] log p(keep), log p(drop)
    vit_features: torch.Tensor  # [B, N, C] frozen ViT patch features: the reconstruction target
    commitment_loss: torch.Tensor  # scalar, already weighted by commitment_beta
    usage: torch.Tensor  # scalar, share of codes this batch used
    perplexity: torch.Tensor  # scalar, exp(entropy) of this batch's code histogram


def _policy_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The release's masked softmax: exp(s - max) * allowed, smoothed by eps so fully masked rows stay finite.

    ``allowed`` is a differentiable 0/1 weight (straight-through Gumbel), which is how gradients of the
    reconstruction reach the selector.
    """
    n = scores.shape[-1]
    scores = scores.float()
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp() * allowed.float()
    return (weights + POLICY_EPS / n) / (weights.sum(dim=-1, keepdim=True) + POLICY_EPS)


class TokenSelector(nn.Module):
    """Scores each patch as keep/drop from its own features and the image's mean features (2 log-probs)."""

    def __init__(self, width: int, norm_eps: float):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(width, eps=norm_eps), nn.Linear(width, width), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(width, width // 2),
            nn.GELU(),
            nn.Linear(width // 2, width // 4),
            nn.GELU(),
            nn.Linear(width // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, 2] log-probabilities, index 0 = keep (release convention)."""
        x = self.in_conv(features)
        half = x.shape[-1] // 2
        local, global_ = x[..., :half], x[..., half:].mean(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local, global_.expand(-1, x.shape[1], -1)], dim=-1))


class TokenCausalAttention(nn.Module):
    """Causal self-attention in which each token sees itself and the *kept* tokens before it."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5  # [B, H, N, N]
        eye = torch.eye(n, dtype=keep.dtype, device=keep.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()
        allowed = (keep[:, None, None, :] * (1 - eye) + eye) * causal  # [B, 1, N, N]
        out = _policy_softmax(scores, allowed).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TokenCrossAttention(nn.Module):
    """Every token queries the *dropped* tokens' (normalised raw ViT) features."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, source: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, dh = self.num_heads, c // self.num_heads
        q = self.query(x).reshape(b, n, h, dh).transpose(1, 2)
        k = self.key(source).reshape(b, -1, h, dh).transpose(1, 2)
        v = self.value(source).reshape(b, -1, h, dh).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * dh**-0.5
        out = _policy_softmax(scores, (1 - keep)[:, None, None, :]).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MergerMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenMergerBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_dim: int, norm_eps: float):
        super().__init__()
        self.norm0 = nn.LayerNorm(width, eps=norm_eps)
        self.token_causal_attn = TokenCausalAttention(width, num_heads)
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.token_cross_attn = TokenCrossAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MergerMlp(width, mlp_dim)

    def forward(self, x: torch.Tensor, source: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.token_causal_attn(self.norm0(x), keep)
        x = x + self.token_cross_attn(self.norm1(x), source, keep)
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    """Runs over all N patches with the keep decision as attention weights; only kept outputs are used."""

    def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, norm_eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(TokenMergerBlock(width, num_heads, mlp_dim, norm_eps) for _ in range(depth))
        self.ln_vision = nn.LayerNorm(width, eps=norm_eps)
        self.norm = nn.LayerNorm(width, eps=norm_eps)

    def forward(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """features [B, N, C] raw ViT patch features, keep [B, N] -> merged [B, N, C]."""
        source = self.ln_vision(features)  # what the cross-attention reads from dropped patches
        x = features
        for block in self.blocks:
            x = block(x, source, keep)
        return self.norm(x)


class KeyframeTokenizer(nn.Module):
    """Images in [0, 1] -> variable-length keyframe codes (see :class:`KeyframeEncoding`)."""

    def __init__(self, config: KeyframeTokenizerConfig):
        super().__init__()
        self.config = config
        width = config.vit.width
        self.encoder = EvaViT(config.vit)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.token_predictor = TokenSelector(width, config.norm_eps)
        self.causal_encoder = TokenMerger(
            width, config.merger_depth, config.merger_heads, config.merger_mlp_dim, config.norm_eps
        )
        self.quantize = VectorQuantizer(
            num_codes=config.num_codes, code_dim=config.code_dim, decay=config.ema_decay,
            commitment_beta=config.commitment_beta, dead_code_threshold=config.dead_code_threshold,
            dead_code_interval=config.dead_code_interval)
        self.encode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, config.code_dim))
        # Projection of merged (continuous, unquantised) tokens into the LLM's embedding space: the release
        # feeds these to the LLM for *understanding* (its ``encode_features``); it plays no part in
        # tokenisation or in the tokenizer's training objective.
        self.vit_proj = nn.Linear(width, config.llm_dim)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)
        self._init_trainable()

    def _init_trainable(self) -> None:
        for module in (self.token_predictor, self.causal_encoder, self.encode_task_layer, self.vit_proj):
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.trunc_normal_(sub.weight, std=0.02)
                    nn.init.zeros_(sub.bias)

    def train(self, mode: bool = True) -> KeyframeTokenizer:
        super().train(mode)
        self.encoder.eval()  # frozen backbone: never in training mode
        return self

    # ----- stages of the pipeline -------------------------------------------------------------------

    def vit_patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> frozen ViT patch features [B, N, C] (no grad)."""
        with torch.no_grad():
            pixels = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
            return self.encoder.forward_features(pixels)[:, 1:]

    def select(self, log_probs: torch.Tensor) -> torch.Tensor:
        """[B, N, 2] log-probs -> keep [B, N] in {0, 1}; differentiable (straight-through Gumbel) in training."""
        cfg = self.config
        if self.training or cfg.eval_selection == "sample":
            keep = F.gumbel_softmax(log_probs.float(), tau=cfg.gumbel_tau, hard=True)[..., 0]
        else:
            keep = (log_probs[..., 0].float().exp() >= cfg.keep_threshold).float()
        # At least one token per image: force the most confident patch of any image left empty.
        best = F.one_hot(log_probs[..., 0].argmax(dim=1), keep.shape[1]).bool()
        empty = (keep.detach().sum(dim=1, keepdim=True) == 0) & best
        return torch.where(empty, torch.ones_like(keep), keep)

    def encode(self, images: torch.Tensor) -> KeyframeEncoding:
        """Images [B, 3, H, W] in [0, 1] -> packed, padded codes plus what the training losses need."""
        features = self.vit_patch_features(images)
        log_probs = self.token_predictor(features)
        keep = self.select(log_probs)
        merged = self.causal_encoder(features, keep)
        positions, mask = _pack_kept(keep)
        b, length = mask.shape
        kept = torch.gather(merged, 1, positions.clamp(min=0)[..., None].expand(-1, -1, merged.shape[-1]))

        # Only real (kept) tokens reach the quantizer, so only they move the codebook's EMA.
        with torch.autocast(device_type=images.device.type, enabled=False):  # the code path runs in fp32
            raw = self.encode_task_layer(kept[mask].to(self.encode_task_layer[0].weight.dtype))  # [M, D]
            quantized = self.quantize(raw)  # codes in value, straight-through gradient to ``raw``
        latents, codes, ids = F.normalize(raw, dim=-1), quantized.quantized, quantized.ids

        d = self.config.code_dim
        packed_latents = latents.new_zeros(b, length, d).masked_scatter(mask[..., None], latents)
        packed_codes = codes.new_zeros(b, length, d).masked_scatter(mask[..., None], codes)
        packed_ids = torch.full((b, length), -1, dtype=torch.long, device=ids.device).masked_scatter(mask, ids)
        return KeyframeEncoding(
            ids=packed_ids,
            codes=packed_codes,
            latents=packed_latents,
            mask=mask,
            lengths=mask.sum(dim=1),
            positions=positions,
            keep=keep,
            keep_log_probs=log_probs,
            vit_features=features,
            commitment_loss=quantized.commit_loss,
            usage=quantized.usage,
            perplexity=quantized.perplexity,
        )

    forward = encode

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (ids [B, L] padded with -1, lengths [B]); the LLM vocabulary offset is added elsewhere."""
        encoding = self.encode(images)
        return encoding.ids, encoding.lengths

    def codes_from_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] padded with -1 (e.g. generated by the LLM) -> (codes [B, L, D] zero at padding, mask)."""
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.config.num_codes):
            raise ValueError(f"code ids must be -1 (padding) or lie in [0, {self.config.num_codes}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        mask = ids >= 0
        codes = self.quantize.lookup(ids.clamp(min=0)) * mask[..., None]
        return codes, mask

    def llm_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous understanding features: kept merged tokens through ``vit_proj`` -> ([B, L, llm_dim], mask)."""
        features = self.vit_patch_features(images)
        keep = self.select(self.token_predictor(features))
        merged = self.vit_proj(self.causal_encoder(features, keep))
        positions, mask = _pack_kept(keep)
        out = torch.gather(merged, 1, positions.clamp(min=0)[..., None].expand(-1, -1, merged.shape[-1]))
        return out * mask[..., None], mask


def _pack_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B, N] -> (patch index of each kept token packed left [B, L] with -1 padding, mask [B, L])."""
    kept = keep.detach() > 0.5
    lengths = kept.sum(dim=1)
    order = torch.argsort((~kept).to(torch.int32), dim=1, stable=True)  # kept patches first, raster order
    length = int(lengths.max())
    mask = torch.arange(length, device=keep.device)[None] < lengths[:, None]
    positions = torch.where(mask, order[:, :length], torch.full_like(order[:, :length], -1))
    return positions, mask
