"""Which way does the content of a (generated) clip move? Measured with our own MPEG-4 decomposition.

The learning checks of the detokenizer and of text-to-video (docs/design.md §11) compare the direction of motion
in a generated clip with the direction it was asked for. We re-encode the frames exactly as ``prepare``
does (6 fps MPEG-4 Part 2, GOP 12, no B-frames) and average the encoder's raw motion vectors, weighted
by how far they move: static background blocks carry zero vectors and drop out, so the estimate is the
mean displacement of whatever moves. Raw vectors are used rather than the release's per-block max grid,
whose max(·, 0) on partly covered blocks would bias left/up motion toward zero.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from .decompose import DecomposeConfig, reencode
from .writer import write_mp4

DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class MotionEstimate:
    dx: float  # mean displacement of moving blocks, pixels per frame of the *input* frames (+x right)
    dy: float  # (+y down)
    moving_vectors: int  # how many non-zero vectors the estimate rests on (0: nothing measurably moves)

    @property
    def direction(self) -> str | None:
        """The dominant of left/right/up/down, or None when nothing moves."""
        if self.moving_vectors == 0 or (self.dx == 0 and self.dy == 0):
            return None
        if abs(self.dx) >= abs(self.dy):
            return "right" if self.dx > 0 else "left"
        return "down" if self.dy > 0 else "up"


def _upscale(frames: np.ndarray, min_side: int) -> tuple[np.ndarray, int]:
    factor = max(1, -(-min_side // min(frames.shape[1:3])))
    if factor > 1:
        frames = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    return frames, factor


def measure_motion(frames: np.ndarray, fps: int = 6, min_side: int = 128,
                   work_dir: str | Path | None = None) -> MotionEstimate:
    """frames: uint8 [T, H, W, 3] (or [T, 3, H, W]) played at ``fps``. Small frames are upscaled (nearest) to
    ``min_side`` first so the 16×16 macroblocks resolve the content; the result is in input pixels."""
    frames = np.asarray(frames)
    if frames.ndim == 4 and frames.shape[1] == 3 and frames.shape[-1] != 3:
        frames = frames.transpose(0, 2, 3, 1)
    frames, factor = _upscale(np.ascontiguousarray(frames), min_side)
    import tempfile

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = write_mp4(frames, Path(tmp) / "clip.mp4", fps=fps)
        mp4, _ = reencode(path, DecomposeConfig(fps=fps, max_short_side=None, min_side=16))
    sum_x = sum_y = weight = 0.0
    count = 0
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        for frame in container.decode(stream):
            side = frame.side_data.get("MOTION_VECTORS")
            if side is None:
                continue
            v = side.to_ndarray()
            if len(v) == 0:
                continue
            sign = v["source"].astype(np.float64)  # -1: vector points back to a past frame
            scale = v["motion_scale"].astype(np.float64)
            dx = sign * v["motion_x"] / scale
            dy = sign * v["motion_y"] / scale
            moving = (dx != 0) | (dy != 0)
            area = (v["w"].astype(np.float64) * v["h"])[moving]
            sum_x += float((dx[moving] * area).sum())
            sum_y += float((dy[moving] * area).sum())
            weight += float(area.sum())
            count += int(moving.sum())
    if count == 0:
        return MotionEstimate(0.0, 0.0, 0)
    return MotionEstimate(sum_x / weight / factor, sum_y / weight / factor, count)


def motion_field_direction(motion: torch.Tensor) -> str | None:
    """The dominant of left/right/up/down of a field [2, T, gh, gw] (x right, y down), from its mean
    over the clip; None for a field without motion."""
    dx, dy = (float(v) for v in motion.detach().float().mean(dim=(1, 2, 3)))
    if dx == 0 and dy == 0:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def direction_agreement(measured: list[str | None], expected: list[str]) -> float:
    """Fraction of clips whose measured direction equals the expected one (no motion counts as wrong)."""
    if len(measured) != len(expected):
        raise ValueError(f"{len(measured)} measurements for {len(expected)} expectations")
    if not expected:
        raise ValueError("no clips to compare")
    return sum(m == e for m, e in zip(measured, expected)) / len(expected)
