"""The *moving shapes* corpus writer: the embedded default dataset for every stage (docs/design.md §11).

Each video shows one coloured, lightly textured shape moving in a straight line at constant speed over a
static tinted background; every attribute is known exactly (planned in :mod:`videolavit.synth.shape_plan`,
drawn by :mod:`videolavit.synth.shape_render`), so tests and small runs can score captions and QA answers
exactly and compare measured motion with the truth. :func:`generate_corpus` writes the videos, a WebVid-style
captions CSV, QA pairs and the ground truth (layout in its docstring), plus, with ``stills_per_video`` > 0, the
still images of :mod:`videolavit.synth.stills`. The same ``(num_videos, seed, size, fps, seconds,
stills_per_video)`` give byte-identical text files and identical decoded frames.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from videolavit.atomic_files import write_text_atomic
from videolavit.synth.shape_plan import (
    BACKGROUND_TINTS,
    CAPTION_TEMPLATES,
    COLORS,
    DIRECTION_PHRASES,
    DIRECTIONS,
    EDGE_MARGIN_PX,
    MAX_SPEED_PX_PER_S,
    MIN_SHAPE_RADIUS_PX,
    MIN_SPEED_PX_PER_S,
    QUESTIONS,
    SHAPES,
    VideoSpec,
    parse_size,
    plan_corpus,
    qa_pairs,
    webvid_duration,
)
from videolavit.synth.shape_render import render_background, render_frame, render_video, shape_coverage
from videolavit.synth.stills import IMAGE_DIR, STILL_FILES, write_stills

__all__ = [  # the corpus writer, plus the plan and render names importers have always taken from here
    "BACKGROUND_TINTS", "CAPTION_TEMPLATES", "COLORS", "CORPUS_FILES", "CSV_HEADER", "DIRECTIONS",
    "DIRECTION_PHRASES", "EDGE_MARGIN_PX", "GENERATOR_NAME", "GENERATOR_VERSION", "MANIFEST_FILE",
    "MAX_SPEED_PX_PER_S", "MIN_SHAPE_RADIUS_PX", "MIN_SPEED_PX_PER_S", "QUESTIONS", "SHAPES", "VIDEO_DIR",
    "CorpusExistsError", "VideoSpec", "generate_corpus", "load_corpus", "parse_size", "plan_corpus",
    "qa_pairs", "render_background", "render_frame", "render_video", "shape_coverage", "webvid_duration",
]  # fmt: skip

GENERATOR_NAME = "videolavit.synth.moving_shapes"
GENERATOR_VERSION = 1  # bump whenever the same arguments would render a different corpus

CSV_HEADER = ("videoid", "name", "duration", "page_dir")
VIDEO_DIR = "videos"
MANIFEST_FILE = "corpus.json"
CORPUS_FILES = ("captions.csv", "qa.json", "metadata.jsonl", MANIFEST_FILE)


class CorpusExistsError(RuntimeError):
    """The output directory already holds something other than the requested corpus."""


def _render_job(job: tuple[dict, str]) -> str:
    record, path = job
    render_video(VideoSpec.from_json(record), path)
    return path



# ----------------------------------------------------------------------------------------------- corpus


def _manifest(num_videos: int, seed: int, size: tuple[int, int], fps: int, seconds: float,
              stills_per_video: int = 0) -> dict:
    manifest = {
        "generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "num_videos": num_videos, "seed": seed,
        "width": size[0], "height": size[1], "fps": fps, "seconds": seconds,
    }  # fmt: skip
    if stills_per_video:  # corpora without stills keep the manifest they always had
        manifest["stills_per_video"] = stills_per_video
    return manifest


def _prepare_out_dir(out_dir: Path, manifest: dict, overwrite: bool) -> None:
    """Make ``out_dir`` ready: check it is writable and holds nothing but (this) corpus.

    Re-running with the same arguments is allowed and resumes (finished videos are kept). A different
    corpus is only replaced with ``overwrite``, which removes the corpus files and ``videos/`` and
    nothing else; a directory holding unrelated files is never touched.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise PermissionError(f"output directory {str(out_dir)!r} is not writable: {error}") from error
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    manifest_path = out_dir / MANIFEST_FILE
    try:
        existing = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        existing = None
    if existing == manifest:
        return
    if existing is None or existing.get("generator") != GENERATOR_NAME:
        raise CorpusExistsError(
            f"output directory {str(out_dir)!r} is not empty and holds no moving-shapes corpus"
            f" (found {', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); choose an empty directory"
        )
    if not overwrite:
        raise CorpusExistsError(
            f"output directory {str(out_dir)!r} holds a different moving-shapes corpus ({existing});"
            " pass --overwrite (overwrite=True) to replace it"
        )
    unknown = [name for name in entries if name not in (*CORPUS_FILES, *STILL_FILES, VIDEO_DIR, IMAGE_DIR)]
    if unknown:
        raise CorpusExistsError(
            f"refusing to overwrite {str(out_dir)!r}: it also holds files that are not part of a corpus:"
            f" {unknown[:5]}"
        )
    shutil.rmtree(out_dir / VIDEO_DIR, ignore_errors=True)
    shutil.rmtree(out_dir / IMAGE_DIR, ignore_errors=True)
    for name in (*CORPUS_FILES, *STILL_FILES):
        (out_dir / name).unlink(missing_ok=True)


def _write_annotations(out_dir: Path, specs: Sequence[VideoSpec]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for spec in specs:
        writer.writerow((spec.videoid, spec.caption, webvid_duration(spec.duration_s), VIDEO_DIR))
    write_text_atomic(out_dir / "captions.csv", buffer.getvalue())
    qa = [pair for spec in specs for pair in qa_pairs(spec)]
    write_text_atomic(out_dir / "qa.json", json.dumps(qa, indent=1) + "\n")
    write_text_atomic(out_dir / "metadata.jsonl", "".join(json.dumps(s.to_json()) + "\n" for s in specs))


def generate_corpus(
    out_dir: str | os.PathLike,
    num_videos: int,
    seed: int,
    size: tuple[int, int] = (128, 128),
    fps: int = 12,
    seconds: float = 10.0,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    stills_per_video: int = 0,
) -> list[VideoSpec]:
    """Render a moving-shapes corpus into ``out_dir``; return its specs. The layout::

        corpus.json       what was generated (generator version + parameters); identifies the corpus
        videos/{id}.mp4   H.264 (libx264, yuv420p) at ``fps`` (default 12, so 6 fps resampling is exercised)
        captions.csv      WebVid-style: videoid,name,duration,page_dir (duration "PT00H00M10S", page_dir "videos")
        qa.json           [{"video_id", "question", "answer", "attribute"}], three one-word answers per video
        metadata.jsonl    one JSON object per video: the :class:`VideoSpec` ground truth

    ``size`` is (width, height). ``workers`` > 1 renders videos in that many (spawned) processes.
    ``stills_per_video`` > 0 also writes that many still images of every video with their captions and
    questions (:func:`videolavit.synth.stills.write_stills`).
    ``progress`` is called with the number of videos finished since the last call (e.g. ``tqdm.update``).
    Raises ``ValueError`` for bad arguments, ``PermissionError`` if ``out_dir`` is not writable and
    :class:`CorpusExistsError` if it holds something else (see ``overwrite``).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if stills_per_video < 0:
        raise ValueError(f"stills_per_video must be >= 0, got {stills_per_video}")
    specs = plan_corpus(num_videos, seed, size, fps, seconds)
    out_dir = Path(out_dir)
    manifest = _manifest(num_videos, seed, size, fps, seconds, stills_per_video)
    _prepare_out_dir(out_dir, manifest, overwrite)
    write_text_atomic(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    video_dir = out_dir / VIDEO_DIR
    video_dir.mkdir(exist_ok=True)

    jobs = [(s.to_json(), str(video_dir / f"{s.videoid}.mp4")) for s in specs]
    todo = [job for job in jobs if not os.path.exists(job[1])]  # finished videos of a resumed run stay
    if progress is not None and len(todo) < len(jobs):
        progress(len(jobs) - len(todo))
    if workers == 1 or len(todo) <= 1:
        for job in todo:
            _render_job(job)
            if progress is not None:
                progress(1)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
            for _ in pool.map(_render_job, todo, chunksize=1):
                if progress is not None:
                    progress(1)
    _write_annotations(out_dir, specs)
    if stills_per_video:
        write_stills(out_dir, specs, stills_per_video)
    return specs


def load_corpus(out_dir: str | os.PathLike) -> list[VideoSpec]:
    """Read the ground truth back from ``out_dir/metadata.jsonl``."""
    lines = (Path(out_dir) / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [VideoSpec.from_json(json.loads(line)) for line in lines if line.strip()]
