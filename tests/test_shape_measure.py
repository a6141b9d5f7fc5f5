"""The colour and shape measures that score generated frames: right on the corpus's own frames at the size the
tiny chain generates (32x32), and no credit for a blob or an empty frame."""

from __future__ import annotations

import numpy as np
import torch

from videolavit.metrics.shape_color import attribute_agreement, dominant_colors, dominant_shapes, shape_scores
from videolavit.synth.moving_shapes import COLORS, SHAPES, plan_corpus, render_frame
from videolavit.synth.shape_render import shape_coverage


def _resized(frames: list[np.ndarray], size: int) -> torch.Tensor:
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def test_both_measures_read_real_frames_at_the_generated_size():
    specs = plan_corpus(40, seed=3, size=(128, 128), fps=12, seconds=10.0)
    frames = [render_frame(spec, index) for spec in specs for index in (0, 60, 119)]
    images = _resized(frames, 32)
    shapes = [spec.shape for spec in specs for _ in range(3)]
    colors = [spec.color for spec in specs for _ in range(3)]
    assert attribute_agreement(dominant_shapes(images), shapes) >= 0.9
    assert attribute_agreement(dominant_colors(images), colors) >= 0.9


def test_an_outline_scores_best_as_itself():
    for shape in SHAPES:
        mask = torch.from_numpy(shape_coverage(shape, 6.0, (15.3, 16.6), 32, 32)).float()
        scores = shape_scores(mask)
        assert max(scores, key=scores.get) == shape, (shape, scores)
        assert scores[shape] > 0.9


def test_a_blob_reads_as_a_circle_and_an_empty_frame_as_nothing():
    grey = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    assert dominant_shapes(grey) == [None] and dominant_colors(grey) == [None]
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((x - 16) ** 2 + (y - 12) ** 2) / 18.0)  # a soft Gaussian spot
    image = grey.clone().float()
    red = torch.tensor(COLORS["red"], dtype=torch.float32)[:, None, None]
    image[0] = image[0] * (1 - blob) + red * blob
    assert dominant_colors(image.round().to(torch.uint8)) == ["red"]
    assert dominant_shapes(image.round().to(torch.uint8)) == ["circle"]
