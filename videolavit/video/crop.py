"""Resize-then-centre-crop geometry shared by every reader of keyframes (views, the video coder, chat).

The same box everywhere keeps the pixels a tokenizer saw at training time equal to the ones it sees when
the tokenize job or inference runs it.
"""

from __future__ import annotations

import numpy as np
import torch


def resize_crop_box(height: int, width: int, target: tuple[int, int]) -> tuple[tuple[int, int], tuple[slice, slice]]:
    """Resize size keeping aspect so the target is covered, and the centre-crop slices after it."""
    th, tw = target
    scale = max(th / height, tw / width)
    rh, rw = max(th, round(height * scale)), max(tw, round(width * scale))
    top, left = (rh - th) // 2, (rw - tw) // 2
    return (rh, rw), (slice(top, top + th), slice(left, left + tw))


def to_chw(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [..., H, W, 3] (NumPy) -> tensor [..., 3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3)
