"""Text-to-video evaluation (paper A.4): generate a video per prompt, score it against the real videos.

The model is reached only through ``generate(prompts, generator) -> uint8 [B, T, 3, H, W]``, so any
text-to-video pipeline plugs in. Metrics are the project's own (``videolavit.metrics``) with local
weights; a protocol scores only the metrics whose weights are given:

- MSR-VTT: CLIPSIM (frames vs. prompt), FVD and frame FID against the test videos;
- UCF-101: FVD against the class videos, video Inception Score (C3D) of the generated videos;
- CSV: any of them.

Real-side statistics of FVD / FID depend only on the data and the metric, so they are computed once
and cached as ``.npz`` (:meth:`FrechetDistance.save_real_statistics`) under a name keyed by the
metric's fingerprint, the protocol, the set of real videos and how they were decoded; a later run
loads them and never touches the real videos. Unreadable real videos are skipped and counted with
their reasons; generation failures are errors (they mean the pipeline is broken, not the data).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import av
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from videolavit.evaluation.protocols import EvalItem
from videolavit.metrics.weights import MissingWeightsError
from videolavit.video import errors

log = logging.getLogger(__name__)

GenerateFn = Callable[[list[str], torch.Generator], Tensor]
ClipPosition = Literal["first", "center"]

MISSING_FILE = "missing_file"
UNEXPECTED_ERROR = "unexpected_error"

# Which metrics a protocol reports, and the MetricSettings field (= command-line flag) holding each one's weights.
PROTOCOL_METRICS: dict[str, tuple[str, ...]] = {
    "msrvtt": ("clipsim", "fvd", "fid"),
    "ucf101": ("fvd", "is"),
    "csv": ("clipsim", "fvd", "fid", "is"),
}
METRIC_WEIGHTS = {"fvd": "i3d", "clipsim": "clip", "fid": "fid_weights", "is": "c3d"}
METRIC_TITLES = {"fvd": "FVD", "clipsim": "CLIPSIM", "fid": "frame FID", "is": "IS"}
FRECHET_METRICS = ("fvd", "fid")  # the ones with a real side


def weights_flag(option: str) -> str:
    """The command-line flag of a MetricSettings weights field: fid_weights → --fid-weights."""
    return "--" + option.replace("_", "-")


def protocol_weight_flags(protocol: str) -> str:
    """'--i3d (FVD), --c3d (IS)': the flags that enable the protocol's metrics, for error messages."""
    return ", ".join(f"{weights_flag(METRIC_WEIGHTS[n])} ({METRIC_TITLES[n]})" for n in PROTOCOL_METRICS[protocol])


class EvaluationError(ValueError):
    """The evaluation cannot produce a meaningful number (no real videos, too few samples, ...)."""


class GeneratedVideoError(EvaluationError):
    """The generate callable broke its contract (uint8 [B, T, 3, H, W], one video per prompt)."""


@dataclass(frozen=True)
class RealVideoSettings:
    """How a real video becomes the clip the metrics see (recorded in the output and the cache key).

    ``num_frames`` consecutive frames (at the file's own rate, or resampled to ``fps``) from the start
    (``first``) or the middle (``center``: skips intros and fade-ins) of the video; shorter videos are
    stretched by repeating frames. ``short_side`` downscales during decoding (None: native size; the
    metrics resize to their own input size in either case).
    """

    num_frames: int = 16
    fps: float | None = None
    clip: ClipPosition = "center"
    short_side: int | None = None

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {self.num_frames}")
        if self.clip not in ("first", "center"):
            raise ValueError(f"clip must be 'first' or 'center', got '{self.clip}'")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")


@dataclass(frozen=True)
class MetricSettings:
    """Local weights of the metric networks (None: that metric is not computed) and their protocol knobs."""

    i3d: str | Path | None = None  # FVD: pytorch-i3d state dict or TorchScript detector
    clip: str | Path | None = None  # CLIPSIM: CLIP directory (ViT-B/16 in the paper)
    fid_weights: str | Path | None = None  # frame FID: TorchScript Inception file or CLIP directory
    c3d: str | Path | None = None  # IS: C3D (UCF-101) state dict or TorchScript
    fvd_frames: int = 16
    fvd_resolution: int = 224
    fid_frames_per_video: int | None = None  # None: every frame counts
    is_splits: int = 10
    device: str = "cpu"

    def weights(self) -> dict[str, str | None]:
        return {option: (str(getattr(self, option)) if getattr(self, option) is not None else None)
                for option in METRIC_WEIGHTS.values()}


def build_metrics(protocol: str, settings: MetricSettings) -> dict[str, torch.nn.Module]:
    """The protocol's metrics whose weights are set, on ``settings.device``.

    Raises MissingWeightsError naming the flags when none of the protocol's metrics has weights, or
    when a given path does not exist.
    """
    if protocol not in PROTOCOL_METRICS:
        raise ValueError(f"unknown protocol '{protocol}'; choose one of {list(PROTOCOL_METRICS)}")
    wanted = [name for name in PROTOCOL_METRICS[protocol] if getattr(settings, METRIC_WEIGHTS[name]) is not None]
    if not wanted:
        raise MissingWeightsError(f"no metric weights given for protocol '{protocol}': set at least one of "
                                  f"{protocol_weight_flags(protocol)}")
    ignored = [name for name in METRIC_WEIGHTS if name not in PROTOCOL_METRICS[protocol]
               and getattr(settings, METRIC_WEIGHTS[name]) is not None]
    for name in ignored:
        log.warning("%s weights (%s) are ignored: protocol '%s' does not report %s", METRIC_TITLES[name],
                    weights_flag(METRIC_WEIGHTS[name]), protocol, METRIC_TITLES[name])
    from videolavit.metrics.clip_similarity import CLIPSimilarity
    from videolavit.metrics.fid import FrameFID
    from videolavit.metrics.fvd import FrechetVideoDistance
    from videolavit.metrics.inception_score import VideoInceptionScore

    constructors = {
        "fvd": lambda: FrechetVideoDistance(settings.i3d, num_frames=settings.fvd_frames,
                                            resolution=settings.fvd_resolution),
        "clipsim": lambda: CLIPSimilarity(settings.clip),
        "fid": lambda: FrameFID(settings.fid_weights, frames_per_video=settings.fid_frames_per_video),
        "is": lambda: VideoInceptionScore(settings.c3d, splits=settings.is_splits),
    }
    metrics = {}
    for name in wanted:
        try:
            metrics[name] = constructors[name]().to(settings.device)
        except MissingWeightsError as error:
            flag = weights_flag(METRIC_WEIGHTS[name])
            raise MissingWeightsError(f"{METRIC_TITLES[name]} ({flag}): {error}") from None
        except (OSError, RuntimeError, ValueError) as error:  # a file or folder that holds no usable network
            flag = weights_flag(METRIC_WEIGHTS[name])
            raise EvaluationError(f"{METRIC_TITLES[name]} ({flag}): cannot load the weights: {error}") from error
    return metrics


# -- real videos ----------------------------------------------------------------------------------------


def _presentation_keys(path: Path, stream_index: int) -> tuple[list[int], list[float], bool]:
    """Sorted frame keys and their times in seconds, from the container's packets (no decoding).

    Returns ``(keys, seconds, by_index)``: keys are pts values, or, when packets lack timestamps,
    frame indices found by decoding once (``by_index`` True).
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[stream_index]
        packets = [packet.pts for packet in container.demux(stream) if packet.size]
        time_base = float(stream.time_base) if stream.time_base else None
        if packets and time_base and None not in packets and len(set(packets)) == len(packets):
            keys = sorted(pts for pts in packets if pts >= 0)  # negative pts: cut by an edit list
            if keys:
                return keys, [key * time_base for key in keys], False
        rate = float(stream.average_rate or stream.guessed_rate or 25)
    with av.open(str(path)) as container:
        count = sum(1 for _ in container.decode(video=stream_index))
    return list(range(count)), [index / rate for index in range(count)], True


def _clip_positions(seconds: list[float], settings: RealVideoSettings) -> list[int]:
    """Indices (into the sorted frames) of the clip's frames."""
    n, wanted = len(seconds), settings.num_frames
    if settings.fps is None:
        if n < wanted:
            return np.linspace(0, n - 1, wanted).round().astype(int).tolist()
        start = 0 if settings.clip == "first" else (n - wanted) // 2
        return list(range(start, start + wanted))
    times = np.asarray(seconds)
    span, total = (wanted - 1) / settings.fps, times[-1] - times[0]
    if total < span:
        targets = np.linspace(times[0], times[-1], wanted)
    else:
        offset = 0.0 if settings.clip == "first" else (total - span) / 2
        targets = times[0] + offset + np.arange(wanted) / settings.fps
    following = np.clip(np.searchsorted(times, targets), 0, n - 1)  # first frame at or after each target
    preceding = np.clip(following - 1, 0, n - 1)
    closer = np.abs(times[preceding] - targets) <= np.abs(times[following] - targets)
    return np.where(closer, preceding, following).astype(int).tolist()


def read_real_clip(path: str | Path, settings: RealVideoSettings = RealVideoSettings()) -> np.ndarray:
    """uint8 RGB frames [num_frames, H, W, 3] of a real video, chosen as ``settings`` says.

    Raises :class:`videolavit.video.errors.VideoSkip` with a named reason for files that cannot be used.
    """
    path = Path(path)
    if not path.is_file():
        raise errors.VideoSkip(MISSING_FILE, str(path))
    if path.stat().st_size == 0:
        raise errors.VideoSkip(errors.EMPTY_FILE, str(path))
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise errors.VideoSkip(errors.NO_VIDEO_STREAM, str(path))
            context = container.streams.video[0].codec_context
            width, height = context.width, context.height
        if not width or not height:
            raise errors.VideoSkip(errors.UNREADABLE, "video stream without a frame size")
        if settings.short_side is not None and min(width, height) > settings.short_side:
            scale = settings.short_side / min(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
        keys, seconds, by_index = _presentation_keys(path, 0)
    except errors.VideoSkip:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise errors.VideoSkip(errors.UNREADABLE, f"{type(error).__name__}: {error}") from None
    if not keys:
        raise errors.VideoSkip(errors.DECODE_ERROR, "no video frames")
    wanted = [keys[i] for i in _clip_positions(seconds, settings)]
    wanted_set, last = set(wanted), max(wanted)
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                key = index if by_index else frame.pts
                if key is None:
                    continue
                if key in wanted_set and key not in found:
                    found[key] = frame.to_ndarray(format="rgb24", width=width, height=height,
                                                  interpolation="BICUBIC")
                if len(found) == len(wanted_set) or key > last:
                    break
    except (av.error.FFmpegError, ValueError) as error:
        if not found:
            raise errors.VideoSkip(errors.DECODE_ERROR, f"{type(error).__name__}: {error}") from None
    if not found:
        raise errors.VideoSkip(errors.DECODE_ERROR, "none of the clip's frames decoded")
    # Frames the decoder did not output (damage, edit lists) are filled from the nearest decoded one.
    have = np.asarray(sorted(found))
    frames = [found[key] if key in found else found[int(have[np.abs(have - key).argmin()])] for key in wanted]
    return np.stack(frames)


def _read_or_skip(path: Path, settings: RealVideoSettings) -> np.ndarray | errors.VideoSkip:
    try:
        return read_real_clip(path, settings)
    except errors.VideoSkip as skip:
        return skip
    except Exception as error:  # noqa: BLE001 - bad input never stops the evaluation; reported per video
        return errors.VideoSkip(UNEXPECTED_ERROR, f"{type(error).__name__}: {error}")


def _decoded(entries: Sequence[tuple[str, Path]], settings: RealVideoSettings,
             workers: int) -> Iterator[tuple[str, Path, np.ndarray | errors.VideoSkip]]:
    """Decode in order with up to ``workers`` threads (PyAV releases the GIL while decoding),
    keeping at most 2 × workers clips in flight."""
    if workers <= 1:
        for video_id, path in entries:
            yield video_id, path, _read_or_skip(path, settings)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for video_id, path in entries:
            pending.append((video_id, path, pool.submit(_read_or_skip, path, settings)))
            if len(pending) >= 2 * workers:
                video_id_, path_, future = pending.popleft()
                yield video_id_, path_, future.result()
        while pending:
            video_id_, path_, future = pending.popleft()
            yield video_id_, path_, future.result()


def real_video_entries(items: Sequence[EvalItem], real_videos: Sequence[str | Path] | None = None
                       ) -> list[tuple[str, Path]]:
    """(id, path) of the real side: ``real_videos`` if given, else the items' own, each file once."""
    if real_videos is not None:
        pairs = [(Path(p).stem, Path(p)) for p in real_videos]
    else:
        pairs = [(item.id, item.real_video) for item in items if item.real_video is not None]
    seen, entries = set(), []
    for video_id, path in pairs:
        key = str(Path(path).expanduser())
        if key not in seen:
            seen.add(key)
            entries.append((video_id, Path(key)))
    return entries


def real_statistics_file(cache_dir: str | Path, protocol: str, metric_name: str, fingerprint: str,
                         entries: Sequence[tuple[str, Path]], settings: RealVideoSettings) -> Path:
    """Cache file of one metric's real statistics, named by a digest of everything they depend on:
    the metric's fingerprint (network and protocol), the benchmark, the real videos and the decoding
    settings. Benchmark videos are identified by id and file name (unique within MSR-VTT / UCF-101,
    so a moved copy of the data set keeps its cache); a CSV's videos by their absolute paths."""
    canonical_names = protocol in ("msrvtt", "ucf101")
    videos = hashlib.sha256("\n".join(
        f"{i}\t{p.name if canonical_names else p.expanduser().resolve()}" for i, p in entries).encode()).hexdigest()
    key = json.dumps({"fingerprint": fingerprint, "protocol": protocol, "videos": videos,
                      "decode": asdict(settings)}, sort_keys=True)
    return Path(cache_dir) / f"{protocol}-{metric_name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def to_symmetric(videos: Tensor) -> Tensor:
    """uint8 [..., 3, H, W] → float in [-1, 1], the metrics' input convention."""
    return videos.float().div(127.5).sub(1.0)


@dataclass
class _RealPass:
    videos_read: int = 0
    skipped: list[dict] = field(default_factory=list)


def _stream_real_side(entries, metrics: dict, settings: RealVideoSettings, batch_size: int, device: str,
                      workers: int, progress: bool) -> _RealPass:
    """Decode every real video once and add it to the real side of each metric in ``metrics``."""
    result = _RealPass()
    batch: list[Tensor] = []

    def flush() -> None:
        if batch:
            videos = to_symmetric(torch.stack(batch).to(device))
            for metric in metrics.values():
                metric.update(videos, real=True)
            batch.clear()

    bar = tqdm(total=len(entries), desc="real videos", unit="video", disable=not progress)
    for video_id, path, clip in _decoded(entries, settings, workers):
        bar.update(1)
        if isinstance(clip, errors.VideoSkip):
            result.skipped.append({"id": video_id, "path": str(path), "reason": clip.reason, "detail": clip.detail})
            log.warning("real video %s skipped: %s", path, clip)
            continue
        video = torch.from_numpy(clip).permute(0, 3, 1, 2)  # [T, 3, H, W]
        if batch and (video.shape != batch[0].shape or len(batch) >= batch_size):
            flush()  # a batch holds videos of one size
        batch.append(video)
        result.videos_read += 1
    flush()
    bar.close()
    return result


def _check_generated(videos, count: int) -> Tensor:
    if not isinstance(videos, Tensor):
        videos = torch.as_tensor(np.asarray(videos))
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[0] != count or videos.shape[2] != 3:
        raise GeneratedVideoError(
            f"generate() must return uint8 [B, T, 3, H, W] with B = {count} (one video per prompt); "
            f"got {videos.dtype} {list(videos.shape)}")
    return videos


def _safe_name(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in item_id)


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(partial, path)
    return path


def _real_side(scorers: dict, entries: list[tuple[str, Path]], protocol: str, settings: RealVideoSettings,
               cache_dir: str | Path | None, batch_size: int, device: str, workers: int,
               progress: bool) -> tuple[dict[str, dict], list[dict]]:
    """Give every Fréchet metric its real statistics: from the cache, or from one pass over the real
    videos (then cached). Returns the per-metric report and the skipped real videos."""
    report: dict[str, dict] = {}
    needs_real: dict[str, torch.nn.Module] = {}
    cache_files: dict[str, Path] = {}
    for name in (n for n in FRECHET_METRICS if n in scorers):
        metric = scorers[name]
        if cache_dir is not None:
            cache_files[name] = real_statistics_file(cache_dir, protocol, name, metric.fingerprint(), entries,
                                                     settings)
        cached = cache_files.get(name)
        if cached is not None and cached.is_file():
            metric.load_real_statistics(cached)
            note = cached.with_suffix(".json")
            written = json.loads(note.read_text()) if note.is_file() else {}
            report[name] = {"source": "cache", "path": str(cached), "num_samples": metric.real_statistics().n,
                            "num_videos": written.get("num_videos"),
                            "skipped_when_computed": written.get("skipped", {})}
        else:
            needs_real[name] = metric
    if not needs_real:
        return report, []
    titles = ", ".join(METRIC_TITLES[n] for n in needs_real)
    if not entries:
        raise EvaluationError(f"{titles} need real videos, but the protocol gives none (no video column / files)")
    if not any(path.is_file() for _, path in entries):
        raise EvaluationError(
            f"{titles} need real videos, but none of the {len(entries)} exists (first expected: "
            f"'{entries[0][1]}'). Check --root / the videos folder, or give cached statistics (--real-stats-dir).")
    real_pass = _stream_real_side(entries, needs_real, settings, batch_size, device, workers, progress)
    by_reason = dict(Counter(s["reason"] for s in real_pass.skipped))
    for name, metric in needs_real.items():
        n = int(metric.real_n)
        if n < 2:
            raise EvaluationError(f"{METRIC_TITLES[name]} needs at least 2 real samples; read "
                                  f"{real_pass.videos_read} real videos, skipped {len(real_pass.skipped)} "
                                  f"({by_reason})")
        report[name] = {"source": "computed", "path": None, "num_samples": n, "num_videos": real_pass.videos_read}
        if name in cache_files:
            metric.save_real_statistics(cache_files[name])
            write_json(cache_files[name].with_suffix(".json"), {
                "fingerprint": metric.fingerprint(), "protocol": protocol, "num_videos": real_pass.videos_read,
                "num_samples": n, "skipped": by_reason, "decode": asdict(settings)})
            report[name]["path"] = str(cache_files[name])
    return report, real_pass.skipped


def _generated_side(items: list[EvalItem], generate: GenerateFn, scorers: dict, batch_size: int, seed: int,
                    device: str, save_dir: Path | None, save_fps: int, progress: bool) -> list[int] | None:
    """Generate every item's video and add it to each metric; returns the generated [T, 3, H, W]."""
    from videolavit.video.writer import write_mp4

    generated_shape = None
    index_file = None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        index_file = open(save_dir / "index.jsonl", "w")
    bar = tqdm(total=len(items), desc="generating", unit="video", disable=not progress)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [item.prompt for item in chunk]
            videos = _check_generated(generate(prompts, torch.Generator().manual_seed(seed + start)), len(chunk))
            generated_shape = generated_shape or list(videos.shape[1:])
            if index_file is not None:
                for item, video in zip(chunk, videos):
                    name = f"{_safe_name(item.id)}.mp4"
                    write_mp4(video.permute(0, 2, 3, 1).cpu().numpy(), save_dir / name, fps=save_fps)
                    index_file.write(json.dumps({"id": item.id, "file": name, "prompt": item.prompt}) + "\n")
            fake = to_symmetric(videos.to(device))  # [B, T, 3, H, W] in [-1, 1]
            for name, metric in scorers.items():
                if name in FRECHET_METRICS:
                    metric.update(fake, real=False)
                elif name == "clipsim":
                    metric.update(fake, prompts)
                else:
                    metric.update(fake)
            bar.update(len(chunk))
    finally:
        bar.close()
        if index_file is not None:
            index_file.close()
    return generated_shape


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything an evaluation run is set up with, besides the items and the pipeline.

    Args:
        metrics: weights and knobs; only the protocol's metrics with weights are computed.
        protocol: ``msrvtt`` | ``ucf101`` | ``csv`` (``PROTOCOL_METRICS``: which metrics it reports).
        batch_size: prompts per ``generate`` call (and real videos per metric update).
        seed: ``generate`` gets a CPU generator seeded with ``seed`` + the index of the batch's first item (so a
            run with ``limit`` reproduces the first batches of the full run).
        real_stats_dir: cache folder for real-side statistics (None: compute them every time).
        real: how real videos are decoded for FVD / FID.
        real_videos: a real side other than the items' own (e.g. all UCF-101 clips).
        save_videos: folder for the generated videos as ``<id>.mp4`` (+ ``index.jsonl`` with prompts).
        save_fps: frame rate of the saved videos.
        out: where to write the report JSON.
        decode_workers: threads decoding real videos.
        progress: show progress bars.
        extra_settings: recorded under ``settings`` in the report (e.g. the command's arguments).
    """

    metrics: MetricSettings
    protocol: str = "csv"
    batch_size: int = 4
    seed: int = 0
    real_stats_dir: str | Path | None = None
    real: RealVideoSettings = field(default_factory=RealVideoSettings)
    real_videos: Sequence[str | Path] | None = None
    save_videos: str | Path | None = None
    save_fps: int = 6
    out: str | Path | None = None
    decode_workers: int = 1
    progress: bool = True
    extra_settings: dict | None = None


def evaluate_text_to_video(items: Sequence[EvalItem], generate: GenerateFn, settings: EvaluationSettings,
                           built_metrics: dict[str, torch.nn.Module] | None = None) -> dict:
    """Generate a video for every item, score the protocol's metrics and return (and write) the report.

    Args:
        items: from a protocol reader (:mod:`videolavit.evaluation.protocols`).
        generate: ``generate(prompts, generator) -> uint8 [B, T, 3, H, W]``; called with up to
            ``settings.batch_size`` prompts and a generator seeded as ``EvaluationSettings.seed`` says.
        settings: the run's metrics, protocol, real side and outputs (:class:`EvaluationSettings`).
        built_metrics: metrics already built by :func:`build_metrics` (to reuse loaded networks).

    Returns the report: protocol, num_items, metrics, real_statistics, skipped, settings, wall_time_s.
    Real videos are read (or their cached statistics loaded) before anything is generated, so a
    data problem stops the run before the expensive part.
    """
    metrics, protocol, batch_size, seed = settings.metrics, settings.protocol, settings.batch_size, settings.seed
    started = time.perf_counter()
    items = list(items)
    if not items:
        raise EvaluationError("nothing to evaluate: the protocol gave no items")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    scorers = built_metrics if built_metrics is not None else build_metrics(protocol, metrics)
    for metric in scorers.values():
        metric.reset()
    if "is" in scorers and len(items) < scorers["is"].splits:
        raise EvaluationError(f"IS uses {scorers['is'].splits} splits, but there are only {len(items)} items; "
                              f"lower the number of splits or evaluate more items")
    entries = real_video_entries(items, settings.real_videos)
    real_report, skipped = _real_side(scorers, entries, protocol, settings.real, settings.real_stats_dir, batch_size,
                                      metrics.device, settings.decode_workers, settings.progress)
    save_dir = Path(settings.save_videos) if settings.save_videos is not None else None
    shape = _generated_side(items, generate, scorers, batch_size, seed, metrics.device, save_dir, settings.save_fps,
                            settings.progress)

    values: dict[str, float] = {}
    for name, metric in scorers.items():
        if name == "is":
            mean, std = metric.compute()
            values["is"], values["is_std"] = float(mean), float(std)
        else:
            values[name] = float(metric.compute())
    recorded = {
        "seed": seed,
        "generator_seeding": "torch.Generator().manual_seed(seed + index of the batch's first item)",
        "batch_size": batch_size,
        "weights": metrics.weights(),
        "fvd": {"frames": metrics.fvd_frames, "resolution": metrics.fvd_resolution},
        "fid": {"frames_per_video": metrics.fid_frames_per_video},
        "is": {"splits": metrics.is_splits},
        "fingerprints": {name: scorers[name].fingerprint() for name in FRECHET_METRICS if name in scorers},
        "real_video": asdict(settings.real),
        "real_videos": "given list" if settings.real_videos is not None else "paired with the items",
        "num_real_videos": len(entries),
        "generated_video": {"frames": shape[0], "height": shape[2], "width": shape[3]} if shape else None,
        "save_videos": str(save_dir) if save_dir is not None else None,
        **(settings.extra_settings or {}),
    }
    report = {
        "protocol": protocol,
        "num_items": len(items),
        "metrics": values,
        "real_statistics": real_report,
        "skipped": {"real_videos": len(skipped), "by_reason": dict(Counter(s["reason"] for s in skipped)),
                    "videos": skipped},
        "settings": recorded,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    if settings.out is not None:
        write_json(settings.out, report)
    return report
