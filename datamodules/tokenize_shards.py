"""``tokenize``: prepared video shards -> token shards, with the frozen stage-1 tokenizers (docs/design.md §3).

The LLM stages read code ids, never videos: running the release-size tokenizers inside their CPU data loaders
would starve the GPUs by orders of magnitude. This job runs them once, ahead of training, on GPUs or CPU.

Each input shard is a unit, published whole and then marked done, so a killed job reruns only the units it was
working on and never duplicates a video; the exports' fingerprint is recorded everywhere, so a rerun with other
exports is refused; units are dealt to every process (``--part``, launch ranks, devices) and nothing is shared
but the output directory, so nodes never wait for each other. ``run_tokenize``'s docstring has the details.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from tqdm import tqdm

from datamodules.sample_format import decode_sample
from datamodules.shard_list import resolve_shards
from datamodules.skip_tracker import SKIPS
from datamodules.tar_reader import iter_tar_samples
from videolavit.llm.token_shards import encode_token_sample
from videolavit.llm.video_codes import (
    VideoCoder,
    export_files,
    export_num_codes,
    exports_fingerprint,
    keyframe_inputs,
    motion_clip_inputs,
)
from videolavit.llm.vocabulary import Vocabulary
from videolavit.models.export_names import KEYFRAME_TOKENIZER, MOTION_TOKENIZER
from videolavit.video import errors
from videolavit.video.clips import CLIP_FRAMES, select_clip_starts

log = logging.getLogger(__name__)

FORMAT = "videolavit-token-shards"
MANIFEST = "manifest.json"
UNITS_DIR = ".units"
PARTIAL_DIR = ".partial"


class TokenizeError(ValueError):
    """A tokenize job that cannot run as asked (bad inputs or an output directory made otherwise)."""


@dataclass
class TokenizeConfig:
    """Args:
        shards: prepared video shards (a ``prepare`` directory, manifest, pattern or list; ``resolve_shards``).
        exports: directory with the stage-1 exports (``motion_tokenizer.*``, and ``keyframe_tokenizer.*``).
        out: output directory of the token shards and ``manifest.json``.
        keyframes: tokenise keyframes too (None: if a keyframe tokenizer export is there).
        keyframe_backbone_weights: local ViT weight file, overriding the one recorded in the keyframe export.
        devices: where the tokenizers run; one process per entry (e.g. ``["cuda:0", "cuda:1"]``).
        part, num_parts: this job's share of the units (``--part i/N``).
        max_clips: clips per video (``select_clip_starts``; the LLM views select at most as many).
        batch_clips: clips per tokenizer batch (gathered across videos).
        workers: decoding processes per device process (0: decode in the same process).
        max_shard_bytes, max_shard_samples: size bounds of a token shard.
        progress: tqdm bar (None: only on a terminal).
    """

    shards: str | list[str]
    exports: str
    out: str
    keyframes: bool | None = None
    keyframe_backbone_weights: str | None = None
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    part: int = 0
    num_parts: int = 1
    max_clips: int = 8
    batch_clips: int = 64
    workers: int = 0
    max_shard_bytes: int = 1 << 30
    max_shard_samples: int = 10_000
    progress: bool | None = None

    def settings(self) -> dict:
        """What must be equal for a rerun to continue an output directory."""
        return {"keyframes": self.keyframes, "max_clips": self.max_clips, "clip_frames": CLIP_FRAMES}


# ------------------------------------------------------------------------------------------- layout
def launch_slot() -> tuple[int, int]:
    """(rank, world size) of this process in a torchrun / srun launch; (0, 1) outside one."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def list_units(shards: str | list[str]) -> list[tuple[str, str]]:
    """(unit name, input shard URL) of every input shard; names are the shards' file stems (must be unique)."""
    units = []
    for index, url in enumerate(resolve_shards(shards)):
        # the last "<name>.tar" in the URL (a path, or inside a pipe: command such as "pipe:aws s3 cp ... -")
        found = re.findall(r"([^/\s]+?)\.tar\b", url)
        units.append((found[-1] if found else f"shard{index:06d}", url))
    names = [n for n, _ in units]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TokenizeError(f"input shards share file names {twice[:3]}: token shards are named after their input "
                            "shard, tokenize those corpora into separate --out directories")
    return units


def _marker(out: Path, unit: str) -> Path:
    return out / UNITS_DIR / f"{unit}.json"


def unit_done(out: Path, unit: str, fingerprint: str, settings: dict) -> bool:
    """Whether ``unit`` was finished by an earlier run with the same exports; refuses other exports/settings."""
    marker = _marker(out, unit)
    if not marker.is_file():
        return False
    record = json.loads(marker.read_text())
    if record.get("fingerprint") != fingerprint:
        raise TokenizeError(f"{out} holds token shards of other tokenizer exports (fingerprint "
                            f"{str(record.get('fingerprint'))[:12]}…, these are {fingerprint[:12]}…; {marker}): use "
                            "another --out, or delete it to retokenize")
    if record.get("settings") != settings:
        raise TokenizeError(f"{out} holds token shards made with other settings {record.get('settings')} (now "
                            f"{settings}; {marker}): use another --out or the same settings")
    if record.get("source_bytes") != _source_bytes(record.get("source", "")):
        return False  # the input shard was replaced since: tokenise it again
    return all((out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
               for s in record["shards"])


def _source_bytes(url: str) -> int | None:
    """Size of a local input shard (None for remote URLs), recorded to notice a replaced input."""
    path = Path(url)
    return path.stat().st_size if path.is_file() else None


def write_manifest(out: Path) -> dict:
    """Aggregate every unit marker into ``OUT/manifest.json`` and ``OUT/skipped.jsonl`` (locked, atomic)."""
    import fcntl

    with open(out / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = [json.loads(p.read_text()) for p in sorted((out / UNITS_DIR).glob("*.json"))]
        skipped: Counter[str] = Counter()
        shards: list[dict] = []
        with open(out / "skipped.jsonl.tmp", "w") as handle:
            for record in records:
                skipped.update(record["skipped"])
                shards += record["shards"]
                for entry in record["skipped_items"]:
                    handle.write(json.dumps(entry) + "\n")
        os.replace(out / "skipped.jsonl.tmp", out / "skipped.jsonl")
        first = records[0] if records else {}
        total = first.get("units_total")
        manifest = {
            "format": FORMAT, "fingerprint": first.get("fingerprint"), "codes": first.get("codes"),
            "settings": first.get("settings"), "exports": first.get("exports"),
            "written": sum(r["written"] for r in records), "skipped": dict(sorted(skipped.items())),
            "clips": sum(r["clips"] for r in records),
            "shards": [s["name"] for s in shards], "shard_samples": {s["name"]: s["samples"] for s in shards},
            "units_done": len(records), "units_total": total,
            "complete": total is not None and len(records) == total,
        }
        tmp = out / f"{MANIFEST}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out / MANIFEST)
    return manifest


# ------------------------------------------------------------------------------------------- decoding
@dataclass
class DecodedVideo:
    """What the tokenizers need of one video (or why it is skipped)."""

    key: str
    caption: str = ""
    meta: dict | None = None
    starts: list[int] | None = None
    motion: torch.Tensor | None = None  # [clips, 2, T, h, w]
    keyframes: torch.Tensor | None = None  # [clips, 3, S, S]
    skip: tuple[str, str] | None = None  # (reason, detail)


def decode_for_tokens(job: tuple[dict, tuple[int, int], int | None, int]) -> DecodedVideo:
    """Worker: a raw shard sample -> the tokenizers' inputs (no model needed here)."""
    raw, grid, image_size, max_clips = job
    key = raw.get("__key__", "?")
    try:
        sample = decode_sample(raw, need_video=image_size is not None)
        meta = sample["meta"]
        starts = select_clip_starts(meta["iframes"], meta["num_frames"], CLIP_FRAMES, max_clips)
        if not starts:
            raise errors.VideoSkip(errors.TOO_SHORT, f"{key}: no {CLIP_FRAMES}-frame clip")
        motion = motion_clip_inputs(sample["motion"], starts, grid)
        keyframes = keyframe_inputs(sample["mp4"], meta, starts, image_size) if image_size is not None else None
    except errors.VideoSkip as skip:
        return DecodedVideo(key, skip=(skip.reason, skip.detail))
    except (KeyError, TypeError, ValueError) as exc:  # metadata that does not describe the video
        return DecodedVideo(key, skip=(errors.CORRUPT_SAMPLE, f"{type(exc).__name__}: {exc}"))
    return DecodedVideo(key, sample["caption"], meta, starts, motion, keyframes)


# ------------------------------------------------------------------------------------------- one process
class UnitWriter:
    """One unit's token shards in a partial directory, published (renamed) together when the unit is done."""

    def __init__(self, out: Path, unit: str, cfg: TokenizeConfig):
        self.out, self.unit = out, unit
        self.partial = out / PARTIAL_DIR / unit
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.writer = wds.ShardWriter(str(self.partial / f"{unit}-%03d.tar"), maxcount=cfg.max_shard_samples,
                                      maxsize=cfg.max_shard_bytes, verbose=0, mtime=0)  # int: no pax header per member
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


class Tokenizer:
    """The job's work in one process: its units, on one device."""

    def __init__(self, cfg: TokenizeConfig, device: str, fingerprint: str, vocabulary: Vocabulary):
        self.cfg, self.out, self.fingerprint = cfg, Path(cfg.out), fingerprint
        self.coder = VideoCoder(vocabulary, cfg.exports, cfg.exports if cfg.keyframes else None,
                                keyframe_backbone_weights=cfg.keyframe_backbone_weights, device=device)
        self.grid = self.coder.motion_grid
        self.image_size = self.coder.keyframe_image_size() if cfg.keyframes else None

    def _inputs(self, url: str, pool) -> Iterator[DecodedVideo]:
        jobs = ((raw, self.grid, self.image_size, self.cfg.max_clips) for raw in iter_tar_samples(url))
        if pool is None:
            return map(decode_for_tokens, jobs)
        return pool.imap(decode_for_tokens, jobs, chunksize=2)

    def _flush(self, unit: str, batch: list[DecodedVideo], index: int, writer: UnitWriter) -> int:
        """Tokenise a batch of videos (clips of all of them at once) and write their token samples; clips done."""
        motion = self.coder.motion_codes(torch.cat([v.motion for v in batch]))
        keyframes = None
        if self.cfg.keyframes:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(zlib.crc32(f"{unit}/{index}".encode()))
                keyframes = self.coder.image_codes(torch.cat([v.keyframes for v in batch]))
        vocab, offset = self.coder.vocabulary, 0
        for video in batch:
            n = len(video.starts)
            writer.write(encode_token_sample(
                video.key, video.caption, video.meta, video.starts, motion[offset:offset + n],
                keyframes[offset:offset + n] if keyframes is not None else None, self.fingerprint,
                vocab.motion_codes, vocab.visual_codes if keyframes is not None else None))
            offset += n
        return offset

    def run_unit(self, unit: str, url: str, units_total: int, pool, bar) -> dict:
        writer = UnitWriter(self.out, unit, self.cfg)
        SKIPS.start_stream()  # counts truncated shards seen by the reader
        skipped: Counter[str] = Counter()
        skipped_items: list[dict] = []
        batch: list[DecodedVideo] = []
        written = clips = batches = 0
        for video in self._inputs(url, pool):
            bar.update(1)
            if video.skip is not None:
                skipped[video.skip[0]] += 1
                skipped_items.append({"key": video.key, "reason": video.skip[0], "detail": video.skip[1],
                                      "unit": unit})
                log.warning("skipped %s: %s (%s)", video.key, *video.skip)
                continue
            batch.append(video)
            if sum(len(v.starts) for v in batch) >= self.cfg.batch_clips:
                clips += self._flush(unit, batch, batches, writer)
                written, batches, batch = written + len(batch), batches + 1, []
        if batch:
            clips += self._flush(unit, batch, batches, writer)
            written += len(batch)
        for reason, count in SKIPS.counts.items():
            skipped[reason] += count
            skipped_items.append({"key": url, "reason": reason, "detail": f"{count} while reading", "unit": unit})
        shards = writer.publish()
        vocab = self.coder.vocabulary
        record = {"unit": unit, "source": url, "source_bytes": _source_bytes(url), "units_total": units_total,
                  "written": written, "clips": clips,
                  "skipped": dict(skipped), "skipped_items": skipped_items, "shards": shards,
                  "fingerprint": self.fingerprint, "settings": self.cfg.settings(),
                  "codes": {"motion_codes": vocab.motion_codes,
                            "visual_codes": vocab.visual_codes if self.cfg.keyframes else None},
                  "exports": str(self.cfg.exports)}
        tmp = _marker(self.out, unit).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, _marker(self.out, unit))
        return record


def _vocabulary(cfg: TokenizeConfig) -> Vocabulary:
    """A layout with the exports' code counts (text ids do not matter to the job)."""
    visual = export_num_codes(cfg.exports, KEYFRAME_TOKENIZER) if cfg.keyframes else 1
    return Vocabulary(text_size=1, visual_codes=visual, motion_codes=export_num_codes(cfg.exports, MOTION_TOKENIZER))


def _expected_videos(shards, urls: list[str]) -> int | None:
    """Videos in ``urls`` according to the prepared manifests (None when unknown)."""
    counts: dict[str, int] = {}
    for spec in [shards] if isinstance(shards, str) else list(shards):
        path = Path(spec)
        manifest = path / MANIFEST if path.is_dir() else path
        if manifest.name == MANIFEST and manifest.is_file():
            record = json.loads(manifest.read_text())
            counts.update({str(manifest.parent / k): v for k, v in record.get("shard_samples", {}).items()})
    found = [counts.get(url) for url in urls]
    return None if any(c is None for c in found) else sum(found)


def run_process(cfg: TokenizeConfig, device_index: int) -> dict:
    """Tokenise this process' units (slot: part x launch rank x device); returns its totals."""
    out = Path(cfg.out)
    units = list_units(cfg.shards)
    rank, world = launch_slot()
    slots = cfg.num_parts * world * len(cfg.devices)
    slot = (cfg.part * world + rank) * len(cfg.devices) + device_index
    fingerprint = exports_fingerprint(cfg.exports, cfg.exports if cfg.keyframes else None)
    settings = cfg.settings()
    mine = units[slot::slots]
    todo = [(n, u) for n, u in mine if not unit_done(out, n, fingerprint, settings)]
    totals: Counter[str] = Counter(resumed_units=len(mine) - len(todo))
    if not todo:
        return dict(totals)
    device = cfg.devices[device_index]
    tokenizer = Tokenizer(cfg, device, fingerprint, _vocabulary(cfg))
    bar = tqdm(total=_expected_videos(cfg.shards, [u for _, u in todo]), unit="video",
               desc=f"tokenize {device}", position=device_index,
               disable=(not cfg.progress) if cfg.progress is not None else None)
    context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = context.Pool(cfg.workers, maxtasksperchild=500) if cfg.workers > 0 else None
    try:
        for name, url in todo:
            record = tokenizer.run_unit(name, url, len(units), pool, bar)
            totals["written"] += record["written"]
            totals["units"] += 1
            totals.update({f"skipped_{k}": v for k, v in record["skipped"].items()})
            bar.set_postfix(written=totals["written"], refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return dict(totals)


def _spawned(cfg_dict: dict, device_index: int, results) -> None:
    results.put(run_process(TokenizeConfig(**cfg_dict), device_index))


def run_tokenize(cfg: TokenizeConfig) -> tuple[dict, dict]:
    """Run (or resume) this job; returns (the manifest over every unit finished so far, this job's totals).

    * **Units.** Each input shard is one unit; it becomes one or more size-bounded token shards
      (``<input stem>-NNN.tar``, one sample per video, under the video's key; format ``videolavit.llm.token_shards``),
      written under ``OUT/.partial/<unit>/`` and renamed into ``OUT`` when the unit is finished, then recorded by a
      marker ``OUT/.units/<unit>.json`` (written atomically, last). A rerun skips units whose marker and shards are
      complete, so a killed job loses at most the units it was working on and never duplicates a video (a unit is
      always rewritten whole, under the same names).
    * **Exports.** The fingerprint (``exports_fingerprint``: a hash of the export files) is in every marker, every
      sample and the manifest; a rerun with other exports (or other settings) into the same ``OUT`` is refused.
    * **Parallelism.** Units are dealt round-robin to every process of the job: ``--part i/N`` jobs (any scheduler),
      times the ranks of a ``torchrun``/``srun`` launch (``RANK``/``WORLD_SIZE``, or ``SLURM_PROCID``/
      ``SLURM_NTASKS``), times the local ``devices`` (one process each). Nothing is shared but the output directory,
      so nodes never wait for each other; every process rewrites ``OUT/manifest.json`` from all markers when it
      finishes (under a lock), and the manifest says ``complete`` once every unit is done.
    * **Batching.** Videos are decoded (keyframes as RGB at the ViT's input size, motion fields at the tokenizer's
      grid) by ``workers`` processes, and the tokenizers run on batches of ``batch_clips`` clips gathered across
      videos, so a GPU stays busy whatever the clips per video. The keyframe tokenizer's random patch selection (tiny
      exports sample it) is seeded per unit and batch: a rerun writes the same ids.
    * **Bad input.** A sample that cannot be decoded, or a video without a full clip, is a counted skip by reason
      (``skipped`` in the markers and the manifest, with keys in ``OUT/skipped.jsonl``); a cut shard is counted as
      ``truncated_shard`` and its intact samples are kept.
    """
    if not 0 <= cfg.part < cfg.num_parts:
        raise TokenizeError(f"--part {cfg.part}/{cfg.num_parts}: need 0 <= i < N")
    if not cfg.devices:
        raise TokenizeError("no device to tokenize on; pass --devices cpu (or cuda, cuda:0,cuda:1, ...)")
    export_files(cfg.exports, MOTION_TOKENIZER)
    has_keyframe = all((Path(cfg.exports) / f"{KEYFRAME_TOKENIZER}{s}").is_file() for s in (".json", ".safetensors"))
    if cfg.keyframes is None:
        cfg.keyframes = has_keyframe
    elif cfg.keyframes and not has_keyframe:
        export_files(cfg.exports, KEYFRAME_TOKENIZER)  # names the missing file
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / UNITS_DIR).mkdir(exist_ok=True)
    manifest = out / MANIFEST
    fingerprint = exports_fingerprint(cfg.exports, cfg.exports if cfg.keyframes else None)
    if manifest.is_file():
        found = json.loads(manifest.read_text()).get("fingerprint")
        if found not in (None, fingerprint):
            raise TokenizeError(f"{out} holds token shards of other tokenizer exports (fingerprint {found[:12]}…, "
                                f"these are {fingerprint[:12]}…): use another --out, or delete it to retokenize")
    if len(cfg.devices) == 1:
        totals = run_process(cfg, 0)
    else:
        context = mp.get_context("spawn")
        results = context.Queue()
        processes = [context.Process(target=_spawned, args=(asdict(cfg), i, results)) for i in range(len(cfg.devices))]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        totals = Counter()
        while not results.empty():
            totals.update(results.get())
        failed = [cfg.devices[i] for i, p in enumerate(processes) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"tokenize processes on {failed} failed (see their output above)")
        totals = dict(totals)
    with contextlib.suppress(OSError):
        (out / PARTIAL_DIR).rmdir()  # only when empty: other jobs may be writing their units there
    return write_manifest(out), totals


__all__ = ["TokenizeConfig", "TokenizeError", "run_tokenize", "write_manifest", "list_units", "launch_slot",
           "FORMAT", "MANIFEST"]
