"""Pictures for run reports: generated clips beside real ones, and training curves.

A table of numbers says *that* a chain learned; a picture of what it generated says *what* it learned (a blob
of the right colour drifting the wrong way reads differently from a sharp shape that never moves). Both
figures are plain PNG files so any Markdown viewer shows them next to the report's tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClipRow:
    """One row of a clip grid: a title, then frames of one or more clips shown side by side."""

    title: str
    clips: Sequence[np.ndarray]  # each uint8 [T, H, W, 3]
    labels: Sequence[str]  # one per clip, e.g. "generated", "real"


def pick_frames(clip: np.ndarray, count: int) -> np.ndarray:
    """``count`` evenly spaced frames of a uint8 [T, H, W, 3] clip, first and last included."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"expected a uint8 clip [T, H, W, 3], got {clip.dtype} {list(clip.shape)}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    indices = np.linspace(0, len(clip) - 1, num=min(count, len(clip))).round().astype(int)
    return clip[indices]


def resize_height(frames: np.ndarray, height: int) -> np.ndarray:
    """uint8 frames [T, H, W, 3] resized (nearest, aspect kept) to ``height`` rows."""
    if frames.shape[1] == height:
        return frames
    from PIL import Image

    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.NEAREST)) for f in frames])


def clip_grid(rows: Sequence[ClipRow], path: str | Path, frames_per_clip: int = 6, scale: int = 3) -> Path:
    """Write a PNG with one row per :class:`ClipRow`: its title above, its clips' frames left to right.

    Frames are enlarged ``scale`` times with nearest neighbours so 32-pixel frames stay readable; clips of
    different sizes in one row (a 32-pixel generated clip beside its 128-pixel source) are shown at one height.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("clip_grid needs at least one row")
    strips = []
    for row in rows:
        if len(row.clips) != len(row.labels) or not row.clips:
            raise ValueError(f"row {row.title!r}: need one label per clip (>0), got {len(row.labels)} and "
                             f"{len(row.clips)}")
        parts = []
        height = max(np.asarray(clip).shape[1] for clip in row.clips)
        for clip in row.clips:
            frames = resize_height(pick_frames(clip, frames_per_clip), height)
            parts.append(np.concatenate(list(frames), axis=1))  # [H, n*W, 3]
            parts.append(np.full((frames.shape[1], 4, 3), 255, np.uint8))  # gap between clips
        strips.append(np.concatenate(parts[:-1], axis=1))
    width = max(s.shape[1] for s in strips)
    height = sum(s.shape[0] for s in strips)
    figure, axes = plt.subplots(len(rows), 1, figsize=(width * scale / 100, (height * scale + 28 * len(rows)) / 100),
                                dpi=100, squeeze=False)
    for axis, row, strip in zip(axes[:, 0], rows, strips):
        axis.imshow(strip, interpolation="nearest")
        axis.set_title(f"{row.title}   [{' | '.join(row.labels)}]", fontsize=8, loc="left")
        axis.axis("off")
    figure.tight_layout(pad=0.4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def training_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: str | Path,
                    columns: int = 3) -> Path:
    """Write a PNG with one panel per stage: ``curves[stage][tag] = [(step, value), ...]``, one line per tag.

    Panels use a log y axis when every value is positive and they span more than a factor of 20 (losses).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [name for name, tags in curves.items() if any(tags.values())]
    if not stages:
        raise ValueError("training_curves needs at least one stage with points")
    rows = -(-len(stages) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis in axes.flat[len(stages):]:
        axis.axis("off")
    for axis, stage in zip(axes.flat, stages):
        values = []
        for tag, points in curves[stage].items():
            if not points:
                continue
            steps, ys = zip(*points)
            values.extend(ys)
            axis.plot(steps, ys, label=tag, linewidth=1.2, marker="." if len(points) < 30 else None)
        finite = [v for v in values if np.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
            axis.set_yscale("log")
        axis.set_title(stage, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
