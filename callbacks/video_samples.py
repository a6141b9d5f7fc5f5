"""Video samples in TensorBoard (animated GIFs in the Images tab) and as mp4 files, every validation.

A stage that can show videos implements ``sample_videos(batch) -> {"videos": uint8 [B, T, 3, H, W],
"captions": list[str] (optional)}`` — reconstructions, generations, or renderings of motion fields.
The logger keeps the first validation batch of rank 0 as a fixed set, so samples are comparable
across steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary

from videolavit.video.writer import encode_gif, write_mp4


class VideoSampleLogger(pl.Callback):
    """Args:
        num_videos: how many videos of the fixed batch to log.
        fps: playback rate of the GIFs and mp4 files (the decomposition's 6 fps by default).
        every_n_validations: log on every n-th validation run.
        write_files: also write ``{log_dir}/samples/step{N}_{i}.mp4``.
    """

    def __init__(self, num_videos: int = 4, fps: int = 6, every_n_validations: int = 1, write_files: bool = True):
        self.num_videos, self.fps = num_videos, fps
        self.every_n_validations, self.write_files = every_n_validations, write_files
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
        captions = list(out.get("captions") or [])
        if videos.dtype != torch.uint8 or videos.dim() != 5:
            raise ValueError(f"sample_videos must return uint8 [B, T, 3, H, W], got {videos.dtype} {list(videos.shape)}")
        step = trainer.global_step
        frames = videos.permute(0, 1, 3, 4, 2).numpy()  # [B, T, H, W, 3]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                for i, clip in enumerate(frames):
                    image = Summary.Image(height=clip.shape[1], width=clip.shape[2], colorspace=3,
                                          encoded_image_string=encode_gif(clip, self.fps))
                    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=f"samples/{i}", image=image)]),
                                                          step)
                    if i < len(captions):
                        writer.add_text(f"samples/{i}/caption", captions[i], step)
                writer.flush()
        if self.write_files:
            root = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
            for i, clip in enumerate(frames):
                write_mp4(clip, root / f"step{step:07d}_{i}.mp4", fps=self.fps)
