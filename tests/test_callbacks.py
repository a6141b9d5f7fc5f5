"""Evaluation and logging callbacks inside a real (tiny) fit: scalars and videos reach TensorBoard."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.batch_measures import samples, tokens
from callbacks.generation_metrics import VideoGenerationMetrics
from callbacks.video_samples import VideoSampleLogger, filmstrip
from tests.tiny_models import CLIP_IMAGE_SIZE, StyleGanVDetector, build_tiny_clip
from videolavit.metrics.weights import MissingWeightsError

FRAMES, SIZE = 8, CLIP_IMAGE_SIZE


def _video_batches(count: int, batch: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"frames": torch.randint(0, 256, (batch, FRAMES, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator),
             "caption": ["a red circle moving left"] * batch} for _ in range(count)]


class ToyVideoStage(pl.LightningModule):
    """Reconstructs its input videos exactly, or a black video when ``perfect`` is False."""

    def __init__(self, perfect: bool):
        super().__init__()
        self.perfect = perfect
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum() + 0 * batch["frames"].float().mean()

    def validation_step(self, batch, batch_idx):
        return None

    def sample_videos(self, batch):
        videos = batch["frames"] if self.perfect else torch.zeros_like(batch["frames"])
        return {"videos": videos, "captions": batch["caption"]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_weights")
    detector = root / "i3d_torchscript.pt"
    torch.jit.script(StyleGanVDetector(num_features=400)).save(str(detector))
    _, _, clip_dir = build_tiny_clip(root)
    return str(detector), str(clip_dir)


def _fit(tmp_path, perfect: bool, metric_weights) -> dict[str, list]:
    i3d, clip = metric_weights
    logger = TensorBoardLogger(str(tmp_path), name="toy")
    trainer = pl.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=3, logger=logger, accelerator="cpu",
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, log_every_n_steps=1,
                         callbacks=[VideoSampleLogger(num_videos=2),
                                    VideoGenerationMetrics(i3d_path=i3d, clip_path=clip, fvd_num_frames=8,
                                                           fvd_resolution=SIZE),
                                    ThroughputMonitor(batch_size_fn=samples, window_size=2)])
    trainer.fit(ToyVideoStage(perfect), DataLoader(_video_batches(8), batch_size=None),
                DataLoader(_video_batches(3), batch_size=None))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return {"scalars": {t: events.Scalars(t) for t in events.Tags()["scalars"]}, "images": events.Tags()["images"],
            "log_dir": logger.log_dir}


def test_metrics_and_videos_reach_tensorboard(tmp_path, metric_weights):
    perfect = _fit(tmp_path / "perfect", True, metric_weights)
    black = _fit(tmp_path / "black", False, metric_weights)
    assert [e.step for e in perfect["scalars"]["val/fvd"]] == [1, 3]
    assert all(abs(e.value) < 1e-3 for e in perfect["scalars"]["val/fvd"])  # FVD(X, X) = 0
    assert all(e.value > 1e-2 for e in black["scalars"]["val/fvd"])
    clipsim = perfect["scalars"]["val/clipsim"][-1].value
    assert -1.0 <= clipsim <= 1.0 and clipsim != black["scalars"]["val/clipsim"][-1].value
    assert any(t.endswith("samples_per_sec") for t in perfect["scalars"])
    assert set(perfect["images"]) >= {"samples/0", "samples/1"}
    clips = sorted((tmp_path / "perfect").rglob("samples/*.mp4"))
    assert len(clips) == 4  # 2 videos × 2 validations
    with av.open(str(clips[0])) as container:
        stream = container.streams.video[0]
        assert stream.frames == FRAMES and stream.average_rate == 6


def test_missing_weights_name_the_option(tmp_path):
    with pytest.raises(MissingWeightsError, match="i3d_path"):
        VideoGenerationMetrics(i3d_path=str(tmp_path / "missing.pt")).setup(None, None, "fit")
    with pytest.raises(MissingWeightsError, match="clip_path"):
        VideoGenerationMetrics()


def test_batch_measures():
    assert samples({"key": ["a", "b"], "motion": torch.zeros(2, 3)}) == 2
    assert tokens({"input_ids": torch.zeros(2, 5), "labels": torch.tensor([[1, -100, 2, -100, 3]] * 2)}) == 6


class VideoPlayingLogger(Logger):
    """A logger with a ``log_video`` method, as W&B's: it should receive the mp4 files."""

    def __init__(self):
        super().__init__()
        self.videos = []

    @property
    def name(self):
        return "videos"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_video(self, key, videos, step=None, **kwargs):
        self.videos.append((key, list(videos), step, kwargs))


def test_video_samples_reach_any_logger(tmp_path):
    player = VideoPlayingLogger()
    csv = CSVLogger(str(tmp_path), name="csv")
    trainer = pl.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, logger=[csv, player],
                         accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                         num_sanity_val_steps=0, callbacks=[VideoSampleLogger(num_videos=2)])
    trainer.fit(ToyVideoStage(True), DataLoader(_video_batches(2), batch_size=None),
                DataLoader(_video_batches(1), batch_size=None))
    assert len(player.videos) == 1
    key, files, step, extra = player.videos[0]
    assert key == "samples" and step == 2 and extra["caption"] == ["a red circle moving left"] * 2
    assert extra["format"] == ["mp4", "mp4"] and all(f.endswith(".mp4") and Path(f).is_file() for f in files)
    assert len(list(Path(trainer.log_dir).rglob("samples/*.mp4"))) == 2  # written whatever the loggers are


def test_filmstrip_takes_frames_evenly():
    clip = np.stack([np.full((2, 3, 3), t, dtype=np.uint8) for t in range(24)])
    strip = filmstrip(clip, max_frames=4)
    assert strip.shape == (2, 12, 3)
    assert [int(strip[0, 3 * i, 0]) for i in range(4)] == [0, 8, 15, 23]
    assert filmstrip(clip[:2], max_frames=8).shape == (2, 6, 3)
