"""What each moving-shapes video shows: its ground truth (:class:`VideoSpec`), planned before any pixel.

Planning is separate from rendering so that tests, QA scoring and the still images can know every
attribute (shape, colour, direction, speed, position, background) of a corpus without drawing it.
Every spec is a pure function of ``(num_videos, seed, size, fps, seconds)``; video ids carry the seed
(``s{seed}_{index:06d}``) so corpora from different seeds merge without collisions, and each attribute is
balanced over the corpus (its values are dealt in shuffled rounds), so a held-out corpus from another seed
with at least ``len(COLORS)`` videos covers every value.

Coordinates are image coordinates: +x right, +y down, pixel centres at integer positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

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

