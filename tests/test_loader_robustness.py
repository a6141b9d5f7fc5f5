"""Bad training data never crashes, hangs or trains garbage silently; the shuffle is reproducible.

The shards here are written directly (no video decoding: the motion view never reads the mp4), so
each test builds exactly the damage it probes.
"""

from __future__ import annotations

import io
import json
import logging
import random
import signal
import tarfile
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds

from datamodules.sample_format import BAD_METADATA, NON_FINITE, decode_sample, encode_sample
from datamodules.skip_tracker import SKIPS, WARN_FIRST, TooManySkips
from datamodules.tar_reader import CORRUPT_MEMBER, iter_tar_samples
from datamodules.video_datamodule import VideoDataModule
from datamodules.views import MotionView
from videolavit.video import errors

FRAMES = 36  # I-frames every 12 frames: one 24-frame clip per video


def make_sample(key: str, nan: bool = False, meta_changes: dict | None = None, seed: int = 0) -> dict:
    meta = {"source_id": key, "width": 64, "height": 64, "fps": 6, "num_frames": FRAMES,
            "iframes": [0, 12, 24], "motion_shape": [FRAMES, 2, 4, 4]}
    meta.update(meta_changes or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    motion = np.random.default_rng(seed).normal(size=(FRAMES, 2, 4, 4)).astype(np.float16)
    if nan:
        motion[FRAMES // 2, 0, 1, 1] = np.nan
    return encode_sample(key, f"caption of {key}", meta, b"not a video", motion)


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def write_manifest(directory: Path, counts: dict[str, int]) -> None:
    (directory / "manifest.json").write_text(json.dumps({"shards": list(counts), "shard_samples": counts,
                                                         "written": sum(counts.values()), "complete": True}))


def good_shard(path: Path, prefix: str, n: int, seed: int = 0) -> str:
    return write_shard(path, [make_sample(f"{prefix}{i}", seed=seed * 100 + i) for i in range(n)])


def motion_dm(**kwargs) -> VideoDataModule:
    return VideoDataModule(view=MotionView(grid=(4, 4), scale=1.0), **kwargs)


def val_keys(dm: VideoDataModule) -> list[str]:
    return [key for batch in dm.val_dataloader() for key in batch["key"]]


class StillRunning(BaseException):
    """Not an ``Exception``: no reader's error handling may swallow it."""


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise StillRunning(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- defect 2: non-finite arrays ------------------------------------------------------------------
def test_nan_motion_is_a_counted_non_finite_skip_and_every_good_sample_arrives(tmp_path, caplog):
    samples = [make_sample(f"v{i}", nan=(i == 2), seed=i) for i in range(6)]
    shard = write_shard(tmp_path / "a.tar", samples)
    dm = motion_dm(val_shards=[shard], batch_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="datamodules.skips"):
        keys = val_keys(dm)
    assert sorted(keys) == ["v0", "v1", "v3", "v4", "v5"]
    assert dm.skipped == {NON_FINITE: 1}
    assert "v2" in caplog.text and NON_FINITE in caplog.text
    inf = make_sample("inf")
    motion = np.zeros((FRAMES, 2, 4, 4), np.float16)
    motion[0, 0, 0, 0] = np.inf
    inf = encode_sample("inf", "c", json.loads(inf["json"]), b"", motion)
    with pytest.raises(errors.VideoSkip, match="1 non-finite") as caught:
        decode_sample(inf, need_video=False)
    assert caught.value.reason == NON_FINITE


# ---- defect 4: the sample contract, and all-bad data --------------------------------------------
@pytest.mark.parametrize("changes, named", [
    ({"iframes": None, "i_frames": [0, 12, 24]}, "'iframes'"),  # a renamed key
    ({"num_frames": "36"}, "'num_frames'"),
    ({"fps": 0}, "'fps'"),
    ({"iframes": [0, 12, 99]}, "'iframes'"),
])
def test_metadata_that_breaks_the_contract_is_a_counted_skip_not_a_crash(tmp_path, caplog, changes, named):
    samples = [make_sample("good0"), make_sample("broken", meta_changes=changes), make_sample("good1")]
    dm = motion_dm(val_shards=[write_shard(tmp_path / "a.tar", samples)], batch_size=1, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="datamodules.skips"):
        assert val_keys(dm) == ["good0", "good1"]
    assert dm.skipped == {BAD_METADATA: 1}
    line = next(r.getMessage() for r in caplog.records if "broken" in r.getMessage())
    assert BAD_METADATA in line and named in line


def test_metadata_that_is_not_an_object_and_a_motion_grid_of_another_shape_are_skips():
    not_object = dict(make_sample("listy"), json=b"[1, 2]")
    with pytest.raises(errors.VideoSkip, match="not an object") as caught:
        decode_sample(not_object, need_video=False)
    assert caught.value.reason == BAD_METADATA
    other_shape = make_sample("shape", meta_changes={"motion_shape": [FRAMES, 2, 5, 5]})
    with pytest.raises(errors.VideoSkip, match="motion_shape") as caught:
        decode_sample(other_shape, need_video=False)
    assert caught.value.reason == errors.CORRUPT_SAMPLE


def broken_json(key: str) -> dict:
    return dict(make_sample(key), json=b"{not json")


def _all_bad_shards(tmp_path: Path) -> list[str]:
    return [write_shard(tmp_path / f"bad{s}.tar", [broken_json(f"b{s}_{i}") for i in range(4)]) for s in range(2)]


def test_all_bad_shards_stop_training_with_a_named_error_and_a_bounded_log(tmp_path, caplog):
    dm = motion_dm(train_shards=_all_bad_shards(tmp_path), batch_size=2, num_workers=0, shuffle_buffer=4)
    with caplog.at_level(logging.WARNING, logger="datamodules.skips"), deadline(30):
        with pytest.raises(TooManySkips, match=r"1000 samples in a row were skipped .*corrupt_sample.*max_consecutive"):
            next(iter(dm.train_dataloader()))
    lines = [r for r in caplog.records if r.name == "datamodules.skips"]
    assert WARN_FIRST <= len(lines) <= WARN_FIRST + 2  # the first few, one "summarised" note, one summary


def test_all_bad_shards_stop_a_worker_process_too(tmp_path):
    dm = motion_dm(train_shards=_all_bad_shards(tmp_path), batch_size=2, num_workers=1, shuffle_buffer=4,
                   max_consecutive_skips=50)
    with deadline(30), pytest.raises(TooManySkips, match="50 samples in a row"):
        next(iter(dm.train_dataloader()))


def test_sporadic_skips_never_add_up_to_the_consecutive_limit(tmp_path):
    samples = [make_sample(f"m{i}", nan=(i % 2 == 0), seed=i) for i in range(8)]
    dm = motion_dm(train_shards=[write_shard(tmp_path / "a.tar", samples)], batch_size=2, num_workers=0,
                   samples_per_epoch=40, shuffle_buffer=1, max_consecutive_skips=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 20 and dm.skipped[NON_FINITE] >= 20  # half of what was read was skipped
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        motion_dm(max_consecutive_skips=0)


# ---- defect 5: losses inside a shard, skips after the last batch ---------------------------------
def _damage_header(path: str, member_name: str) -> None:
    """Flip one byte of a member's own header (the block right before its data)."""
    with tarfile.open(path) as tar:
        member = tar.getmember(member_name)
    data = bytearray(Path(path).read_bytes())
    data[member.offset_data - 512 + 3] ^= 0x20  # inside the name field: the checksum no longer matches
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("member", ["s3.json", "s0.txt", "s7.motion.npy"])
def test_a_damaged_member_header_mid_shard_is_counted_and_the_other_samples_arrive(tmp_path, caplog, member):
    shard = good_shard(tmp_path / "a.tar", "s", 8)
    _damage_header(shard, member)
    damaged = member.split(".")[0]
    for workers in (0, 1):
        dm = motion_dm(val_shards=[shard], batch_size=3, num_workers=workers)
        with caplog.at_level(logging.WARNING, logger="datamodules.skips"):
            keys = val_keys(dm)
        assert sorted(keys) == sorted(f"s{i}" for i in range(8) if f"s{i}" != damaged)
        assert dm.skipped == {CORRUPT_MEMBER: 1}
    assert f"{shard}:{damaged}" in caplog.text


def test_a_cut_shard_counts_every_lost_sample_when_the_manifest_knows_them(tmp_path, caplog):
    shard = good_shard(tmp_path / "a.tar", "s", 8)
    with tarfile.open(shard) as tar:
        cut_at = tar.getmember("s3.mp4").offset_data + 100  # inside sample 3
    Path(shard).write_bytes(Path(shard).read_bytes()[:cut_at])
    SKIPS.start_stream()
    with caplog.at_level(logging.WARNING, logger="datamodules.skips"):
        assert [s["__key__"] for s in iter_tar_samples(shard)] == ["s0", "s1", "s2"]
    assert SKIPS.counts == {errors.TRUNCATED_SHARD: 1}  # no manifest: how many were lost is unknown
    assert "unknown" in caplog.text
    write_manifest(tmp_path, {"a.tar": 8})
    dm = motion_dm(val_shards=[shard], batch_size=2, num_workers=1)
    assert sorted(val_keys(dm)) == ["s0", "s1", "s2"]
    assert dm.skipped == {errors.TRUNCATED_SHARD: 5}  # s3..s7, from the manifest's count


def test_a_shard_cut_after_its_last_complete_token_sample_keeps_that_sample(tmp_path):
    # Token shards hold other members than video shards: the sample that was whole where the archive was cut
    # (only its end-of-archive blocks lost) is kept, judged by the members of the shard's own samples.
    shard = tmp_path / "tokens.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            for ext, data in (("txt", b"a caption"), ("json", b"{}"), ("ids.npy", bytes(16))):
                info = tarfile.TarInfo(f"t{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar:
        last = tar.getmember("t2.ids.npy")
        end = last.offset_data + -(-last.size // 512) * 512  # where the zero blocks begin
    shard.write_bytes(shard.read_bytes()[:end])
    SKIPS.start_stream()
    assert [s["__key__"] for s in iter_tar_samples(str(shard))] == ["t0", "t1", "t2"]
    assert SKIPS.counts == {errors.TRUNCATED_SHARD: 1}  # the cut is still counted (no manifest)
    with tarfile.open(shard) as tar:
        cut_inside = tar.getmember("t2.json").offset_data + 1  # t2 loses its ids: counted with the cut
    shard.write_bytes(shard.read_bytes()[:cut_inside])
    SKIPS.start_stream()
    assert [s["__key__"] for s in iter_tar_samples(str(shard))] == ["t0", "t1"]
    assert SKIPS.counts == {errors.TRUNCATED_SHARD: 1}


def test_an_unopenable_shard_counts_the_manifests_samples(tmp_path):
    write_manifest(tmp_path, {"gone.tar": 6})
    SKIPS.start_stream()
    assert list(iter_tar_samples(str(tmp_path / "gone.tar"))) == []
    assert SKIPS.counts == {errors.TRUNCATED_SHARD: 6}


@pytest.mark.parametrize("workers", [0, 1])
def test_a_skip_after_a_workers_last_batch_is_still_reported(tmp_path, workers):
    samples = [make_sample(f"v{i}", seed=i) for i in range(4)] + [broken_json("last")]
    dm = motion_dm(val_shards=[write_shard(tmp_path / "a.tar", samples)], batch_size=2, num_workers=workers)
    batches = list(dm.val_dataloader())
    assert [len(b["key"]) for b in batches] == [2, 2]  # the report item never reaches the model
    assert dm.skipped == {errors.CORRUPT_SAMPLE: 1}


def test_a_worker_that_never_yields_a_batch_still_reports_its_skips(tmp_path):
    good = write_shard(tmp_path / "a.tar", [make_sample(f"v{i}", seed=i) for i in range(4)])
    bad = write_shard(tmp_path / "b.tar", [broken_json(f"b{i}") for i in range(3)])
    dm = motion_dm(val_shards=[good, bad], batch_size=2, num_workers=2)  # worker 1 reads only the bad shard
    assert sorted(val_keys(dm)) == ["v0", "v1", "v2", "v3"]
    assert dm.skipped == {errors.CORRUPT_SAMPLE: 3}


# ---- defect 8: a reproducible training shuffle -----------------------------------------------------
def _train_shards(tmp_path: Path) -> list[str]:
    return [good_shard(tmp_path / f"t{s}.tar", f"t{s}_", 6, seed=s) for s in range(4)]


def _first_batches(shards: list[str], n: int = 6, **kwargs) -> list[tuple]:
    dm = motion_dm(train_shards=shards, batch_size=4, samples_per_epoch=4 * n, shuffle_buffer=8, **kwargs)
    return [(tuple(b["key"]), b["motion"].sum().item()) for b in dm.train_dataloader()]


def test_two_fresh_loaders_with_the_same_seed_give_the_same_batches(tmp_path):
    shards = _train_shards(tmp_path)
    for workers in (0, 2):
        first = _first_batches(shards, seed=0, num_workers=workers)
        assert _first_batches(shards, seed=0, num_workers=workers) == first
        assert _first_batches(shards, seed=1, num_workers=workers) != first
    by_worker = _first_batches(shards, n=2, seed=0, num_workers=2)
    assert by_worker[0][0] != by_worker[1][0]  # each worker draws its own stream


def test_each_rank_draws_its_own_stream(tmp_path):
    shards = _train_shards(tmp_path)
    streams = []
    for rank in (0, 1):
        dm = motion_dm(train_shards=shards, batch_size=8, samples_per_epoch=32, shuffle_buffer=8, seed=0,
                       num_workers=0)
        dm.rank, dm.world_size = rank, 2
        streams.append([tuple(b["key"]) for b in dm.train_dataloader()])
    assert len(streams[0]) == len(streams[1]) == 4 and streams[0] != streams[1]


def test_the_default_seed_follows_seed_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test (seed_everything sets it)
    shards = _train_shards(tmp_path)
    pl.seed_everything(5)
    first = _first_batches(shards, num_workers=0)
    random.random(), torch.rand(3), np.random.rand()  # the global RNGs' state does not matter
    assert _first_batches(shards, num_workers=0) == first
    pl.seed_everything(6)
    assert _first_batches(shards, num_workers=0) != first


class DrawingView(MotionView):
    """Draws from the view's RNG in validation too (as the LLM views' source mixers do)."""

    def examples(self, sample, train, rng):
        for example in super().examples(sample, train, rng):
            yield dict(example, draw=torch.tensor(rng.random()))


def test_validation_gives_the_same_batches_every_pass(tmp_path):
    dm = VideoDataModule(val_shards=_train_shards(tmp_path), view=DrawingView(grid=(4, 4)), batch_size=4,
                         num_workers=0)
    loader = dm.val_dataloader()
    first = [(tuple(b["key"]), b["draw"].tolist()) for b in loader]
    assert [(tuple(b["key"]), b["draw"].tolist()) for b in loader] == first and len(first) == 6


def test_all_bad_validation_shards_also_stop_with_the_named_error(tmp_path):
    dm = motion_dm(val_shards=_all_bad_shards(tmp_path), batch_size=2, num_workers=0, max_consecutive_skips=5)
    with pytest.raises(TooManySkips, match="5 samples in a row"):
        list(dm.val_dataloader())
    lenient = motion_dm(val_shards=_all_bad_shards(tmp_path), batch_size=2, num_workers=0)
    assert list(lenient.val_dataloader()) == [] and lenient.skipped == {errors.CORRUPT_SAMPLE: 8}
