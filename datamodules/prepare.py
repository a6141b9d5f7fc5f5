"""``prepare``: raw videos → size-bounded WebDataset shards of decomposed samples.

Work is split into units (see ``prepare_inputs``); each finished unit leaves a marker in
``OUT/.units/`` next to its shards, so a rerun skips finished units and a cluster can run
``--part i/N`` jobs on the same output directory. Videos are decomposed in worker processes; the
main process writes shards in input order, so output is deterministic. Every unusable video is
skipped with a named reason and listed in ``OUT/skipped.jsonl``; ``OUT/manifest.json`` sums it up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import webdataset as wds
from tqdm import tqdm

from datamodules.prepare_inputs import InputError, InputItem, Unit, iter_unit_items, list_units, read_bytes, \
    read_captions, select_part
from datamodules.sample_format import encode_sample, sanitize_key
from videolavit.video import errors
from videolavit.video.decompose import DecomposeConfig, decompose_video

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
UNITS_DIR = ".units"
PARTIAL_DIR = ".partial"
UNEXPECTED_ERROR = "unexpected_error"


@dataclass
class PrepareConfig:
    videos: str
    out: str
    captions: str | None = None
    id_column: str | None = None
    caption_column: str | None = None
    allow_missing_captions: bool = False
    workers: int = max(1, (os.cpu_count() or 1))
    part: int = 0
    num_parts: int = 1
    videos_per_unit: int = 256
    max_shard_bytes: int = 1 << 30
    max_shard_samples: int = 10_000
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    progress: bool | None = None  # None: only on a terminal


def _check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable: {exc}") from None


def _decompose_item(job: tuple[InputItem, DecomposeConfig, bool]) -> dict:
    """Worker: decompose one video into an encoded shard sample, or report why it is skipped."""
    item, cfg, allow_missing = job
    key = sanitize_key(item.source_id)
    if "truncated_tar" in item.source_meta:
        return {"skip": errors.TRUNCATED_SHARD, "id": item.source_id, "detail": item.source_id.split(":", 2)[-1]}
    if item.caption is None and not allow_missing:
        return {"skip": errors.MISSING_CAPTION, "id": item.source_id, "detail": "no caption in CSV, shard or sidecar"}
    try:
        video = decompose_video(read_bytes(item), cfg)
    except errors.VideoSkip as skip:
        return {"skip": skip.reason, "id": item.source_id, "detail": skip.detail}
    except Exception as exc:  # one broken video must never take the job down
        return {"skip": UNEXPECTED_ERROR, "id": item.source_id,
                "detail": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"}
    meta = {"key": key, "source_id": item.source_id, "caption_source": item.caption_source,
            **video.metadata(), **item.source_meta}
    sample = encode_sample(key, item.caption or "", meta, video.mp4, video.motion)
    return {"sample": sample, "id": item.source_id}


def _bounded(items: Iterator, semaphore: threading.Semaphore) -> Iterator:
    """Hold back the pool's task feeder so at most a few videos are in flight (memory bound)."""
    for item in items:
        semaphore.acquire()
        yield item


class _UnitWriter:
    """Writes one unit's samples to size-bounded shards in a partial dir, then publishes them."""

    def __init__(self, out: Path, unit: Unit, cfg: PrepareConfig):
        self.out, self.unit = out, unit
        self.partial = out / PARTIAL_DIR / unit.name
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        pattern = str(self.partial / f"{unit.name}-%03d.tar")
        self.writer = wds.ShardWriter(pattern, maxcount=cfg.max_shard_samples, maxsize=cfg.max_shard_bytes,
                                      verbose=0, mtime=0.0)
        self.samples: Counter[str] = Counter()

    def write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.samples[Path(self.writer.fname).name] += 1

    def publish(self) -> list[dict]:
        self.writer.close()
        shards = []
        for path in sorted(self.partial.glob("*.tar")):
            if self.samples[path.name] == 0:
                path.unlink()
                continue
            target = self.out / path.name
            os.replace(path, target)
            shards.append({"name": path.name, "samples": self.samples[path.name], "bytes": target.stat().st_size})
        shutil.rmtree(self.partial, ignore_errors=True)
        return shards


def _marker_path(out: Path, unit: Unit) -> Path:
    return out / UNITS_DIR / f"{unit.name}.json"


def _unit_done(out: Path, unit: Unit, config_record: dict) -> bool:
    marker = _marker_path(out, unit)
    if not marker.is_file():
        return False
    record = json.loads(marker.read_text())
    if record.get("config") != config_record:
        raise InputError(f"{out} holds shards prepared with other settings ({marker}); "
                         "use another --out or delete it")
    return all((out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
               for s in record["shards"])


def _config_record(cfg: PrepareConfig) -> dict:
    return {"decompose": dataclasses.asdict(cfg.decompose), "allow_missing_captions": cfg.allow_missing_captions}


def write_manifest(out: Path) -> dict:
    """Aggregate all unit markers into ``manifest.json`` and ``skipped.jsonl`` (atomic replace)."""
    records = [json.loads(p.read_text()) for p in sorted((out / UNITS_DIR).glob("*.json"))]
    skipped: Counter[str] = Counter()
    shards, written, total_units = [], 0, None
    with open(out / "skipped.jsonl.tmp", "w") as handle:
        for record in records:
            written += record["written"]
            skipped.update(record["skipped"])
            shards.extend(record["shards"])
            total_units = record["units_total"]
            for entry in record["skipped_items"]:
                handle.write(json.dumps(entry) + "\n")
    os.replace(out / "skipped.jsonl.tmp", out / "skipped.jsonl")
    manifest = {
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "shards": [s["name"] for s in shards],
        "shard_samples": {s["name"]: s["samples"] for s in shards},
        "units_done": len(records),
        "units_total": total_units,
        "complete": total_units is not None and len(records) == total_units,
        "config": records[0]["config"] if records else None,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest


def run_prepare(cfg: PrepareConfig) -> dict:
    """Run (or resume) preparation of this part; returns the aggregated manifest."""
    captions = read_captions(cfg.captions, cfg.id_column, cfg.caption_column) if cfg.captions else None
    units = list_units(cfg.videos, cfg.videos_per_unit)
    mine = select_part(units, cfg.part, cfg.num_parts)
    out = Path(cfg.out)
    _check_output(out)
    (out / UNITS_DIR).mkdir(exist_ok=True)
    record = _config_record(cfg)
    todo = [u for u in mine if not _unit_done(out, u, record)]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d units of this part are already done", len(mine) - len(todo), len(mine))
    known = sum(len(u.files) for u in todo)
    bar = tqdm(total=known if all(u.tar is None for u in todo) else None, unit="video", desc="prepare",
               disable=(not cfg.progress) if cfg.progress is not None else None)
    context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    workers = max(1, cfg.workers)
    pool = context.Pool(workers, maxtasksperchild=200) if workers > 1 else None
    totals: Counter[str] = Counter()
    try:
        for unit in todo:
            _prepare_unit(out, unit, cfg, captions, pool, workers, len(units), record, bar, totals)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    manifest = write_manifest(out)
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(totals.items()) if k != "written") or "none"
    log.info("part %d/%d: wrote %d samples; skipped %s. Manifest: %s", cfg.part, cfg.num_parts,
             totals["written"], skipped, out / MANIFEST)
    return manifest


def _prepare_unit(out: Path, unit: Unit, cfg: PrepareConfig, captions, pool, workers: int, units_total: int,
                  record: dict, bar, totals: Counter) -> None:
    writer = _UnitWriter(out, unit, cfg)
    skipped: Counter[str] = Counter()
    skipped_items, written = [], 0
    jobs = ((item, cfg.decompose, cfg.allow_missing_captions) for item in iter_unit_items(unit, cfg.videos, captions))
    if pool is None:
        results = map(_decompose_item, jobs)
        semaphore = None
    else:
        semaphore = threading.Semaphore(4 * workers)
        results = pool.imap(_decompose_item, _bounded(jobs, semaphore), chunksize=1)
    for result in results:
        if semaphore is not None:
            semaphore.release()
        if "sample" in result:
            writer.write(result["sample"])
            written += 1
        else:
            skipped[result["skip"]] += 1
            skipped_items.append({"id": result["id"], "reason": result["skip"], "detail": result["detail"],
                                  "unit": unit.name})
            log.warning("skipped %s: %s (%s)", result["id"], result["skip"], result["detail"].splitlines()[0]
                        if result["detail"] else "")
        bar.update(1)
        bar.set_postfix(written=totals["written"] + written, skipped=sum(totals.values()) - totals["written"]
                        + sum(skipped.values()), refresh=False)
    shards = writer.publish()
    marker = {"unit": unit.name, "index": unit.index, "units_total": units_total, "written": written,
              "skipped": dict(skipped), "skipped_items": skipped_items, "shards": shards, "config": record}
    tmp = _marker_path(out, unit).with_suffix(".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, _marker_path(out, unit))
    totals["written"] += written
    totals.update(skipped)
