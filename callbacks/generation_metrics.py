"""FVD and CLIPSIM on a fixed validation set, computed on all ranks during validation (paper A.4).

The stage provides ``sample_videos(batch) -> {"videos": uint8 [B, T, 3, H, W], "captions": [...]}``
(its generations or reconstructions for the batch); real videos are the batch's ``frames`` (the
DataModule's ``video`` view). Metric state is reduced across ranks by torchmetrics, so every rank
evaluates its own share of the validation set. Logged as ``val/fvd`` and ``val/clipsim``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from videolavit.metrics.clip_similarity import CLIPSimilarity
from videolavit.metrics.fvd import FrechetVideoDistance
from videolavit.metrics.weights import MissingWeightsError


def to_symmetric(videos: torch.Tensor) -> torch.Tensor:
    """uint8 [B, T, 3, H, W] -> float in [-1, 1] (the metrics' input convention)."""
    return videos.float().div(127.5).sub(1.0)


class VideoGenerationMetrics(pl.Callback):
    """Args:
        i3d_path: local I3D weights (pytorch-i3d state dict or TorchScript detector); None: no FVD.
        clip_path: local CLIP directory (ViT-B/16 in the paper); None: no CLIPSIM.
        max_batches: validation batches per rank to evaluate (None: all).
        real_statistics_path: cached real-side FVD statistics (computed once, then reused).
        fvd_num_frames / fvd_resolution: the FVD protocol (16 frames at 224², paper A.4).
    """

    def __init__(self, i3d_path: str | None = None, clip_path: str | None = None, max_batches: int | None = None,
                 real_statistics_path: str | None = None, fvd_num_frames: int = 16, fvd_resolution: int = 224):
        if i3d_path is None and clip_path is None:
            raise MissingWeightsError("VideoGenerationMetrics: set `i3d_path` (FVD) and/or `clip_path` (CLIPSIM)")
        self.i3d_path, self.clip_path, self.max_batches = i3d_path, clip_path, max_batches
        self.real_statistics_path = real_statistics_path
        self.fvd_num_frames, self.fvd_resolution = fvd_num_frames, fvd_resolution
        self.fvd: FrechetVideoDistance | None = None
        self.clipsim: CLIPSimilarity | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            if self.i3d_path is not None and self.fvd is None:
                self.fvd = FrechetVideoDistance(self.i3d_path, num_frames=self.fvd_num_frames,
                                                resolution=self.fvd_resolution,
                                                real_statistics_path=self.real_statistics_path,
                                                reset_real_features=self.real_statistics_path is None)
            if self.clip_path is not None and self.clipsim is None:
                self.clipsim = CLIPSimilarity(self.clip_path)
        except MissingWeightsError as exc:
            raise MissingWeightsError(f"VideoGenerationMetrics: {exc}") from None

    def _metrics(self) -> list:
        return [m for m in (self.fvd, self.clipsim) if m is not None]

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        for metric in self._metrics():
            metric.to(pl_module.device)
            metric.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        with torch.no_grad():
            out = pl_module.sample_videos(batch)
        fake = to_symmetric(out["videos"])
        if self.fvd is not None:
            if "frames" not in batch:
                raise KeyError("VideoGenerationMetrics: FVD needs real videos as batch['frames'] (the `video` view)")
            if self.real_statistics_path is None:
                self.fvd.update(to_symmetric(batch["frames"]), real=True)
            self.fvd.update(fake, real=False)
        if self.clipsim is not None:
            self.clipsim.update(fake, out.get("captions") or batch["caption"])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        if self.fvd is not None:
            pl_module.log("val/fvd", self.fvd.compute().float(), rank_zero_only=True)
        if self.clipsim is not None:
            pl_module.log("val/clipsim", self.clipsim.compute().float(), rank_zero_only=True)
