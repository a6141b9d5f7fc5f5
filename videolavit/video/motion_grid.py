"""MPEG-4 motion vectors → a per-frame grid at 16×16-macroblock resolution (release aggregation).

Each exported vector is the signed displacement of its block, dst − src = source·motion/scale
pixels, divided by the frame width/height and standardised with the release's statistics. Vectors
landing in the same macroblock are reduced by a per-channel maximum; blocks without vectors (and
whole I-frames) are zero.
"""

from __future__ import annotations

import math

import numpy as np

MACROBLOCK = 16
# Release statistics of the resolution-normalised displacement (x, y).
MOTION_MEAN = (0.0, 0.0)
MOTION_STD = (0.0993703, 0.1130276)
# The motion tokenizer sees the field at std/10, i.e. ×10 the standardised value.
TOKENIZER_SCALE = 10.0


def grid_shape(height: int, width: int) -> tuple[int, int]:
    """Macroblock grid (rows, cols) of a frame; partial blocks at the border count."""
    return math.ceil(height / MACROBLOCK), math.ceil(width / MACROBLOCK)


def aggregate_motion_vectors(vectors: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """Reduce one frame's exported vectors to a float32 grid [2, rows, cols] (x, y channels).

    ``vectors`` is the structured array of FFmpeg's AVMotionVector side data (PyAV:
    ``frame.side_data.get("MOTION_VECTORS").to_ndarray()``) or None for frames without vectors.
    """
    rows, cols = grid_shape(height, width)
    if vectors is None or len(vectors) == 0:
        return np.zeros((2, rows, cols), dtype=np.float32)
    scale = vectors["motion_scale"].astype(np.float64)
    sign = vectors["source"].astype(np.float64)
    disp_x = sign * vectors["motion_x"] / scale / width
    disp_y = sign * vectors["motion_y"] / scale / height
    disp = np.stack([(disp_x - MOTION_MEAN[0]) / MOTION_STD[0], (disp_y - MOTION_MEAN[1]) / MOTION_STD[1]])
    block_x = np.clip(vectors["dst_x"], 0, width - 1) // MACROBLOCK
    block_y = np.clip(vectors["dst_y"], 0, height - 1) // MACROBLOCK
    flat = (block_y * cols + block_x).astype(np.int64)
    grid = np.full((2, rows * cols), -np.inf)
    for channel in range(2):
        np.maximum.at(grid[channel], flat, disp[channel])
    grid[np.isneginf(grid)] = 0.0
    return grid.reshape(2, rows, cols).astype(np.float32)
