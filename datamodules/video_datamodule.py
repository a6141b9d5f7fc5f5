"""The one DataModule: WebDataset shards of decomposed videos → dict batches for any stage.

Training reads resampled shards (an infinite stream) cut into epochs of ``samples_per_epoch``; the
shard draws, both shuffle buffers and the views' choices are seeded from ``seed`` (by default the seed of
``seed_everything``), the rank, the DataLoader worker and the epoch, so a run is reproducible and every
reader has its own stream; checkpoints store the epochs (passes) started, so a resumed run goes on
with new ones. Validation reads each shard once, split across ranks and workers, in a fixed order.
``batch_size`` is the *global* batch: each rank gets ``batch_size / (world_size × accumulate_grad_batches)``.
Broken shards and samples are skipped, logged with their key and reason,
counted and reported as ``data/skipped/<reason>``; each worker's pipeline ends with a skips-only report,
taken out of the stream in the main process, so skips after a worker's last batch are counted too.
A reader that only skips (``max_consecutive_skips`` in a row) stops with ``TooManySkips``: an endless
training stream over broken shards would otherwise resample them forever.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_info

from datamodules import skip_tracker
from datamodules.shard_list import resolve_shards, split_by_rank
from datamodules.skip_tracker import SKIPS, SKIPS_KEY, is_skips_report
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


def global_seed() -> int:
    """The seed ``seed_everything`` set (``PL_GLOBAL_SEED``), else torch's initial seed."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None and value.lstrip("-").isdigit() else torch.initial_seed()


class _SeededStage:
    """Base of picklable pipeline stages drawing from an RNG per (seed, rank, worker, pass, purpose).

    Each call is one pass of the pipeline in this process (persistent workers keep their copy, so the
    pass count goes on across epochs); the RNG is built there, in the worker, never inherited.
    """

    purpose = "stage"

    def __init__(self, seed: int, rank: int, passes: int = 0):
        self.seed, self.rank, self.passes = seed, rank, passes

    def next_rng(self, advance: bool = True) -> random.Random:
        """This pass's RNG; ``advance=False`` gives every pass the first pass's (validation repeats itself)."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"{self.purpose}/{self.seed}/{self.rank}/{worker}/{self.passes}")
        self.passes += 1 if advance else 0
        return rng


class _ViewStage(_SeededStage):
    """Pipeline stage applying a view (and starting this pass's skip counts)."""

    purpose = "view"

    def __init__(self, view: SampleView, train: bool, seed: int, rank: int, max_consecutive_skips: int | None = None,
                 passes: int = 0):
        super().__init__(seed, rank, passes)
        self.view, self.train, self.max_consecutive_skips = view, train, max_consecutive_skips

    def __call__(self, samples):
        # Runs when the pipeline is built in its process, before any read.
        SKIPS.start_stream(max_consecutive=self.max_consecutive_skips)
        return self.view(samples, train=self.train, rng=self.next_rng(advance=self.train))


class _Shuffle(_SeededStage):
    """webdataset's buffered shuffle with a seeded RNG (its default RNG is seeded from pid and time)."""

    def __init__(self, bufsize: int, seed: int, rank: int, purpose: str, passes: int = 0):
        super().__init__(seed, rank, passes)
        self.bufsize, self.purpose = bufsize, purpose

    def __call__(self, items):
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=self.next_rng())(items)


def _end_with_skips_report(batches):
    """Worker-side last stage: the batches, then this pass's final skip counts (skips-only item)."""
    yield from batches
    yield SKIPS.report()


class _CountTrainPass:
    """Main-process stage: each iteration of the training loader is one more pass (see ``state_dict``)."""

    def __init__(self, datamodule: "VideoDataModule"):
        self.datamodule = datamodule

    def __call__(self, batches):
        # Runs when the loader's iterator is built, once per epoch, before any batch.
        self.datamodule.train_passes += 1
        return batches


class _TakeSkipReports:
    """Main-process stage: merges every item's skip snapshot into the DataModule and drops reports."""

    def __init__(self, datamodule: "VideoDataModule"):
        self.datamodule = datamodule

    def __call__(self, batches):
        for batch in batches:
            if isinstance(batch, dict) and SKIPS_KEY in batch:
                self.datamodule.merge_skips(batch.pop(SKIPS_KEY))
            if not is_skips_report(batch):
                yield batch


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
        seed: base seed of shard resampling, shuffling and the views' draws (None: the seed of
            ``seed_everything``, read when the training loader is built).
        val_batch_size: global validation batch size (default: ``batch_size``).
        allow_incomplete: also read a prepared directory whose manifest is missing or incomplete (warns);
            by default only a complete manifest's shards are read.
        max_consecutive_skips: skipped samples in a row after which a reader stops with ``TooManySkips``
            instead of resampling broken shards forever (None: never). Validation readers share the
            bound (without workers they share one skip tracker with the suspended training reader).
    """

    def __init__(self, train_shards: str | Sequence[str] | None = None, val_shards: str | Sequence[str] | None = None,
                 view: str | SampleView = "motion", batch_size: int = 32, samples_per_epoch: int = 10_000,
                 shuffle_buffer: int = 1000, num_workers: int = 2, seed: int | None = None,
                 val_batch_size: int | None = None, pin_memory: bool = False, allow_incomplete: bool = False,
                 max_consecutive_skips: int | None = 1000):
        super().__init__()
        if max_consecutive_skips is not None and max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1 (or None), got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
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
        # Training passes (epochs of the stream) started so far, restored on resume (see state_dict).
        self.train_passes = 0

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
        seed = self.seed if self.seed is not None else global_seed()
        passes = self.train_passes  # a resumed run goes on with new passes instead of replaying the first
        shards = wds.ResampledShards(urls, seed=seed, deterministic=True,
                                     worker_seed=functools.partial(_worker_seed, self.rank))
        shards.epoch = passes - 1  # ResampledShards counts its passes from -1, +1 before each
        pipeline = wds.DataPipeline(
            shards,
            tar_samples,
            _Shuffle(self.shuffle_buffer, seed, self.rank, "samples", passes),
            _ViewStage(self.view, True, seed, self.rank, self.max_consecutive_skips, passes),
            _Shuffle(self.shuffle_buffer, seed, self.rank, "examples", passes),
            wds.batched(per_device, collation_fn=self.view.collate, partial=False),
            _end_with_skips_report,
        )
        batches_per_rank = max(1, self.samples_per_epoch // (per_device * self.world_size))
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=self.num_workers,
                               pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        loader.append(_CountTrainPass(self))
        loader.append(_TakeSkipReports(self))
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
        stages += [_ViewStage(self.view, False, self.seed or 0, self.rank, self.max_consecutive_skips),
                   wds.batched(per_device, collation_fn=self.view.collate, partial=True),
                   _end_with_skips_report]
        loader = wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=workers,
                               pin_memory=self.pin_memory)
        loader.append(_TakeSkipReports(self))
        return loader

    def val_dataloader(self):
        if self.val_shards is None:
            return []
        return self._eval_dataloader(self.val_shards)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return self._eval_dataloader(self.val_shards if self.val_shards is not None else self.train_shards)

    # ---- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Stored in every checkpoint: the training passes started, so that a resumed run (on any number of
        ranks) draws its shards, shuffles and views from the next pass's seeds instead of replaying the
        first passes' data in the same order. A pass cut short by the checkpoint is not resumed mid-way:
        the stream has no position inside a pass, and the next pass's samples are new draws."""
        return {"train_passes": self.train_passes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        passes = state_dict.get("train_passes", 0)
        if not isinstance(passes, int) or passes < 0:
            raise ValueError(f"VideoDataModule checkpoint state: train_passes must be an int >= 0, got {passes!r}")
        self.train_passes = passes

    # ---- skip accounting --------------------------------------------------------------------
    def merge_skips(self, snapshot: dict) -> None:
        """Take a reader's skip counts (a batch's or a final report's snapshot) and log the totals."""
        skip_tracker.merge_snapshots(self._latest_skips, snapshot)
        self._log_skips()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Our loaders take the snapshots out already; this serves batches from other loaders.
        if isinstance(batch, dict) and SKIPS_KEY in batch:
            self.merge_skips(batch.pop(SKIPS_KEY))
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
