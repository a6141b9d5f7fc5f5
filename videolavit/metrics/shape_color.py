"""Which corpus colour an image shows: a learning check for anything that renders moving-shapes frames.

The synthetic corpus (``videolavit.synth.moving_shapes``) draws one saturated shape in one of ``COLORS`` over a
low-contrast, nearly grey background. A decoder that really passes information from its tokens to pixels
reproduces the shape's colour; one that ignores them can only guess (1 in 5 for the five colours). The
dominant colour of an image is the palette entry that most of its saturated pixels are nearest to;
background pixels (channel spread below ``min_saturation``; the corpus's tints stay under ~40) do not vote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from videolavit.synth.moving_shapes import COLORS

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
