"""Fault injection: ``prepare`` killed with SIGKILL at every kind of point (before its plan is stored, mid-shard,
between moving a unit's shards, between its shards and its marker, with decoder workers running), resumed with
other parts and other unit sizes: the final shards hold every input video exactly once and the manifest's
counts are its shards' at every step."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from datamodules.prepare import PrepareConfig, run_prepare
from tests.prepare_crash import check_prepared, start, wait_for


def _killed(config: dict, mode: str, limit: int) -> None:
    process = start(config, mode, limit)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, f"not killed at {mode} {limit} (rc {process.returncode}): {stderr}"


def _consistent_if_present(out: Path, ids: set[str]) -> None:
    if (out / "manifest.json").exists():
        _, sources = check_prepared(out)
        assert set(sources) <= ids and set(sources.values()) <= {1}


@pytest.mark.slow
def test_prepare_killed_anywhere_resumes_to_every_video_once(synthetic_corpus, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(synthetic_corpus / "videos", videos)
    ids = {p.stem for p in videos.glob("*.mp4")}
    out = tmp_path / "out"
    config = {"videos": str(videos), "out": str(out), "captions": str(synthetic_corpus / "captions.csv"),
              "workers": 1, "progress": False, "videos_per_unit": 2, "max_shard_samples": 1}
    # 4 units of 2 videos, 2 one-sample shards each; every commit step of prepare is an os.replace.
    _killed(config, "kill-before-replace", 1)  # before the unit plan is stored
    assert not (out / "manifest.json").exists()
    _killed(config, "kill-after-write", 3)  # unit 0 finished, unit 1's first shard half written
    part1 = run_prepare(PrepareConfig(**config, part=1, num_parts=2))  # another part resumes unit 1 meanwhile
    assert not part1["complete"] and part1["units_done"] == 3
    _consistent_if_present(out, ids)
    _killed(config, "kill-before-replace", 2)  # unit 2: first shard moved into place, second not
    _consistent_if_present(out, ids)
    _killed({**config, "videos_per_unit": 1}, "kill-before-replace", 3)  # new plan; a shard out, its marker not
    _consistent_if_present(out, ids)
    ready = tmp_path / "ready"
    workers = start({**config, "videos_per_unit": 1, "workers": 2}, "hang-after-write", 1, ready, tmp_path / "never")
    wait_for(ready, workers)
    workers.send_signal(signal.SIGKILL)  # killed from outside with its decoder pool running
    assert workers.wait(60) == -signal.SIGKILL
    _consistent_if_present(out, ids)

    final = run_prepare(PrepareConfig(**{**config, "videos_per_unit": 1}))
    manifest, sources = check_prepared(out)
    assert final == manifest and manifest["complete"] and manifest["written"] == manifest["inputs"] == 8
    assert set(sources) == ids and set(sources.values()) == {1}
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(manifest["shards"])  # no stray shard left
