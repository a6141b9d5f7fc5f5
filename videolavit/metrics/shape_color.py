"""Which corpus colour and shape an image shows: learning checks for anything that renders moving-shapes frames.

The synthetic corpus (``videolavit.synth.moving_shapes``) draws one saturated shape in one of ``COLORS`` over a
low-contrast, nearly grey background. A decoder that really passes information from its tokens to pixels
reproduces the shape's colour; one that ignores them can only guess (1 in 5 for the five colours). The
dominant colour of an image is the palette entry that most of its saturated pixels are nearest to;
background pixels (channel spread below ``min_saturation``; the corpus's tints stay under ~40) do not vote.
The dominant shape is the corpus shape whose outline, drawn at the colour mask's centroid with the mask's
area, overlaps the mask best (soft intersection over union): a blob scores as a circle, two blobs as nothing
in particular, so a decoder has to draw one clean outline to be credited with a shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from videolavit.synth.shape_plan import COLORS, SHAPES
from videolavit.synth.shape_render import shape_coverage

MIN_SATURATION = 60  # max - min channel (0-255) a pixel needs to vote; background tints stay below ~40


def dominant_colors(images: torch.Tensor, palette: Mapping[str, Sequence[int]] = COLORS,
                    min_saturation: int = MIN_SATURATION, min_pixels: int = 2) -> list[str | None]:
    """uint8 images [B, 3, H, W] -> per image the palette name most saturated pixels are nearest to (RGB
    distance), or None when fewer than ``min_pixels`` pixels are saturated."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    names = list(palette)
    colors = torch.tensor([list(palette[n]) for n in names], dtype=torch.float32)  # [K, 3]
    pixels = images.float().flatten(2).transpose(1, 2)  # [B, HW, 3]
    saturated = (pixels.amax(dim=-1) - pixels.amin(dim=-1)) >= min_saturation  # [B, HW]
    nearest = torch.cdist(pixels, colors[None].expand(len(pixels), -1, -1)).argmin(dim=-1)  # [B, HW]
    out: list[str | None] = []
    for votes, mask in zip(nearest, saturated):
        if int(mask.sum()) < min_pixels:
            out.append(None)
            continue
        counts = torch.bincount(votes[mask], minlength=len(names))
        out.append(names[int(counts.argmax())])
    return out


def color_agreement(predicted: Sequence[str | None], truth: Sequence[str]) -> float:
    """Share of images whose dominant colour is the true one (None counts as wrong)."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need as many predictions as truths (>0), got {len(predicted)} and {len(truth)}")
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def coverage_mask(image: torch.Tensor, color: Sequence[int], min_saturation: int = MIN_SATURATION,
                  floor: float = 0.2) -> torch.Tensor:
    """Float [H, W] in [0, 1]: how much of each pixel ``color`` covers, read as the pixel's position between
    the background (the median unsaturated pixel) and ``color``. Anti-aliased edges count in part, so the
    points of a small star still show; values under ``floor`` (background texture) count as 0."""
    pixels = image.float().flatten(1).T  # [HW, 3]
    saturated = (pixels.amax(dim=-1) - pixels.amin(dim=-1)) >= min_saturation
    background = pixels[~saturated].median(dim=0).values if bool((~saturated).any()) else pixels.median(dim=0).values
    toward = torch.tensor(list(color), dtype=torch.float32) - background  # [3]
    alpha = ((pixels - background) @ toward / toward.dot(toward).clamp_min(1.0)).clamp(0.0, 1.0)
    return torch.where(alpha >= floor, alpha, torch.zeros_like(alpha)).view(image.shape[1:])


def _unit_areas(shapes: Sequence[str]) -> dict[str, float]:
    """Area of each shape's outline at radius 1, measured on the renderer's own coverage (the star's too)."""
    scale = 200.0
    return {shape: float(shape_coverage(shape, scale, (256.0, 256.0), 512, 512).sum()) / scale**2 for shape in shapes}


def shape_scores(mask: torch.Tensor, shapes: Sequence[str] = SHAPES) -> dict[str, float]:
    """Soft IoU of a [H, W] mask with each shape's outline at the mask's centroid and area."""
    area = float(mask.sum())
    if area <= 0:
        return {shape: 0.0 for shape in shapes}
    height, width = mask.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    center = (float((mask * xs).sum()) / area, float((mask * ys).sum()) / area)
    scores = {}
    for shape, unit_area in _unit_areas(shapes).items():
        radius = (area / unit_area) ** 0.5
        outline = torch.from_numpy(shape_coverage(shape, radius, center, height, width)).float()
        scores[shape] = float(torch.minimum(mask, outline).sum() / torch.maximum(mask, outline).sum())
    return scores


def dominant_shapes(images: torch.Tensor, palette: Mapping[str, Sequence[int]] = COLORS,
                    shapes: Sequence[str] = SHAPES, min_saturation: int = MIN_SATURATION,
                    min_pixels: int = 4) -> list[str | None]:
    """uint8 images [B, 3, H, W] -> per image the shape whose outline best fits the pixels of its dominant
    colour (:func:`shape_scores` of its :func:`coverage_mask`), or None when the colour covers less than
    ``min_pixels`` pixels."""
    out: list[str | None] = []
    for image, color in zip(images, dominant_colors(images, palette, min_saturation)):
        if color is None:
            out.append(None)
            continue
        mask = coverage_mask(image, palette[color], min_saturation)
        if float(mask.sum()) < min_pixels:
            out.append(None)
            continue
        scores = shape_scores(mask, shapes)
        out.append(max(scores, key=scores.get))
    return out


def attribute_agreement(predicted: Sequence[str | None], truth: Sequence[str]) -> float:
    """Share of predictions equal to the truth (None counts as wrong); the same rule for colours and shapes."""
    return color_agreement(predicted, truth)
