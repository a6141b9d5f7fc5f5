"""``prepare``: raw videos → size-bounded WebDataset shards of decomposed samples.

Work is split into units whose content the plan records (``prepare_plan``: each input tar is one unit,
loose files are grouped into units of ``videos_per_unit``). A finished unit leaves a marker in
``OUT/.units/`` with the inputs it holds, its counts and its shards, so a rerun skips exactly the units
whose marker matches the plan, and a cluster can run ``--part i/N`` jobs on one output directory
(``prepare_locks`` keeps two runs off one unit and the plan fixed while any part runs). Videos are
decomposed in worker processes; the main process writes shards in input order, so output is
deterministic. Every unusable input is skipped with a named reason and listed in ``OUT/skipped.jsonl``.
``OUT/manifest.json`` lists the shards of the finished units only, and its counts add up: ``written`` is
the number of samples in those shards, ``written`` plus the skips is ``inputs``, and ``complete`` says
that every unit of the plan is finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import webdataset as wds
from tqdm import tqdm

from datamodules.prepare_inputs import InputError, InputItem, Inputs, Unit, iter_unit_items, list_inputs, \
    read_bytes, read_captions, select_part
from datamodules.prepare_locks import OutputLocks, PrepareBusyError
from datamodules.prepare_plan import PLAN_FILE, describe_change, make_plan, plan_units, read_plan, unit_inputs
from datamodules.sample_format import encode_sample, sanitize_key
from videolavit.video import errors
from videolavit.video.decompose import DecomposeConfig, decompose_video

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
UNITS_DIR = ".units"
PARTIAL_DIR = ".partial"
UNEXPECTED_ERROR = "unexpected_error"
MARKER_VERSION = 2
_UNIT_SHARD = re.compile(r"^(videos|tar)-.+-\d{3}\.tar$")


class SettingsMismatchError(InputError):
    """The output directory was prepared with other decoding settings."""


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
    drop_removed: bool = False  # redo finished units whose input files are gone, without them


def check_settings(cfg: PrepareConfig) -> None:
    """Numbers that cannot work, named by their command-line option (before any work starts)."""
    d = cfg.decompose
    bounds = [("--videos-per-unit", cfg.videos_per_unit, 1), ("--workers", cfg.workers, 1),
              ("--max-shard-samples", cfg.max_shard_samples, 1), ("--max-shard-mb", cfg.max_shard_bytes, 1),
              ("--fps", d.fps, 1), ("--bit-rate", d.bit_rate, 1), ("--max-clips", d.max_clips, 1)]
    for option, value, low in bounds:
        if value < low:
            raise InputError(f"{option} must be positive (got {value})")
    if d.max_seconds is not None and d.max_seconds <= 0:
        raise InputError(f"--max-seconds must be positive, or 0 for no cut (got {d.max_seconds})")
    if d.max_short_side is not None and d.max_short_side < d.min_side:
        raise InputError(f"--max-short-side must be at least {d.min_side}, or 0 for no downscale "
                         f"(got {d.max_short_side})")
    if not 0 <= cfg.part < cfg.num_parts:
        raise InputError(f"--part {cfg.part}/{cfg.num_parts}: need 0 <= i < N")


def _check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable ({exc.strerror or exc}); pass another --out"
                         ) from None


def _decompose_item(job: tuple[InputItem, DecomposeConfig, bool]) -> dict:
    """Worker: decompose one video into an encoded shard sample, or report why it is skipped."""
    item, cfg, allow_missing = job
    key = sanitize_key(item.source_id)
    if item.skip is not None:
        return {"skip": item.skip[0], "id": item.source_id, "detail": item.skip[1]}
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


def _marker_path(out: Path, name: str) -> Path:
    return out / UNITS_DIR / f"{name}.json"


def _read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _finished(out: Path, marker: dict | None, config: dict, unit: dict | None = None) -> bool:
    """A marker of this version and settings (for ``unit`` when given) whose shards are all on disk and whose
    counts add up; anything else is a unit to redo."""
    if marker is None or marker.get("version") != MARKER_VERSION or marker.get("config") != config:
        return False
    if unit is not None and marker.get("unit") != unit:
        return False
    shards = marker["shards"]
    if any(not (out / s["name"]).is_file() or (out / s["name"]).stat().st_size != s["bytes"] for s in shards):
        return False
    if sum(s["samples"] for s in shards) != marker["written"]:
        return False
    expected = unit_inputs(marker["unit"])
    return expected is None or marker["written"] + sum(marker["skipped"].values()) == expected


def _markers(out: Path) -> list[tuple[Path, dict | None]]:
    return [(p, _read_json(p)) for p in sorted((out / UNITS_DIR).glob("*.json")) if p.name != PLAN_FILE]


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
        """Move the shards into place. An older marker of this unit goes first, with its shards, so a crash
        at any point leaves the unit unfinished (redone by the next run), never half old and half new."""
        self.writer.close()
        fresh = sorted(p for p in self.partial.glob("*.tar") if self.samples[p.name] > 0)
        marker = _marker_path(self.out, self.unit.name)
        old = _read_json(marker)
        if marker.exists():
            marker.unlink()
        for shard in (old or {}).get("shards", []):
            if shard["name"] not in {p.name for p in fresh}:
                (self.out / shard["name"]).unlink(missing_ok=True)
        shards = []
        for path in fresh:
            target = self.out / path.name
            os.replace(path, target)
            shards.append({"name": path.name, "samples": self.samples[path.name], "bytes": target.stat().st_size})
        shutil.rmtree(self.partial, ignore_errors=True)
        return shards


def _config_record(cfg: PrepareConfig) -> dict:
    return {"decompose": dataclasses.asdict(cfg.decompose), "allow_missing_captions": cfg.allow_missing_captions}


def _write_json_atomic(path: Path, record: dict, indent: int | None = 1) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=indent))
    os.replace(tmp, path)


def _check_settings_on_disk(out: Path, stored: dict | None, config: dict) -> None:
    recorded = [stored["config"]] if stored is not None else [m["config"] for _, m in _markers(out)
                                                              if m is not None and "config" in m]
    other = next((c for c in recorded if c != config), None)
    if other is not None:
        keys = sorted(k for k in set(other) | set(config) if other.get(k) != config.get(k))
        if "decompose" in keys:
            keys = sorted(set(keys) - {"decompose"} | {k for k in set(other["decompose"]) | set(config["decompose"])
                                                        if other["decompose"].get(k) != config["decompose"].get(k)})
        raise SettingsMismatchError(f"{out} holds shards prepared with other settings ({', '.join(keys)}); "
                                    "rerun with the same settings, use another --out, or delete it")


def _remove_stale(out: Path, plan: dict) -> None:
    """After a replan: drop markers that are not finished units of the plan, their shards, stray unit shards
    (a kill between moving shards and writing the marker) and partial writes. Only called while no other run
    is active."""
    planned = {u["name"]: u for u in plan["units"]}
    kept_shards = set()
    for path, marker in _markers(out):
        record = (marker or {}).get("unit")
        unit = planned.get(record.get("name")) if isinstance(record, dict) else None
        if unit is not None and _finished(out, marker, plan["config"], unit):
            kept_shards |= {s["name"] for s in marker["shards"]}
            continue
        path.unlink()
    for shard in out.glob("*.tar"):
        if _UNIT_SHARD.match(shard.name) and shard.name not in kept_shards:
            shard.unlink()
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)


def _settle_plan(out: Path, inputs: Inputs, cfg: PrepareConfig, config: dict, locks: OutputLocks) -> dict:
    """The stored plan when it still describes these inputs and settings, else a new one (only while no other
    run is active). Called holding the planning lock."""
    units_dir = out / UNITS_DIR
    stored = read_plan(units_dir)
    _check_settings_on_disk(out, stored, config)
    change = describe_change(stored, inputs, cfg.videos_per_unit) if stored is not None else "no plan yet"
    if change is None:
        return stored
    if not locks.try_exclusive():
        raise PrepareBusyError(f"{out}: the inputs or settings differ from its unit plan ({change}) and another "
                               "prepare is running on it; the plan can only change while none is, so rerun this "
                               "one when the others have finished")
    finished = [m["unit"] for _, m in _markers(out) if _finished(out, m, config)]
    plan = make_plan(inputs, cfg.videos_per_unit, config, finished, cfg.drop_removed)
    _remove_stale(out, plan)
    _write_json_atomic(units_dir / PLAN_FILE, plan, indent=None)
    if stored is not None:
        kept = sum(1 for u in plan["units"] if _finished(out, _read_json(_marker_path(out, u["name"])), config, u))
        log.info("%s: new unit plan (%s): %d of %d units kept as finished", out, change, kept, len(plan["units"]))
    return plan


def write_manifest(out: Path, plan: dict) -> dict:
    """Aggregate the finished units of the plan into ``manifest.json`` and ``skipped.jsonl`` (atomic replace).

    Counts come from the markers that pass ``_finished``: ``written`` equals the samples of the listed shards
    and ``written`` + the skips equals ``inputs``."""
    skipped: Counter[str] = Counter()
    shards, done, inputs_done = [], 0, 0
    tmp = out / f".skipped.jsonl.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        for unit in plan["units"]:
            marker = _read_json(_marker_path(out, unit["name"]))
            if not _finished(out, marker, plan["config"], unit):
                continue
            done += 1
            skipped.update(marker["skipped"])
            shards.extend(marker["shards"])
            inputs_done += marker["written"] + sum(marker["skipped"].values())
            for entry in marker["skipped_items"]:
                handle.write(json.dumps(entry) + "\n")
    os.replace(tmp, out / "skipped.jsonl")
    written = sum(s["samples"] for s in shards)
    manifest = {
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "inputs": inputs_done,
        "input_files": sum(len(u.get("files", [])) + ("tar" in u) for u in plan["units"]),
        "shards": [s["name"] for s in shards],
        "shard_samples": {s["name"]: s["samples"] for s in shards},
        "units_done": done,
        "units_total": len(plan["units"]),
        "complete": done == len(plan["units"]),
        "config": plan["config"],
    }
    _write_json_atomic(out / MANIFEST, manifest, indent=2)
    return manifest


def run_prepare(cfg: PrepareConfig) -> dict:
    """Run (or resume) preparation of this part; returns the aggregated manifest."""
    check_settings(cfg)
    captions = read_captions(cfg.captions, cfg.id_column, cfg.caption_column) if cfg.captions else None
    out = Path(cfg.out)
    inputs = list_inputs(cfg.videos, exclude=[out] + ([cfg.captions] if cfg.captions else []))
    _check_output(out)
    (out / UNITS_DIR).mkdir(exist_ok=True)
    config = _config_record(cfg)
    locks = OutputLocks(out / UNITS_DIR)
    pool, bar = None, None
    try:
        with locks.planning():
            plan = _settle_plan(out, inputs, cfg, config, locks)
            locks.hold_shared()
            mine = select_part(plan_units(plan, inputs.base), cfg.part, cfg.num_parts)
            taken = locks.claim_units(u.index for u in mine)
            if taken is not None:
                raise PrepareBusyError(f"another prepare is already working on --part {cfg.part}/{cfg.num_parts} "
                                       f"of {out}, or on a part overlapping it (unit {plan['units'][taken]['name']});"
                                       " wait for it to finish or run another part (a killed run's locks are "
                                       "released by the OS)")
        todo = [u for u in mine
                if not _finished(out, _read_json(_marker_path(out, u.name)), config, plan["units"][u.index])]
        if len(todo) < len(mine):
            log.info("resuming: %d of %d units of this part are already done", len(mine) - len(todo), len(mine))
        known = sum(len(u.files) for u in todo)
        bar = tqdm(total=known if all(u.tar is None for u in todo) else None, unit="video", desc="prepare",
                   disable=(not cfg.progress) if cfg.progress is not None else None)
        workers = max(1, cfg.workers)
        if workers > 1 and todo:
            context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = context.Pool(workers, maxtasksperchild=200)
        totals: Counter[str] = Counter()
        for unit in todo:
            _prepare_unit(out, unit, plan["units"][unit.index], cfg, captions, inputs, pool, workers, config,
                          bar, totals)
        with locks.planning():
            manifest = write_manifest(out, plan)
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
        locks.close()
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(totals.items()) if k != "written") or "none"
    log.info("part %d/%d: wrote %d samples; skipped %s. Manifest: %s", cfg.part, cfg.num_parts,
             totals["written"], skipped, out / MANIFEST)
    return manifest


def _prepare_unit(out: Path, unit: Unit, record: dict, cfg: PrepareConfig, captions, inputs: Inputs, pool,
                  workers: int, config: dict, bar, totals: Counter) -> None:
    writer = _UnitWriter(out, unit, cfg)
    skipped: Counter[str] = Counter()
    skipped_items, written = [], 0
    items = iter_unit_items(unit, inputs.base, captions, inputs.duplicates)
    jobs = ((item, cfg.decompose, cfg.allow_missing_captions) for item in items)
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
    marker = {"version": MARKER_VERSION, "unit": record, "index": unit.index, "written": written,
              "skipped": dict(skipped), "skipped_items": skipped_items, "shards": shards, "config": config}
    _write_json_atomic(_marker_path(out, unit.name), marker)
    totals["written"] += written
    totals.update(skipped)
