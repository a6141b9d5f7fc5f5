"""L2-normalised vector quantizer with an EMA-updated codebook and dead-code restarts.

Why it looks like this: the lookup is the Video-LaVIT release's (cosine by Euclidean distance on the unit
sphere), so a released codebook gives the released ids; the codebook is a buffer updated by EMA (the BEiT-v2 /
LaVIT rule the release's ``decay`` comes from), so no optimiser, weight decay or DDP reduction ever touches it;
rarely used codes are restarted from encoder outputs; under ``torch.distributed`` every rank applies the same
update, so all ranks keep one codebook; and a release state dict, which stores the codebook only, loads with
``strict=True``. The rules in detail: ``VectorQuantizer``'s docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # [..., code_dim] fp32; equals the code in value, the input in gradient
    ids: torch.Tensor  # [...] long
    commit_loss: torch.Tensor  # scalar
    usage: torch.Tensor  # scalar: fraction of codes used by this batch (all ranks when training)
    perplexity: torch.Tensor  # scalar: exp(entropy) of this batch's code histogram


class Codebook(nn.Module):
    """Holds the code rows under the release's key ``embedding.weight`` (a buffer, see ``VectorQuantizer``)."""

    def __init__(self, num_codes: int, code_dim: int):
        super().__init__()
        self.register_buffer("weight", l2_normalize(torch.randn(num_codes, code_dim)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight.float())


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation of L2-normalised latents, with a straight-through estimator.

    * **Cosine lookup.** Encoder outputs are L2-normalised and the codebook rows are kept on the unit
      sphere, so the nearest code by Euclidean distance is the nearest by cosine. Distances are computed
      as ``|z|^2 + |e|^2 - 2 z.e`` against the stored rows, exactly like the Video-LaVIT release, so a
      released codebook gives the released ids.
    * **Codebook owned by the EMA, not by the optimiser.** ``embedding.weight`` (the release's key) is a
      *buffer*: no gradient ever reaches it (straight-through estimator, commitment loss on the detached
      code), so keeping it out of ``parameters()`` keeps it out of optimisers, weight decay and DDP's
      gradient reduction.
    * **EMA rule** (BEiT-v2 / LaVIT lineage, which the release's ``decay`` argument comes from). Per
      training step, with all-reduced per-code counts ``n_k`` and sums ``s_k`` of the normalised inputs:
      ``e_k <- normalise(decay * e_k + (1 - decay) * normalise(s_k / n_k))`` for every code with
      ``n_k > 0``; codes that received nothing do not move. ``cluster_size`` is the EMA of ``n_k``; its
      Laplace-smoothed share ``(c_k + eps) / (sum c + K eps)`` is the code's long-run usage, well defined
      from the first step on (all shares are uniform while nothing has been counted).
    * **Dead-code restarts.** Every ``dead_code_interval`` training steps, codes whose smoothed share is
      below ``dead_code_threshold / K`` (i.e. below that fraction of a uniform share) are replaced by
      random normalised encoder outputs of the current batch and given a uniform share of the EMA count,
      so they get time to be picked before they can be judged dead again.
    * **Distributed.** When ``torch.distributed`` is initialised, per-step counts and sums are
      all-reduced before the EMA (every rank applies the same update), and at each restart check rank 0
      picks the replacements and broadcasts codebook and ``cluster_size``, so all ranks keep one codebook.
      Only training-mode forwards communicate, so every rank must run them in step (as DDP does).
    * **Loading release checkpoints.** The release stores only ``embedding.weight``. ``cluster_size``
      and ``num_updates`` are persistent buffers (so exports and resumed runs keep them), and
      ``_load_from_state_dict`` fills them in when a state dict lacks them (zero counts, step 0), the same
      way ``BatchNorm`` treats ``num_batches_tracked``. A release state dict therefore loads with
      ``strict=True`` and nothing else is relaxed: any other missing or unexpected key still fails.
    """

    def __init__(self, num_codes: int = 1024, code_dim: int = 32, decay: float = 0.995,
                 commitment_beta: float = 1.0, dead_code_threshold: float = 0.03,
                 dead_code_interval: int = 100, eps: float = 1e-5):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.decay = decay
        self.commitment_beta = commitment_beta
        self.dead_code_threshold = dead_code_threshold
        self.dead_code_interval = dead_code_interval  # 0 disables restarts
        self.eps = eps
        self.embedding = Codebook(num_codes, code_dim)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    # ---- lookup -------------------------------------------------------------------------------

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest codes for already-normalised ``z`` [..., code_dim]."""
        flat = z.reshape(-1, self.code_dim).float()
        weight = self.embedding.weight.float()
        distance = flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * flat @ weight.t()
        return distance.argmin(dim=1).view(z.shape[:-1])

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Ids for raw encoder outputs [..., code_dim]; never touches the EMA state."""
        with torch.autocast(z.device.type, enabled=False):
            return self.nearest(l2_normalize(z.float()))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Code vectors [..., code_dim] (fp32) for ``ids``."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise ValueError(f"code ids must lie in [0, {self.num_codes}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return self.embedding(ids)

    # ---- training forward ----------------------------------------------------------------------

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` [..., code_dim]; in training mode also update the codebook (EMA, restarts)."""
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(l2_normalize(z.float()))

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        flat = z.reshape(-1, self.code_dim)
        ids = self.nearest(flat)
        codes = self.embedding(ids)  # a copy taken before this step's update
        counts = torch.bincount(ids, minlength=self.num_codes).float()
        if self.training:
            counts = self._ema_update(flat, ids, counts)
        commit_loss = self.commitment_beta * F.mse_loss(flat, codes.detach())
        quantized = flat + (codes - flat).detach()
        return QuantizerOutput(
            quantized=quantized.view(z.shape),
            ids=ids.view(z.shape[:-1]),
            commit_loss=commit_loss,
            usage=(counts > 0).float().mean(),
            perplexity=perplexity(counts),
        )

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Apply one EMA step; returns the (global) per-code counts of this step."""
        sums = torch.zeros(self.num_codes, self.code_dim, device=flat.device).index_add_(0, ids, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts.to(self.cluster_size.dtype), alpha=1 - self.decay)
        used = counts > 0
        weight = self.embedding.weight
        target = l2_normalize(sums[used] / counts[used, None])
        moved = l2_normalize(self.decay * weight[used].float() + (1 - self.decay) * target)
        weight[used] = moved.to(weight.dtype)
        self.num_updates += 1
        if self.dead_code_interval > 0 and int(self.num_updates) % self.dead_code_interval == 0:
            self._restart_dead_codes(flat)
        return counts

    def usage_share(self) -> torch.Tensor:
        """Laplace-smoothed long-run share of each code [num_codes] (sums to 1)."""
        size = self.cluster_size.float()
        return (size + self.eps) / (size.sum() + self.num_codes * self.eps)

    def dead_codes(self) -> torch.Tensor:
        """Boolean mask [num_codes] of codes below ``dead_code_threshold`` of a uniform share."""
        return self.usage_share() * self.num_codes < self.dead_code_threshold

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        weight = self.embedding.weight
        if not _distributed() or dist.get_rank() == 0:
            dead = self.dead_codes()
            n_dead = int(dead.sum())
            if n_dead:
                picks = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
                fair_share = self.cluster_size.sum() / self.num_codes
                weight[dead] = flat[picks].to(weight.dtype)
                self.cluster_size[dead] = fair_share
        if _distributed():
            dist.broadcast(weight, src=0)
            dist.broadcast(self.cluster_size, src=0)

    # ---- checkpoints --------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Release checkpoints carry only the codebook: start the EMA statistics afresh (class docstring).
        if prefix + "embedding.weight" in state_dict:
            state_dict.setdefault(prefix + "cluster_size", torch.zeros_like(self.cluster_size))
            state_dict.setdefault(prefix + "num_updates", torch.zeros_like(self.num_updates))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram: 1 when one code takes everything, K when all K are even."""
    probs = counts.float() / counts.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return entropy.exp()
