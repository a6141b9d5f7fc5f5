"""Report pictures: a grid of generated clips beside real ones, and per-stage training curves, as PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from videolavit.evaluation.figures import ClipRow, clip_grid, pick_frames, training_curves


def test_pick_frames_spans_the_clip():
    clip = np.arange(24, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)
    picked = pick_frames(clip, 6)
    assert picked.shape == (6, 4, 4, 3) and picked[0, 0, 0, 0] == 0 and picked[-1, 0, 0, 0] == 23
    with pytest.raises(ValueError, match="uint8 clip"):
        pick_frames(clip.astype(np.float32), 6)


def test_clip_grid_draws_one_row_per_prompt_with_clips_of_different_sizes(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    large = rng.integers(0, 255, (48, 128, 128, 3), dtype=np.uint8)
    rows = [ClipRow(f"prompt {i}", [small, large], ["generated", "real"]) for i in range(3)]
    path = clip_grid(rows, tmp_path / "grid.png", frames_per_clip=4, scale=2)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 8 * 32 * 2 and image.height >= 3 * 32 * 2
    with pytest.raises(ValueError, match="one label per clip"):
        clip_grid([ClipRow("x", [small], ["a", "b"])], tmp_path / "bad.png")


def test_training_curves_draw_a_panel_per_stage(tmp_path):
    curves = {"motion_tokenizer": {"train/loss": [(s, 1.0 / (s + 1)) for s in range(0, 300, 10)],
                                   "val/recon_ratio": [(300, 0.2)]},
              "pretrain": {"train/loss": [(s, 5.0 - s / 100) for s in range(0, 200, 10)]},
              "empty": {"train/loss": []}}
    path = training_curves(curves, tmp_path / "curves.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 400
    with pytest.raises(ValueError, match="at least one stage"):
        training_curves({"empty": {"train/loss": []}}, tmp_path / "none.png")
