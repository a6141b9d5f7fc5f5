"""The tiny keyframe backbone's image-text pre-training: caption words -> targets, what the head learns, the
group accuracy the stage logs, the export the keyframe tokenizer loads, and the image-text view."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.image_files as image_files
from datamodules.image_text_views import ImageTextView
from datamodules.skip_tracker import SKIPS
from videolavit.models.caption_word_pretraining import (
    CaptionWordPretraining,
    CaptionWordPretrainingConfig,
    caption_words,
    group_accuracy,
    word_bucket,
)
from videolavit.models.eva_vit import EvaViT, EvaViTConfig

VIT = dict(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, embed_dim=8)


def test_caption_words_and_buckets_are_stable():
    assert caption_words("A red Star over a grey-tinted background.") == [
        "a", "red", "star", "over", "a", "grey-tinted", "background"]
    assert word_bucket("star", 1024) == word_bucket("star", 1024) == 3386595860 % 1024  # crc32, not hash()
    model = CaptionWordPretraining(CaptionWordPretrainingConfig(vit=VIT, word_buckets=64))
    y = model.targets(["a red star", "blue"])
    assert y.shape == (2, 64)
    assert y[0].sum() == 3 and y[1].sum() == 1
    assert y[1, word_bucket("blue", 64)] == 1


def test_the_head_learns_which_word_a_picture_shows_and_group_accuracy_scores_it():
    torch.manual_seed(0)
    model = CaptionWordPretraining(CaptionWordPretrainingConfig(vit=VIT, word_buckets=64))
    images = torch.zeros(8, 3, 16, 16)
    images[:4, :, :, :8] = 1.0  # bright left half
    images[4:, :, :, 8:] = 1.0  # bright right half
    captions = ["a left picture"] * 4 + ["a right picture"] * 4
    before = group_accuracy(model.word_logits(images), captions, ["left", "right"], 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for _ in range(40):
        loss, _ = model.loss(images, captions)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first
    with torch.no_grad():
        assert group_accuracy(model.word_logits(images), captions, ["left", "right"], 64) == (8, 8)
    assert before[1] == 8
    # captions naming none or both words of a group are not counted
    logits = torch.zeros(3, 64)
    logits[:, word_bucket("left", 64)] = 1.0
    assert group_accuracy(logits, ["left", "nothing", "left and right"], ["left", "right"], 64) == (1, 1)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        model.loss(images[:2], captions[:1])


def test_the_export_is_an_eva_vit_the_keyframe_tokenizer_loads_strictly(tmp_path):
    model = CaptionWordPretraining(CaptionWordPretrainingConfig(vit=VIT, word_buckets=32))
    weights = model.export_backbone(tmp_path, "vision_backbone")
    assert weights == tmp_path / "vision_backbone.safetensors"
    assert json.loads((tmp_path / "vision_backbone.json").read_text())["config"]["patch_size"] == 4
    vit = EvaViT(EvaViTConfig(**VIT))
    vit.load_backbone_weights(weights)
    for name, tensor in model.image_tower.state_dict().items():
        assert torch.equal(vit.state_dict()[name], tensor), name


def _stills(tmp_path, count=4):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"s{i}.png")
        lines.append(json.dumps({"image": f"s{i}.png", "caption": f"still {i}"}))
    lines += ['{"image": "missing.png", "caption": "gone"}', "not json"]
    (tmp_path / "image_text.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "image_text.jsonl"


def test_the_view_yields_every_readable_pair_once_in_validation_and_counts_the_rest(tmp_path):
    path = _stills(tmp_path)
    SKIPS.start_stream()
    view = ImageTextView(val_image_text=str(path), image_size=16)
    examples = list(view([], train=False))
    assert [e["caption"] for e in examples] == [f"still {i}" for i in range(4)]
    assert examples[0]["image"].shape == (3, 16, 16) and examples[0]["image"].dtype == torch.uint8
    assert SKIPS.counts["bad_image_text_record"] == 1 and SKIPS.counts["unreadable_image"] == 1
    batch = view.collate(examples)
    assert batch["image"].shape == (4, 3, 16, 16) and batch["caption"] == [f"still {i}" for i in range(4)]
    assert list(ImageTextView(image_text=str(path))([], train=False)) == []  # no validation file: nothing
    with pytest.raises(ValueError, match="set image_text"):
        next(ImageTextView()([], train=True))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        next(ImageTextView(image_text=str(tmp_path / "nope.jsonl"))([], train=True))
    with pytest.raises(ValueError, match="shift_px"):
        ImageTextView(shift_px=-1)


def test_training_cycles_shifts_and_decodes_each_cached_file_once(tmp_path, monkeypatch):
    path = _stills(tmp_path)
    decoded = []
    real = image_files.load_image
    monkeypatch.setattr(image_files, "load_image", lambda p, s: decoded.append(p) or real(p, s))
    reference = {e["caption"]: e["image"] for e in ImageTextView(val_image_text=str(path), image_size=16)([])}
    decoded.clear()
    view = ImageTextView(image_text=str(path), image_size=16, shift_px=3, cache_images=True)
    stream = view([], train=True, rng=random.Random(0))
    examples = [next(stream) for _ in range(12)]  # three passes over the four readable stills
    assert sorted(e["caption"] for e in examples) == sorted([f"still {i}" for i in range(4)] * 3)
    assert len(decoded) == 4 + 3 * 1  # each still once; the missing file is retried each pass (not cached)
    shifted = 0
    for e in examples:
        rolls = [torch.roll(reference[e["caption"]], (dy, dx), (1, 2)) for dy in range(-3, 4) for dx in range(-3, 4)]
        assert any(torch.equal(e["image"], r) for r in rolls)
        shifted += not torch.equal(e["image"], reference[e["caption"]])
    assert shifted > 6
