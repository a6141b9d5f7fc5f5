"""Image-text pre-training of an ``EvaViT`` by predicting the words of each image's caption.

At full scale the keyframe tokenizer's frozen backbone is the released EVA-CLIP ViT-g/14, trained on billions
of image-text pairs. Small runs have no such model offline, and a random ViT's patch features hardly say what
an object's shape is (held-out probes barely above chance; docs/measurements.md), so no tokenizer can pass it on.
This objective trains a ViT of the tokenizer's sizes on local image-caption pairs (VirTex-style, without a text
decoder): the patch tokens, pooled, predict which caption words occur (multi-label, one logistic output per
hashed word bucket, no word list to build or ship). The patch tokens are what the tokenizer reads, so pooling
them (rather than the cls token) puts the picture's content into them (what a small ViT reaches on the
synthetic stills: docs/measurements.md). The objective and the export: ``CaptionWordPretraining``'s docstring.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from videolavit.models.eva_vit import EvaViT, EvaViTConfig
from videolavit.models.export import save_export
from videolavit.models.keyframe_tokenizer import CLIP_MEAN, CLIP_STD

WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")


def caption_words(caption: str) -> list[str]:
    """Lower-cased words of a caption (hyphenated words stay whole: "grey-tinted")."""
    return WORD.findall(caption.lower())


def word_bucket(word: str, buckets: int) -> int:
    """A stable bucket for a word (crc32, the same in every process and run)."""
    return zlib.crc32(word.encode("utf-8")) % buckets


@dataclass
class CaptionWordPretrainingConfig:
    """The ViT being trained (the keyframe tokenizer's ``tokenizer.vit``), the head's word buckets and the
    pixel normalisation (the tokenizer's, so the ViT sees the same inputs there)."""

    vit: EvaViTConfig = field(default_factory=EvaViTConfig)
    word_buckets: int = 4096
    pixel_mean: tuple[float, float, float] = CLIP_MEAN
    pixel_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if isinstance(self.vit, dict):
            self.vit = EvaViTConfig(**self.vit)
        self.pixel_mean, self.pixel_std = tuple(self.pixel_mean), tuple(self.pixel_std)
        if self.word_buckets < 2:
            raise ValueError(f"word_buckets must be >= 2, got {self.word_buckets}")


class CaptionWordPretraining(nn.Module):
    """An ``EvaViT`` and a multi-label caption-word head over its pooled patch tokens (layer-normed, mean and max)::

        logits = head([mean_p LN(x_p), max_p LN(x_p)])        x_p: the last block's patch tokens (cls left out)
        loss   = sum_buckets BCE(logits, 1[bucket holds a caption word]) averaged over images

    The export is the ViT alone (``save_export``: ``{name}.safetensors`` in ``EvaViT``'s own state-dict layout,
    which ``EvaViT.load_backbone_weights`` reads strictly, plus ``{name}.json``): the keyframe tokenizer takes it as
    ``backbone_weights``.
    """

    def __init__(self, config: CaptionWordPretrainingConfig):
        super().__init__()
        self.config = config
        self.image_tower = EvaViT(config.vit)
        width = config.vit.width
        self.pool_norm = nn.LayerNorm(width)
        self.word_head = nn.Linear(2 * width, config.word_buckets)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    def word_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1] -> logits [B, word_buckets]."""
        pixels = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        patches = self.pool_norm(self.image_tower.forward_features(pixels)[:, 1:])  # [B, N, C]
        return self.word_head(torch.cat([patches.mean(1), patches.amax(1)], dim=-1))

    def targets(self, captions: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """float [B, word_buckets]: 1 where a bucket holds a word of that caption."""
        y = torch.zeros(len(captions), self.config.word_buckets, device=device)
        for row, caption in enumerate(captions):
            for word in caption_words(caption):
                y[row, word_bucket(word, self.config.word_buckets)] = 1.0
        return y

    def loss(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss, logits [B, word_buckets])."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        logits = self.word_logits(images)
        targets = self.targets(captions, logits.device)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / images.shape[0]
        return loss, logits

    def export_backbone(self, directory: str | Path, name: str) -> Path:
        """Write the ViT alone (``EvaViT`` layout + config); returns the file ``backbone_weights`` takes."""
        return save_export(self.image_tower, directory, name, self.image_tower.config,
                           extra={"role": "keyframe tokenizer backbone_weights (prefix ''), trained on "
                                          "image-caption pairs by caption-word prediction"})


def group_accuracy(logits: torch.Tensor, captions: Sequence[str], words: Sequence[str],
                   buckets: int) -> tuple[int, int]:
    """(correct, counted) for one group of mutually exclusive words (e.g. the shapes): images whose caption
    holds exactly one of ``words`` count, and are correct when that word's logit is the group's highest."""
    columns = torch.tensor([word_bucket(w, buckets) for w in words], device=logits.device)
    predicted = logits[:, columns].argmax(dim=1).tolist()  # one device sync for the batch
    correct = counted = 0
    for guess, caption in zip(predicted, captions):
        said = set(caption_words(caption))
        present = [i for i, w in enumerate(words) if w in said]
        if len(present) != 1:
            continue
        counted += 1
        correct += int(guess == present[0])
    return correct, counted
