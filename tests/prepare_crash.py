"""Run ``prepare`` in a process that stops at a chosen point: the fault-injection and concurrency tests.

``python -m tests.prepare_crash CONFIG_JSON MODE N [READY RELEASE]`` with MODE one of
``kill-before-replace`` (SIGKILL itself before its N-th ``os.replace``: every commit step of prepare
goes through one), ``kill-after-write`` (SIGKILL after the N-th sample written to a shard, which is then
half written) and ``hang-after-write`` (after the N-th sample, create READY and wait until RELEASE exists).
``start`` launches it; ``check_prepared`` reads an output directory back and checks its manifest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import webdataset as wds

from datamodules.prepare import PrepareConfig, run_prepare

REPO = Path(__file__).resolve().parents[1]


def start(config: dict, mode: str = "none", limit: int = 0, ready: Path | None = None,
          release: Path | None = None) -> subprocess.Popen:
    """``prepare`` with ``config`` (PrepareConfig fields, JSON-able) in a child process that stops as told."""
    argv = [sys.executable, "-m", "tests.prepare_crash", json.dumps(config), mode, str(limit)]
    argv += [str(ready), str(release)] if ready is not None else []
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"prepare ended (rc {process.returncode}) before {path.name}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"prepare did not reach {path.name} in {timeout} s")
        time.sleep(0.05)


def check_prepared(out: Path) -> tuple[dict, Counter]:
    """The manifest and how often each source id occurs in the shards it lists; asserts that its counts are
    its shards' (per shard and in total) and that its inputs are its written samples plus its skips."""
    manifest = json.loads((out / "manifest.json").read_text())
    sources: Counter = Counter()
    for name in manifest["shards"]:
        metas = [json.loads(raw["json"]) for raw in wds.DataPipeline(wds.SimpleShardList([str(out / name)]),
                                                                      wds.tarfile_to_samples())]
        assert len(metas) == manifest["shard_samples"][name], name
        sources.update(m["source_id"] for m in metas)
    assert sum(sources.values()) == manifest["written"] == sum(manifest["shard_samples"].values())
    assert manifest["inputs"] == manifest["written"] + sum(manifest["skipped"].values())
    assert len(manifest["shards"]) == len(set(manifest["shards"]))
    return manifest, sources


def _count_calls(owner, name: str, limit: int, action, before: bool) -> None:
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == limit:
            action()
        result = original(*args, **kwargs)
        if not before and calls[0] == limit:
            action()
        return result

    setattr(owner, name, wrapper)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    config, mode, limit = json.loads(argv[0]), argv[1], int(argv[2])
    if mode == "kill-before-replace":
        _count_calls(os, "replace", limit, _kill, before=True)
    elif mode == "kill-after-write":
        _count_calls(wds.ShardWriter, "write", limit, _kill, before=False)
    elif mode == "hang-after-write":
        ready, release = Path(argv[3]), Path(argv[4])

        def hang() -> None:
            ready.touch()
            while not release.exists():
                time.sleep(0.05)

        _count_calls(wds.ShardWriter, "write", limit, hang, before=False)
    elif mode != "none":
        raise SystemExit(f"unknown mode {mode!r}")
    run_prepare(PrepareConfig(**config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
