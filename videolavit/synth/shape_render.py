"""Pixels of a planned moving-shapes video: anti-aliased textured shapes over a static tinted background.

A frame is a pure function of its :class:`~videolavit.synth.shape_plan.VideoSpec` and frame index, so the
still images and the videos of a corpus show the same pixels, and tests can compare decoded frames with
:func:`render_frame`. Videos are encoded with libx264 on one thread, which makes the files deterministic.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import av
import numpy as np

from videolavit.synth.shape_plan import SHAPES, VideoSpec


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


def render_background(spec: VideoSpec) -> np.ndarray:
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
        background = render_background(spec)
    return _composite(spec, frame_index, background, _to_uint8(background))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _composite(spec: VideoSpec, frame_index: int, background: np.ndarray, background_uint8: np.ndarray) -> np.ndarray:
    """Composite only the box around the shape (much cheaper than the whole frame). The pixels are those of
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
    background = render_background(spec)
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

