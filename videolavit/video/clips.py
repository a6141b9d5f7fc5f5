"""Clips: 24-frame (4 s at 6 fps) windows that start at an I-frame (release rule), and their motion.

A clip's keyframe is its first frame (an I-frame). Its motion field is cut from the video's
macroblock grid, the second I-frame (clip frame 12, which has no vectors) is filled with the mean of
its neighbours, and the field is resized bicubically to the tokenizer's grid: 20×36 (release) or
16×16 (paper).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from videolavit.video.motion_grid import TOKENIZER_SCALE

CLIP_FRAMES = 24
GOP = 12
RELEASE_GRID = (20, 36)
PAPER_GRID = (16, 16)


def select_clip_starts(iframes: Sequence[int], num_frames: int, clip_frames: int = CLIP_FRAMES,
                       max_clips: int = 8, gop: int = GOP) -> list[int]:
    """Start frames of the clips the release would take from a video.

    Candidates are I-frames whose next I-frame follows ``gop`` frames later and whose clip fits in
    the video. Every second candidate is taken (clips 24 frames apart; the first candidate is skipped
    when there are more than two), then subsampled uniformly to ``max_clips``. Unlike the release,
    which falls back to clips running past the end (padded with zero motion), a video without any
    full clip yields none: it is reported as too short instead of training on padding.
    """
    iframes = np.asarray(sorted(iframes), dtype=np.int64)
    regular = iframes[:-1][iframes[1:] == iframes[:-1] + gop]
    candidates = regular[regular + clip_frames <= num_frames]
    if candidates.size == 0:
        return []
    if candidates.size / 2 <= max_clips:
        chosen = candidates[1::2] if candidates.size > 2 else candidates[0::2]
    else:
        every_second = candidates[1::2]
        if every_second.size > max_clips:
            every_second = every_second[np.linspace(0, every_second.size - 1, max_clips, dtype=int)]
        chosen = every_second
    return [int(s) for s in chosen]


def clip_motion(motion: np.ndarray | torch.Tensor, start: int, grid: tuple[int, int] = RELEASE_GRID,
                clip_frames: int = CLIP_FRAMES, scale: float = TOKENIZER_SCALE) -> torch.Tensor:
    """Motion field of the clip at ``start``: float32 [2, clip_frames, *grid].

    ``motion`` is a video's macroblock grid [T, 2, rows, cols] as stored in shards (standardised,
    I-frames zero). ``scale`` multiplies the standardised field (×10 is the tokenizer's input, ×1 the
    detokenizer's condition).
    """
    field = torch.as_tensor(np.asarray(motion[start:start + clip_frames]), dtype=torch.float32)
    if field.shape[0] != clip_frames:
        raise ValueError(f"clip at frame {start} needs {clip_frames} frames, video has {start + field.shape[0]}")
    field = field.clone()
    mid = GOP
    if 0 < mid < clip_frames - 1:
        field[mid] = 0.5 * (field[mid - 1] + field[mid + 1])
    if tuple(field.shape[-2:]) != tuple(grid):
        field = F.interpolate(field, size=grid, mode="bicubic", align_corners=False, antialias=True)
    return (field * scale).permute(1, 0, 2, 3).contiguous()  # [T, 2, h, w] -> [2, T, h, w]
