"""The *moving shapes* corpus: the embedded default dataset for every stage (DESIGN.md §11).

Each video shows one coloured, lightly textured shape moving in a straight line at constant speed over a
static, low-contrast, tinted background. Because every attribute (shape, colour, direction, speed,
position) is known exactly, tests and small runs can check that information really flows through the
stack: captions and QA answers can be scored exactly, and measured motion can be compared with the truth.

Layout written by :func:`generate_corpus` into ``out_dir``::

    corpus.json       what was generated (generator version + parameters); identifies the corpus
    videos/{id}.mp4   H.264 (libx264, yuv420p) at ``fps`` (default 12, so 6 fps resampling is exercised)
    captions.csv      WebVid-style: videoid,name,duration,page_dir (duration "PT00H00M10S", page_dir "videos")
    qa.json           [{"video_id", "question", "answer", "attribute"}], three one-word answers per video
    metadata.jsonl    one JSON object per video: the :class:`VideoSpec` ground truth

and, with ``stills_per_video`` > 0, still images with their captions and questions
(:mod:`videolavit.synth.stills`: ``images/``, ``image_text.jsonl``, ``image_qa.json``).

Everything is a pure function of ``(num_videos, seed, size, fps, seconds, stills_per_video)``: the same
arguments give byte-identical text files and identical decoded frames (libx264 runs single-threaded). Video
ids carry the seed (``s{seed}_{index:06d}``) so corpora from different seeds merge without collisions, and each
attribute is balanced over the corpus (its values are dealt in shuffled rounds), so a held-out corpus
from another seed with at least ``len(COLORS)`` videos covers every value.

Coordinates are image coordinates: +x right, +y down, pixel centres at integer positions.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import av
import numpy as np

GENERATOR_NAME = "videolavit.synth.moving_shapes"
GENERATOR_VERSION = 1  # bump whenever the same arguments would render a different corpus

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 215, 30),
    "purple": (150, 40, 190),
}

DIRECTIONS: dict[str, tuple[int, int]] = {  # unit vectors in image coordinates (+y is down)
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

# Background tints: a grey level plus a small colour offset keeps them far from every shape colour.
BACKGROUND_TINTS: dict[str, tuple[int, int, int]] = {
    "grey": (0, 0, 0),
    "red": (18, -9, -9),
    "green": (-9, 14, -9),
    "blue": (-12, -4, 18),
    "yellow": (12, 10, -20),
    "purple": (10, -12, 14),
}

MIN_SPEED_PX_PER_S = 6.0  # >= 1 px per frame after resampling to 6 fps, so motion is measurable
MAX_SPEED_PX_PER_S = 24.0  # <= 4 px per 6 fps frame, well inside any motion search range
EDGE_MARGIN_PX = 2.0  # gap kept between the shape and the frame border at all times
MIN_SHAPE_RADIUS_PX = 5.0

CSV_HEADER = ("videoid", "name", "duration", "page_dir")
VIDEO_DIR = "videos"
MANIFEST_FILE = "corpus.json"
CORPUS_FILES = ("captions.csv", "qa.json", "metadata.jsonl", MANIFEST_FILE)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape} moving {direction_phrase} over a {background}-tinted background",
    "a {color} {shape} slides {direction_phrase} across a plain {background} background",
    "video of a {color} {shape} travelling {direction_phrase} at a steady speed",
    "a single {color} {shape} drifts {direction_phrase} on a {background} backdrop",
)
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}

QUESTIONS: dict[str, tuple[str, ...]] = {  # the first phrasing of each attribute is the canonical one
    "shape": (
        "What shape is in the video?",
        "Which shape appears in this video?",
        "What kind of shape is moving?",
    ),
    "color": (
        "What color is the shape?",
        "What is the color of the moving shape?",
        "Which color does the shape have?",
    ),
    "direction": (
        "Which direction is the shape moving?",
        "In which direction does the shape move?",
        "Where is the shape heading: left, right, up or down?",
    ),
}


class CorpusExistsError(RuntimeError):
    """The output directory already holds something other than the requested corpus."""


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """Ground truth of one video; rendering is a pure function of it (one line of metadata.jsonl)."""

    videoid: str
    seed: int
    index: int
    shape: str
    color: str
    color_rgb: tuple[int, int, int]
    direction: str
    speed_px_per_s: float
    dx_px_per_s: float
    dy_px_per_s: float
    start_x: float  # shape centre at t = 0 (the shape's area centroid)
    start_y: float
    shape_radius_px: float  # half extent: circle radius, square half side, triangle/star circumradius
    width: int
    height: int
    fps: int
    num_frames: int
    duration_s: float
    background: str
    background_rgb: tuple[int, int, int]
    texture_seed: int
    caption: str

    def center_at(self, frame_index: int) -> tuple[float, float]:
        """Centre of the shape in frame ``frame_index`` (constant velocity from the start position)."""
        t = frame_index / self.fps
        return self.start_x + self.dx_px_per_s * t, self.start_y + self.dy_px_per_s * t

    def to_json(self) -> dict:
        rgb = {"color_rgb": list(self.color_rgb), "background_rgb": list(self.background_rgb)}
        return dataclasses.asdict(self) | rgb

    @classmethod
    def from_json(cls, record: dict) -> VideoSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        values["color_rgb"] = tuple(values["color_rgb"])
        values["background_rgb"] = tuple(values["background_rgb"])
        return cls(**values)


# --------------------------------------------------------------------------------------------- planning


def parse_size(text: str) -> tuple[int, int]:
    """``"128x96"`` → ``(128, 96)`` as (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 128x128), got {text!r}") from None
    return width, height


def _check_arguments(num_videos: int, seed: int, size: tuple[int, int], fps: int, seconds: float) -> int:
    """Validate the corpus arguments; return the number of frames per video."""
    width, height = size
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise ValueError(f"size must be even and at least 32x32 (H.264 yuv420p), got {width}x{height}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    num_frames = round(fps * seconds)
    if num_frames < 2:
        raise ValueError(f"fps * seconds must give at least 2 frames, got fps={fps}, seconds={seconds}")
    return num_frames


def _balanced_sequence(values: Sequence[str], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` values dealt in shuffled rounds: every value appears floor or ceil of count/len times."""
    sequence: list[str] = []
    while len(sequence) < count:
        sequence.extend(values[i] for i in rng.permutation(len(values)))
    return sequence[:count]


def _floor2(x: float) -> float:
    """Round down to 0.01 so stored numbers stay short and never exceed the bound they were drawn under."""
    return math.floor(x * 100.0) / 100.0


def _plan_video(
    index: int, seed: int, shape: str, color: str, direction: str,
    width: int, height: int, fps: int, num_frames: int,
) -> VideoSpec:
    rng = np.random.default_rng([seed, index])
    duration = num_frames / fps
    moving_time = (num_frames - 1) / fps  # time between the first and last frame
    ux, uy = DIRECTIONS[direction]
    along, across = (width, height) if ux else (height, width)

    # Largest radius that still leaves room to travel at the minimum speed; jitter the radius below it.
    room_radius = (along - 2 * EDGE_MARGIN_PX - MIN_SPEED_PX_PER_S * moving_time) / 2 - 0.5
    max_radius = min(room_radius, across / 2 - EDGE_MARGIN_PX - 0.5, 0.15 * min(width, height))
    if max_radius < MIN_SHAPE_RADIUS_PX:
        raise ValueError(
            f"a {width}x{height} frame is too small for {duration:g} s of motion at >= {MIN_SPEED_PX_PER_S} px/s;"
            " use a larger --size or fewer --seconds"
        )
    radius = _floor2(rng.uniform(max(MIN_SHAPE_RADIUS_PX, 0.7 * max_radius), max_radius))
    extent = radius + 0.5 + EDGE_MARGIN_PX  # anti-aliased edge + margin, from the centre
    max_speed = min(MAX_SPEED_PX_PER_S, (along - 2 * extent) / moving_time)
    speed = _floor2(rng.uniform(MIN_SPEED_PX_PER_S, max_speed))
    travel = speed * moving_time
    # Start so that the whole straight path stays inside [extent, side - extent].
    low_along = extent + (travel if ux + uy < 0 else 0.0)  # moving towards 0: start far enough from it
    start_along = round(rng.uniform(low_along, low_along + (along - 2 * extent - travel)), 2)
    start_across = round(rng.uniform(extent, across - extent), 2)
    start_x, start_y = (start_along, start_across) if ux else (start_across, start_along)

    background = str(rng.choice([name for name in BACKGROUND_TINTS if name != color]))
    grey = int(rng.integers(100, 146))
    background_rgb = tuple(int(np.clip(grey + off, 0, 255)) for off in BACKGROUND_TINTS[background])
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    caption = template.format(
        color=color, shape=shape, direction_phrase=DIRECTION_PHRASES[direction], background=background
    )
    return VideoSpec(
        videoid=f"s{seed}_{index:06d}", seed=seed, index=index, shape=shape, color=color,
        color_rgb=COLORS[color], direction=direction, speed_px_per_s=speed,
        dx_px_per_s=float(ux * speed), dy_px_per_s=float(uy * speed),
        start_x=start_x, start_y=start_y, shape_radius_px=radius, width=width, height=height, fps=fps,
        num_frames=num_frames, duration_s=duration, background=background, background_rgb=background_rgb,
        texture_seed=int(rng.integers(2**31)), caption=caption,
    )  # fmt: skip


def plan_corpus(
    num_videos: int, seed: int, size: tuple[int, int] = (128, 128), fps: int = 12, seconds: float = 10.0
) -> list[VideoSpec]:
    """The ground truth of every video in the corpus, without rendering anything. ``size`` is (W, H)."""
    num_frames = _check_arguments(num_videos, seed, size, fps, seconds)
    rng = np.random.default_rng(seed)
    shapes = _balanced_sequence(SHAPES, num_videos, rng)
    colors = _balanced_sequence(list(COLORS), num_videos, rng)
    directions = _balanced_sequence(list(DIRECTIONS), num_videos, rng)
    return [
        _plan_video(i, seed, shapes[i], colors[i], directions[i], size[0], size[1], fps, num_frames)
        for i in range(num_videos)
    ]


def qa_pairs(spec: VideoSpec) -> list[dict]:
    """Three questions with exact one-word answers (shape, color, direction); phrasing fixed by the spec."""
    rng = np.random.default_rng([spec.seed, spec.index, 1])
    answers = {"shape": spec.shape, "color": spec.color, "direction": spec.direction}
    return [
        {
            "video_id": spec.videoid,
            "question": phrasings[int(rng.integers(len(phrasings)))],
            "answer": answers[attribute],
            "attribute": attribute,
        }
        for attribute, phrasings in QUESTIONS.items()
    ]


def webvid_duration(seconds: float) -> str:
    """WebVid's ISO-8601 duration, e.g. 10 s → ``PT00H00M10S`` (fractions kept: ``PT00H00M02.5S``)."""
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    secs_text = f"{int(secs):02d}" if float(secs).is_integer() else f"{secs:09.6f}".rstrip("0")
    return f"PT{hours:02d}H{minutes:02d}M{secs_text}S"


# -------------------------------------------------------------------------------------------- rendering


def _shape_polygon(shape: str, radius: float) -> np.ndarray | None:
    """Vertices (N, 2) centred on the area centroid, extent ``radius``; ``None`` for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        r = radius
        return np.array([[-r, -r], [r, -r], [r, r], [-r, r]], dtype=np.float64)
    if shape == "triangle":  # equilateral, pointing up; circumcentre == centroid
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":  # five points, pointing up
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _polygon_signed_distance(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance from points to a simple polygon (negative inside)."""
    distance = np.full(x.shape, np.inf)
    inside = np.zeros(x.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(vertices, np.roll(vertices, -1, axis=0)):
        ex, ey = bx - ax, by - ay
        t = np.clip(((x - ax) * ex + (y - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(x - ax - t * ex, y - ay - t * ey))
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = ax + (y - ay) * ex / (by - ay)
        inside ^= crosses & (x < x_cross)
    return np.where(inside, -distance, distance)


def shape_coverage(shape: str, radius: float, center: tuple[float, float], height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], a (height, width) float array; sub-pixel positions move smoothly."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return _coverage(shape, radius, x - center[0], y - center[1])


def _coverage(shape: str, radius: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    vertices = _shape_polygon(shape, radius)
    signed = np.hypot(dx, dy) - radius if vertices is None else _polygon_signed_distance(dx, dy, vertices)
    return np.clip(0.5 - signed, 0.0, 1.0)


def _shape_box(center: tuple[float, float], radius: float, height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns that can have coverage: every shape lies within ``radius`` of its centre, and coverage
    is 0 one pixel or more outside it, so pixels beyond radius + 2 are pure background."""
    reach = radius + 2.0
    rows = slice(max(0, math.floor(center[1] - reach)), min(height, math.ceil(center[1] + reach) + 1))
    cols = slice(max(0, math.floor(center[0] - reach)), min(width, math.ceil(center[0] + reach) + 1))
    return rows, cols


def _background(spec: VideoSpec) -> np.ndarray:
    """Static tinted background with smooth low-contrast texture (a few grey levels), float (H, W, 3)."""
    rng = np.random.default_rng(spec.texture_seed)
    h, w = spec.height, spec.width
    coarse = rng.normal(0.0, 1.0, size=(h // 8 + 2, w // 8 + 2))
    ys, xs = np.linspace(0, coarse.shape[0] - 1.001, h), np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int)[:, None], xs.astype(int)[None, :]
    fy, fx = (ys % 1)[:, None], (xs % 1)[None, :]
    smooth = (coarse[y0, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1, x0] * fy * (1 - fx)
              + coarse[y0, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1, x0 + 1] * fy * fx)  # fmt: skip
    texture = 6.0 * smooth + 2.0 * rng.normal(0.0, 1.0, size=(h, w))
    return np.asarray(spec.background_rgb, dtype=np.float64)[None, None, :] + texture[:, :, None]


def render_frame(spec: VideoSpec, frame_index: int, background: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) of one frame: the textured shape composited over the static background."""
    if background is None:
        background = _background(spec)
    return _composite(spec, frame_index, background, _to_uint8(background))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _composite(spec: VideoSpec, frame_index: int, background: np.ndarray, background_uint8: np.ndarray) -> np.ndarray:
    """Composite only the box around the shape (~7x faster than the whole frame at 128x128). The pixels are those of
    compositing over the whole frame: outside the box coverage is exactly 0, so they are the background's."""
    cx, cy = spec.center_at(frame_index)
    rows, cols = _shape_box((cx, cy), spec.shape_radius_px, spec.height, spec.width)
    y, x = np.mgrid[rows, cols].astype(np.float64)
    alpha = _coverage(spec.shape, spec.shape_radius_px, x - cx, y - cy)[:, :, None]
    # Texture in the shape's own coordinates moves with it: something for motion search to lock on to.
    u, v = (x - cx) / spec.shape_radius_px, (y - cy) / spec.shape_radius_px
    shade = 1.04 + 0.09 * np.sin(2.6 * np.pi * u) * np.sin(2.6 * np.pi * v) - 0.08 * np.hypot(u, v)
    shape_rgb = np.asarray(spec.color_rgb, dtype=np.float64)[None, None, :] * shade[:, :, None]
    frame = background_uint8.copy()
    frame[rows, cols] = _to_uint8(background[rows, cols] * (1.0 - alpha) + shape_rgb * alpha)
    return frame


def render_video(spec: VideoSpec, path: str | os.PathLike) -> None:
    """Encode the video as H.264 (libx264, yuv420p, single-threaded so the output is deterministic).

    The file is written next to ``path`` and renamed into place, so ``path`` is either absent or complete.
    """
    path = Path(path)
    background = _background(spec)
    background_uint8 = _to_uint8(background)
    tmp_name = str(path.with_name(f".{path.stem}.partial.mp4"))  # one writer per video id
    try:
        with av.open(tmp_name, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=spec.fps)
            stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"preset": "medium", "crf": "16", "threads": "1"}
            for i in range(spec.num_frames):
                frame = av.VideoFrame.from_ndarray(_composite(spec, i, background, background_uint8), format="rgb24")
                frame = frame.reformat(format="yuv420p")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


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
    from videolavit.synth.stills import IMAGE_DIR, STILL_FILES

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


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def _write_annotations(out_dir: Path, specs: Sequence[VideoSpec]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for spec in specs:
        writer.writerow((spec.videoid, spec.caption, webvid_duration(spec.duration_s), VIDEO_DIR))
    _write_text_atomic(out_dir / "captions.csv", buffer.getvalue())
    qa = [pair for spec in specs for pair in qa_pairs(spec)]
    _write_text_atomic(out_dir / "qa.json", json.dumps(qa, indent=1) + "\n")
    _write_text_atomic(out_dir / "metadata.jsonl", "".join(json.dumps(s.to_json()) + "\n" for s in specs))


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
    """Render a moving-shapes corpus into ``out_dir`` (layout in the module docstring); return its specs.

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
    _write_text_atomic(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
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
        from videolavit.synth.stills import write_stills

        write_stills(out_dir, specs, stills_per_video)
    return specs


def load_corpus(out_dir: str | os.PathLike) -> list[VideoSpec]:
    """Read the ground truth back from ``out_dir/metadata.jsonl``."""
    lines = (Path(out_dir) / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [VideoSpec.from_json(json.loads(line)) for line in lines if line.strip()]
