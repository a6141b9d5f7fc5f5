"""Video samples for every logger, and as mp4 files, every validation.

A stage that can show videos implements ``sample_videos(batch) -> {"videos": uint8 [B, T, 3, H, W],
"captions": list[str] (optional)}`` — reconstructions, generations, or renderings of motion fields.
The logger keeps the first validation batch of rank 0 as a fixed set, so samples are comparable
across steps. Each logger gets the samples through its own public API: loggers that play videos
(``log_video``, e.g. W&B) get the mp4 files, TensorBoard and loggers with ``log_image`` get a
filmstrip of frames per video; mp4 files are written under ``{log_dir}/samples`` unless turned off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from videolavit.video.writer import write_mp4


def filmstrip(clip: np.ndarray, max_frames: int = 8) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [H, n·W, 3]: up to ``max_frames`` frames taken evenly, side by side."""
    index = np.linspace(0, len(clip) - 1, num=min(max_frames, len(clip))).round().astype(int)
    return np.concatenate(list(clip[index]), axis=1)


class VideoSampleLogger(pl.Callback):
    """Args:
        num_videos: how many videos of the fixed batch to log.
        fps: playback rate of the mp4 files (the decomposition's 6 fps by default).
        every_n_validations: log on every n-th validation run.
        write_files: write ``{log_dir}/samples/step{N}_{i}.mp4`` (video loggers then get the files, else arrays).
        filmstrip_frames: frames per filmstrip image (TensorBoard and ``log_image`` loggers).
    """

    def __init__(self, num_videos: int = 4, fps: int = 6, every_n_validations: int = 1, write_files: bool = True,
                 filmstrip_frames: int = 8):
        self.num_videos, self.fps, self.write_files = num_videos, fps, write_files
        self.every_n_validations, self.filmstrip_frames = every_n_validations, filmstrip_frames
        self._batch: Any = None
        self._validations = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._batch is None and batch_idx == 0 and dataloader_idx == 0 and trainer.global_rank == 0:
            self._batch = batch

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._batch is None:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        if not hasattr(pl_module, "sample_videos"):
            raise TypeError(f"VideoSampleLogger needs {type(pl_module).__name__}.sample_videos(batch); "
                            "remove the callback for stages that cannot show videos")
        self._log(trainer, pl_module)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            out = pl_module.sample_videos(self._batch)
        videos = out["videos"][: self.num_videos].detach().cpu()
        if videos.dtype != torch.uint8 or videos.dim() != 5:
            raise ValueError(f"sample_videos must return uint8 [B, T, 3, H, W], got {videos.dtype} {list(videos.shape)}")
        captions = [str(c) for c in (out.get("captions") or [])][: len(videos)]
        captions += [""] * (len(videos) - len(captions))
        step = trainer.global_step
        frames = videos.permute(0, 1, 3, 4, 2).numpy()  # [B, T, H, W, 3]
        root = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        if self.write_files:
            clips = [str(write_mp4(clip, root / f"step{step:07d}_{i}.mp4", fps=self.fps)) for i, clip in enumerate(frames)]
        else:
            clips = list(videos.numpy())  # [T, 3, H, W] each, the layout video loggers take for arrays
        strips = [filmstrip(clip, self.filmstrip_frames) for clip in frames]
        for logger in trainer.loggers:
            if hasattr(logger, "log_video"):
                logger.log_video(key="samples", videos=clips, step=step, caption=captions, fps=[self.fps] * len(clips),
                                 format=["mp4"] * len(clips))
            elif isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                for i, strip in enumerate(strips):
                    writer.add_image(f"samples/{i}", strip, step, dataformats="HWC")
                    if captions[i]:
                        writer.add_text(f"samples/{i}/caption", captions[i], step)
                writer.flush()
            elif hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=strips, step=step, caption=captions)
