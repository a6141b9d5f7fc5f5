"""``image_text`` view: image-caption pairs from a local JSONL, for pre-training the keyframe backbone.

The shared ``VideoDataModule`` drives it like any view (batching, workers, ranks, the epoch cut), but the
examples come from ``{"image": path, "caption": str}`` lines (paths relative to the file's directory; the
format ``synth --stills-per-video`` writes and ``PretrainSequenceView(image_text=...)`` reads), not from the
shards, which are never read. Each rank × DataLoader worker streams its own share of the lines
(``datamodules.line_streams``): in training endlessly, shuffled within a bounded buffer pass by pass; in
validation once, in file order.

Example keys: ``image`` uint8 [3, S, S] (resized, centre-cropped; in training shifted by up to ``shift_px``
pixels, wrapping around, so the model cannot tie words to positions), ``caption`` str. Unreadable images
(``unreadable_image``) and bad lines (``bad_image_text_record``) are counted skips.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Iterator

import torch

from datamodules.image_files import load_image_text_pair
from datamodules.line_streams import reader_lines
from datamodules.skip_tracker import SKIPS
from datamodules.views import SampleView, register_view


@register_view("image_text")
class ImageTextView(SampleView):
    """Args:
        image_text: training JSONL of image-caption pairs.
        val_image_text: validation JSONL (None: validation yields nothing).
        image_size: side of the square images (the keyframe tokenizer's ``image_size``).
        shift_px: largest random shift in training (0: none).
        cache_images: keep every decoded image of this reader's share in memory (uint8, 3·S² bytes each), so
            each file is decoded once instead of once per pass: for small still sets, where decoding dominates.
        shuffle_buffer: lines held for shuffling in training (the file itself is streamed, never held).
    """

    need_video = False

    def __init__(self, image_text: str | None = None, val_image_text: str | None = None, image_size: int = 224,
                 shift_px: int = 0, cache_images: bool = False, shuffle_buffer: int = 1000):
        super().__init__()
        if shift_px < 0:
            raise ValueError(f"shift_px must be >= 0, got {shift_px}")
        self.image_text, self.val_image_text = image_text, val_image_text
        self.image_size, self.shift_px = int(image_size), int(shift_px)
        self.cache_images = cache_images
        self.shuffle_buffer = int(shuffle_buffer)
        self._cache: dict[str, tuple[torch.Tensor, str]] = {}  # JSONL line -> (uint8 image, caption)

    def _lines(self, train: bool, rng: random.Random) -> Iterator[str]:
        """This reader's share of the lines, streamed (``line_streams.reader_lines``)."""
        path = self.image_text if train else self.val_image_text
        if path is None:
            if train:
                raise ValueError("ImageTextView: set image_text (a JSONL of image-caption pairs) to train")
            return iter(())
        if not Path(path).is_file():
            raise FileNotFoundError(f"image-text file {path} does not exist")
        return reader_lines(path, train, rng, self.shuffle_buffer)

    def example(self, line: str, root: Path, train: bool, rng: random.Random) -> dict | None:
        cached = self._cache.get(line)
        if cached is None:
            pair = load_image_text_pair(line, root, self.image_size)
            if pair is None:
                return None
            cached = (pair[0].mul(255.0).round_().to(torch.uint8), pair[1])
            if self.cache_images:
                self._cache[line] = cached
        pixels, caption = cached
        if train and self.shift_px:
            shifts = (rng.randint(-self.shift_px, self.shift_px), rng.randint(-self.shift_px, self.shift_px))
            pixels = torch.roll(pixels, shifts=shifts, dims=(1, 2))
        return {"image": pixels, "caption": caption}

    def __call__(self, samples: Iterable[dict], train: bool = False, rng: random.Random | None = None
                 ) -> Iterator[dict]:
        rng = rng or random.Random(0)
        lines = self._lines(train, rng)
        root = Path(self.image_text if train else self.val_image_text or ".").parent
        for line in lines:
            example = self.example(line, root, train, rng)
            if example is not None:
                SKIPS.delivered()
                yield example
