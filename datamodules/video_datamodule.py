"""The one DataModule: WebDataset shards of decomposed videos → dict batches for any stage.

Training reads resampled shards (an infinite stream, seeded per rank and worker) cut into epochs of
``samples_per_epoch``; validation reads each shard once, split across ranks and workers, in a fixed
order. ``batch_size`` is the *global* batch: each rank gets ``batch_size / (world_size ×
accumulate_grad_batches)``. Broken shards and samples are skipped, logged with their key and reason,
counted and reported as ``data/skipped/<reason>``.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_info

from datamodules import skip_tracker
from datamodules.shard_list import resolve_shards, split_by_rank
from datamodules.skip_tracker import SKIPS, SKIPS_KEY
from datamodules.tar_reader import tar_samples
from datamodules.views import SampleView, build_view

log = logging.getLogger(__name__)


def _worker_seed(rank: int) -> int:
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def _take_rank_samples(samples: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    for index, sample in enumerate(samples):
        if index % world_size == rank:
            yield sample


def _split_by_worker(urls: Iterator[dict]) -> Iterator[dict]:
    info = torch.utils.data.get_worker_info()
    if info is None:
        yield from urls
        return
    for index, url in enumerate(urls):
        if index % info.num_workers == info.id:
            yield url


class _ViewStage:
    """Pipeline stage applying a view; picklable so DataLoader workers can be spawned."""

    def __init__(self, view: SampleView, train: bool, seed: int, rank: int):
        self.view, self.train, self.seed, self.rank = view, train, seed, rank

    def __call__(self, samples):
        SKIPS.start_stream()  # runs when the pipeline is built in its process, before any read
        return self.view(samples, train=self.train, rng=random.Random(_worker_seed(self.rank) + 7919 * self.seed))


class VideoDataModule(pl.LightningDataModule):
    """Shared by every stage; the ``view`` decides what a batch holds.

    Args:
        train_shards: prepared directory, manifest, brace/glob pattern, remote URL, or a list of these.
        val_shards: same, for deterministic validation (None: no validation).
        view: a built-in view name (``motion``, ``video``, ``keyframe``) or a ``SampleView``.
        batch_size: global batch size (all ranks and accumulation steps together).
        samples_per_epoch: training examples per epoch, all ranks together.
        shuffle_buffer: samples held for shuffling (raw videos), and again for examples.
        num_workers: DataLoader workers per rank (validation never uses more than its shards).
        seed: base seed of shard resampling and shuffling.
        val_batch_size: global validation batch size (default: ``batch_size``).
        allow_incomplete: also read a prepared directory whose manifest is missing or incomplete (warns);
            by default only a complete manifest's shards are read.
    """

    def __init__(self, train_shards: str | Sequence[str] | None = None, val_shards: str | Sequence[str] | None = None,
                 view: str | SampleView = "motion", batch_size: int = 32, samples_per_epoch: int = 10_000,
                 shuffle_buffer: int = 1000, num_workers: int = 2, seed: int = 0, val_batch_size: int | None = None,
                 pin_memory: bool = False, allow_incomplete: bool = False):
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.view = build_view(view)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, shuffle_buffer
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.allow_incomplete = allow_incomplete
        self._latest_skips: dict[str, dict[str, int]] = {}
        self._logged_skips: dict[str, int] = {}
        # Without a trainer (tests, scripts) the module acts as a single process.
        self.rank, self.world_size, self.accumulate = 0, 1, 1

    # ---- distributed layout -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
            self.accumulate = self.trainer.accumulate_grad_batches

    def per_device_batch_size(self, global_batch: int, training: bool = True) -> int:
        divisor = self.world_size * (self.accumulate if training else 1)
        if global_batch % divisor:
            raise ValueError(f"global batch size {global_batch} is not divisible by world size {self.world_size}"
                             + (f" × accumulate_grad_batches {self.accumulate}" if training else ""))
        return global_batch // divisor

    # ---- loaders ----------------------------------------------------------------------------
    def train_dataloader(self):
        if self.train_shards is None:
            raise ValueError("VideoDataModule: set data.train_shards to fit")
        urls = resolve_shards(self.train_shards, self.allow_incomplete)
        per_device = self.per_device_batch_size(self.batch_size)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(urls, seed=self.seed, deterministic=True,
                                worker_seed=functools.partial(_worker_seed, self.rank)),
            tar_samples,
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100)),
            _ViewStage(self.view, True, self.seed, self.rank),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100)),
            wds.batched(per_device, collation_fn=self.view.collate, partial=False),
        )
        batches_per_rank = max(1, self.samples_per_epoch // (per_device * self.world_size))
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                               pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        # The length only feeds progress bars; the epoch cut is with_epoch.
        return loader.with_epoch(batches_per_rank).with_length(batches_per_rank, silent=True)

    def _eval_dataloader(self, shards) -> Any:
        urls = resolve_shards(shards, self.allow_incomplete)
        mine, by_sample = split_by_rank(urls, self.rank, self.world_size)
        stages: list = [wds.SimpleShardList(mine)]
        workers = min(self.num_workers, len(mine))  # never more workers than shards
        if workers > 0:
            stages.append(_split_by_worker)
        stages.append(tar_samples)
        if by_sample:
            stages.append(functools.partial(_take_rank_samples, rank=self.rank, world_size=self.world_size))
        per_device = math.ceil(self.val_batch_size / self.world_size)
        stages += [_ViewStage(self.view, False, self.seed, self.rank),
                   wds.batched(per_device, collation_fn=self.view.collate, partial=True)]
        return wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=workers,
                             pin_memory=self.pin_memory)

    def val_dataloader(self):
        if self.val_shards is None:
            return []
        return self._eval_dataloader(self.val_shards)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self._eval_dataloader(self.val_shards if self.val_shards is not None else self.train_shards)

    # ---- skip accounting --------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and SKIPS_KEY in batch:
            skip_tracker.merge_snapshots(self._latest_skips, batch.pop(SKIPS_KEY))
            self._log_skips()
        return batch

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped while reading so far on this rank, by reason."""
        return skip_tracker.totals(self._latest_skips)

    def _log_skips(self) -> None:
        totals = self.skipped
        if totals == self._logged_skips or self.trainer is None or self.trainer.logger is None:
            return
        self._logged_skips = totals
        self.trainer.logger.log_metrics({f"data/skipped/{k}": float(v) for k, v in totals.items()},
                                        step=self.trainer.global_step)

    def teardown(self, stage: str) -> None:
        if self.skipped:
            rank_zero_info(f"VideoDataModule: skipped while reading ({stage}): {self.skipped}")
