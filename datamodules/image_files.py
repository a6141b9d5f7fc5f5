"""Local image files of the image sources (image-text pairs, image conversations): decoded, resized and
centre-cropped to the keyframe tokenizer's input; an unreadable file is a counted skip, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from datamodules.skip_tracker import SKIPS
from videolavit.video import errors
from videolavit.video.crop import resize_crop_box

UNREADABLE_IMAGE = "unreadable_image"  # an image file FFmpeg cannot decode
BAD_IMAGE_TEXT_RECORD = "bad_image_text_record"  # a JSONL line that is not {"image", "caption"}


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """float [3, size, size] in [0, 1]: the image resized (aspect kept) and centre-cropped; raises
    ``VideoSkip(UNREADABLE_IMAGE)`` for a file FFmpeg cannot decode."""
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            height, width = frame.height, frame.width
            (rh, rw), (ys, xs) = resize_crop_box(height, width, (size, size))
            pixels = frame.to_ndarray(format="rgb24", height=rh, width=rw, interpolation="BICUBIC")[ys, xs]
    except (av.error.FFmpegError, StopIteration, ValueError, IndexError) as exc:
        raise errors.VideoSkip(UNREADABLE_IMAGE, f"{path}: {type(exc).__name__}: {exc}") from None
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div(255.0)


def load_image_text_pair(line: str, root: Path, size: int) -> tuple[torch.Tensor, str, Path] | None:
    """One JSONL line ``{"image": path relative to root, "caption": str}`` -> (image as ``load_image``, caption,
    image path); a bad line (``bad_image_text_record``) or an unreadable image is a counted skip (None)."""
    try:
        record = json.loads(line)
        image, caption = root / record["image"], str(record["caption"])
    except (ValueError, KeyError, TypeError) as exc:
        SKIPS.record(line[:80], BAD_IMAGE_TEXT_RECORD, f"{type(exc).__name__}: {exc}")
        return None
    try:
        return load_image(image, size), caption, image
    except errors.VideoSkip as skip:
        SKIPS.record(str(image), skip.reason, skip.detail)
        return None


__all__ = ["load_image", "load_image_text_pair", "UNREADABLE_IMAGE", "BAD_IMAGE_TEXT_RECORD"]
