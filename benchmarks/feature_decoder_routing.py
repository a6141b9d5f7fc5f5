"""Can the keyframe feature decoder learn to rebuild the object's patch, given enough steps?

    python benchmarks/feature_decoder_routing.py [RUN_DIR] [--steps 1500] [--lr 1e-3] [--input codes|vit]
        [--object-weight 1]

RUN_DIR is a demo run (default runs/tiny). A fresh decoder of the run's own size is trained alone, on the frozen
keyframe tokenizer's codes of the training videos' frames (3 per video), with the stage's cosine loss, and every
fifth of the run prints the held-out cosine of its output with the ViT feature at the object's patch and at a
background patch. ``--input vit`` feeds it the ViT features themselves, all patches in patch order (what a
decoder could do if the codes carried the ViT's own position); ``--object-weight`` weights the object's patch
in the loss. If the object line stays near 0 while the background one is high, the decoder rebuilds background
only, and g_I, conditioned on its output, cannot know the object (benchmarks/generation_links.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from videolavit.models.export import read_export
from videolavit.models.export_names import KEYFRAME_FEATURE_DECODER
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoder, KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer
from videolavit.synth.moving_shapes import load_corpus, render_frame

FRAMES = (0, 4, 8)  # frames per training video


def object_patch(spec, frame: int, grid: int) -> int:
    x, y = spec.center_at(frame)
    return min(grid - 1, int(y / spec.height * grid)) * grid + min(grid - 1, int(x / spec.width * grid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", default="runs/tiny")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--input", choices=("codes", "vit"), default="codes")
    parser.add_argument("--object-weight", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    root = Path(args.run_dir)
    tokenizer = load_keyframe_tokenizer(root / "exports")
    tokenizer = (tokenizer[0] if isinstance(tokenizer, tuple) else tokenizer).eval()
    _, meta = read_export(root / "exports", KEYFRAME_FEATURE_DECODER)
    config = KeyframeFeatureDecoderConfig(**meta["config"])
    size = tokenizer.config.vit.image_size
    grid = size // tokenizer.config.vit.patch_size
    train, val = load_corpus(root / "data" / "corpus_train"), load_corpus(root / "data" / "corpus_val")

    def encode(specs, frames):
        images = torch.stack([torch.from_numpy(render_frame(s, t)).permute(2, 0, 1) for s in specs for t in frames])
        images = F.interpolate(images.float() / 255, size=(size, size), mode="bilinear", antialias=True)
        with torch.no_grad():
            encoding = tokenizer.encode(images)
        if args.input == "vit":
            features = encoding.vit_features
            return features, torch.ones(features.shape[:2], dtype=torch.bool), features
        return encoding.codes, encoding.mask, encoding.vit_features

    codes, mask, target = encode(train, FRAMES)
    val_codes, val_mask, val_target = encode(val, (0,))
    train_patch = torch.tensor([object_patch(s, t, grid) for s in train for t in FRAMES])
    val_patch = torch.tensor([object_patch(s, 0, grid) for s in val])
    background = (val_patch + grid * grid // 2 - grid // 2) % (grid * grid)  # half a frame away
    rows = torch.arange(len(val))
    if args.input == "vit":
        config = dataclasses.replace(config, code_dim=target.shape[-1])
    decoder = KeyframeFeatureDecoder(config)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=0.001)
    print(f"{len(codes)} training frames, {len(val)} held-out; input {args.input}, "
          f"{float(mask.sum(1).float().mean()):.1f} of {grid * grid} tokens per frame")
    start = time.time()
    for step in range(1, args.steps + 1):
        pick = torch.randint(0, len(codes), (args.batch_size,))
        distance = 1 - F.cosine_similarity(decoder(codes[pick], mask[pick]), target[pick], dim=-1)
        weight = torch.ones_like(distance)
        weight[torch.arange(args.batch_size), train_patch[pick]] = args.object_weight
        loss = (distance * weight).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            with torch.no_grad():
                out = decoder(val_codes, val_mask)
            at_object = F.cosine_similarity(out[rows, val_patch], val_target[rows, val_patch], dim=-1).mean()
            at_background = F.cosine_similarity(out[rows, background], val_target[rows, background], dim=-1).mean()
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out cosine: object {float(at_object):+.3f}  "
                  f"background {float(at_background):+.3f}  ({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
