"""Held-out linear probes: what do a keyframe tokenizer's codes say about the picture?

    python benchmarks/keyframe_code_probe.py EXPORT_DIR [EXPORT_DIR ...] [--data runs/tiny/data]
        [--frames-per-video 0] [--draws 4] [--selection threshold|sample] [--seed 0]
        [--backbone-weights PATH] [--json OUT.json]

For each export (a ``keyframe_tokenizer`` export directory, e.g. runs/tiny/exports) the frames of the
moving-shapes corpus are tokenized and multinomial logistic-regression probes are fitted on the *train*
split and scored on the held-out *val* split, for the labels the corpus records per video
(``corpus_<split>/metadata.jsonl``): the object's ``shape`` and ``color`` and the ``background`` tint.
Features, per image:

    vit             mean ‖ max over patches of the frozen ViT's patch features (what there is to keep)
    latents         mean ‖ max over kept tokens of the L2-normalised pre-quantisation latents
    code_vectors    mean ‖ max over kept tokens of the codebook vectors of the chosen ids
    codes           bag of code ids (share of the image's tokens per id): what the LLM receives
    codes_keep_all  bag of code ids when *every* patch is kept (separates the selector from the rest)
    object_latent   (every patch kept) the pre-quantisation latent of the token at the object's patch
    object_code     (every patch kept) that token's code id, one-hot: is the object's own code specific
                    to what the object looks like?

Images are the clip keyframes the keyframe view yields (``--frames-per-video 0``, the default: 2 per tiny
video, what the stage trains on) or N evenly spaced frames per video (more images, same videos). Selection
follows the export's ``eval_selection`` (or ``--selection``); with ``sample`` (Gumbel, as the release)
every image is tokenized ``--draws`` times (seeded): all training draws train the probe, and the held-out
accuracy is the mean over the held-out draws. The probe's L2 strength is chosen by 4-fold cross-validation
on the training split, folds grouped by video (frames of one video are near copies), so the held-out split
is only used for the final score. With 16 held-out videos one video is ~6 points: compare settings over
several training seeds. Also printed: tokens per image, how often the patch under the object's centre is
kept, and (when the export has its ``keyframe_feature_decoder``) the cosine of the reconstructed ViT
feature at the object's patch against the other patches'.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.sample_format import decode_sample  # noqa: E402
from datamodules.shard_list import resolve_shards  # noqa: E402
from datamodules.tar_reader import iter_tar_samples  # noqa: E402
from datamodules.views import KeyframeView, _resize_crop_box, _to_chw  # noqa: E402
from stages.keyframe_tokenizer import DECODER_EXPORT_NAME  # noqa: E402
from videolavit.models.export import load_export  # noqa: E402
from videolavit.models.keyframe_tokenizer import KeyframeTokenizer  # noqa: E402
from videolavit.models.keyframe_tokenizer_export import RandomBackboneWarning, load_keyframe_tokenizer  # noqa: E402
from videolavit.video.frames import decode_frames  # noqa: E402

LABELS = ("shape", "color", "background")
FEATURES = ("vit", "latents", "code_vectors", "codes", "codes_keep_all", "object_latent", "object_code")
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
CV_FOLDS = 4


@dataclass
class Keyframes:
    """Images of one split with their labels; ``object_patch`` is the patch under the object's centre."""

    images: torch.Tensor  # uint8 [M, 3, S, S]
    videos: list[str]  # [M] source video key (probe CV folds are grouped by it)
    labels: dict[str, list[str]]  # label name -> [M]
    object_patch: torch.Tensor  # long [M]


def read_metadata(corpus_dir: Path) -> dict[str, dict]:
    path = corpus_dir / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the probe needs the synthetic corpus' per-video labels "
                                "(`python -m videolavit demo` or `synth` writes them)")
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {record["videoid"]: record for record in records}


def object_patch_index(record: dict, frame: int, fps: int, image_size: int, patch_size: int) -> int:
    """Patch (raster index) holding the object's centre in the 6 fps ``frame``, after the view's resize/crop."""
    t = frame / fps
    cx, cy = record["start_x"] + record["dx_px_per_s"] * t, record["start_y"] + record["dy_px_per_s"] * t
    (rh, rw), (ys, xs) = _resize_crop_box(record["height"], record["width"], (image_size, image_size))
    x = cx * rw / record["width"] - xs.start
    y = cy * rh / record["height"] - ys.start
    grid = image_size // patch_size
    col = min(max(int(x // patch_size), 0), grid - 1)
    row = min(max(int(y // patch_size), 0), grid - 1)
    return row * grid + col


def load_keyframes(shards: str, corpus_dir: Path, image_size: int, patch_size: int,
                   frames_per_video: int) -> Keyframes:
    metadata = read_metadata(corpus_dir)
    view = KeyframeView(image_size=image_size)
    images, videos, object_patch = [], [], []
    labels: dict[str, list[str]] = {name: [] for name in LABELS}
    for url in resolve_shards(shards):
        for raw in iter_tar_samples(url):
            sample = decode_sample(raw)
            key, meta = sample["key"], sample["meta"]
            if key not in metadata:
                raise KeyError(f"video {key!r} of {url} has no record in {corpus_dir / 'metadata.jsonl'}")
            if frames_per_video > 0:
                frames = [int(i * meta["num_frames"] / frames_per_video) for i in range(frames_per_video)]
                (rh, rw), (ys, xs) = _resize_crop_box(meta["height"], meta["width"], (image_size, image_size))
                pictures = list(_to_chw(decode_frames(sample["mp4"], frames, meta["fps"], size=(rh, rw))[:, ys, xs]))
            else:
                examples = list(view.examples(sample, train=False, rng=None))
                frames, pictures = [e["clip_start"] for e in examples], [e["image"] for e in examples]
            for frame, picture in zip(frames, pictures):
                images.append(picture)
                videos.append(key)
                object_patch.append(object_patch_index(metadata[key], frame, meta["fps"], image_size, patch_size))
                for name in LABELS:
                    labels[name].append(metadata[key][name])
    if not images:
        raise ValueError(f"no keyframes found in {shards}")
    return Keyframes(torch.stack(images), videos, labels, torch.tensor(object_patch))


def _bag(ids: torch.Tensor, mask: torch.Tensor, num_codes: int) -> torch.Tensor:
    """[B, L] ids (-1 padded) -> [B, K] share of the image's tokens that took each code."""
    counts = torch.zeros(ids.shape[0], num_codes).scatter_add_(1, ids.clamp(min=0), mask.float())
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


def _mean_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, D] over the True entries of mask [B, L] -> [B, 2D] (mean ‖ max)."""
    m = mask[..., None].float()
    mean = (x * m).sum(1) / m.sum(1).clamp(min=1)
    biggest = x.masked_fill(~mask[..., None], -math.inf).amax(1)
    return torch.cat([mean, biggest], dim=-1)


@torch.no_grad()
def tokenize_features(model: KeyframeTokenizer, decoder: torch.nn.Module | None, keyframes: Keyframes,
                      seed: int, batch_size: int = 64) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One selection draw over all images -> per-feature [M, F] matrices and summary statistics."""
    torch.manual_seed(seed)
    k = model.config.num_codes
    features: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    tokens, object_kept, object_cos, other_cos = [], [], [], []
    for start in range(0, len(keyframes.images), batch_size):
        images = keyframes.images[start:start + batch_size].float() / 255
        patch = keyframes.object_patch[start:start + batch_size]
        enc = model.encode(images)
        vit = enc.vit_features.float()
        features["vit"].append(_mean_max(vit, torch.ones(vit.shape[:2], dtype=torch.bool)))
        features["latents"].append(_mean_max(enc.latents, enc.mask))
        features["code_vectors"].append(_mean_max(enc.codes, enc.mask))
        features["codes"].append(_bag(enc.ids, enc.mask, k))
        # Every patch kept: same merger and quantiser, no selector.
        keep_all = torch.ones(vit.shape[:2])
        merged = model.causal_encoder(enc.vit_features, keep_all)
        raw = model.encode_task_layer(merged)  # [B, N, D]
        ids = model.quantize.encode(raw)
        features["codes_keep_all"].append(_bag(ids, keep_all.bool(), k))
        rows = torch.arange(len(patch))
        features["object_latent"].append(F.normalize(raw[rows, patch].float(), dim=-1))
        features["object_code"].append(F.one_hot(ids[rows, patch], k).float())
        tokens.append(enc.lengths.float())
        object_kept.append(enc.keep.gather(1, patch[:, None])[:, 0].float())
        if decoder is not None:
            cosine = F.cosine_similarity(decoder(enc.codes, enc.mask).float(), vit, dim=-1)  # [B, N]
            on_object = F.one_hot(patch, cosine.shape[1]).bool()
            object_cos.append(cosine[on_object])
            other_cos.append(cosine[~on_object])
    stats = {"tokens_per_image": float(torch.cat(tokens).mean()),
             "object_patch_kept": float(torch.cat(object_kept).mean()),
             "keep_ratio": float(torch.cat(tokens).mean()) / model.config.vit.num_patches}
    if decoder is not None:
        stats["object_patch_cosine"] = float(torch.cat(object_cos).mean())
        stats["other_patch_cosine"] = float(torch.cat(other_cos).mean())
    return {name: torch.cat(parts) for name, parts in features.items()}, stats


# ---- probe ------------------------------------------------------------------------------------------

def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (L-BFGS, mean cross-entropy + l2 * |W|^2) on standardised x."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [((t - mean) / std).double() for t in (train, *others)]


def _accuracy(x, y, weight, bias) -> float:
    return float(((x @ weight + bias).argmax(1) == y).double().mean())


def probe_accuracy(train_x: list[torch.Tensor], train_y: list[str], train_groups: list[str],
                   test_x: list[torch.Tensor], test_y: list[str]) -> tuple[float, float]:
    """Held-out accuracy (mean over the test draws) and the L2 strength chosen by grouped CV on train.

    ``train_x``/``test_x`` hold one [M, F] matrix per selection draw (rows aligned with the labels).
    """
    classes = sorted(set(train_y))
    index = {c: i for i, c in enumerate(classes)}
    y_train = torch.tensor([index[c] for c in train_y])
    y_test = torch.tensor([index.get(c, -1) for c in test_y])  # an unseen class is always wrong
    draws = len(train_x)
    groups = sorted(set(train_groups))
    fold_of_group = {g: i % CV_FOLDS for i, g in enumerate(groups)}
    fold = torch.tensor([fold_of_group[g] for g in train_groups])
    x_all, y_all, fold_all = torch.cat(train_x), y_train.repeat(draws), fold.repeat(draws)

    def cv_score(l2: float) -> float:
        scores = []
        for f in range(CV_FOLDS):
            inside = fold_all != f
            a, b = _standardise(x_all[inside], x_all[~inside])
            weight, bias = _fit_logistic(a, y_all[inside], len(classes), l2)
            scores.append(_accuracy(b, y_all[~inside], weight, bias))
        return float(np.mean(scores))

    best = max(L2_GRID, key=cv_score)  # ties -> the smallest l2 (first in the grid)
    a, *tests = _standardise(x_all, *test_x)
    weight, bias = _fit_logistic(a, y_all, len(classes), best)
    return float(np.mean([_accuracy(t, y_test, weight, bias) for t in tests])), best


# ---- report -----------------------------------------------------------------------------------------

def probe_export(export: Path, data: Path, frames_per_video: int, draws: int, seed: int,
                 backbone_weights: str | None, cache: dict, selection: str | None = None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomBackboneWarning)
        model = load_keyframe_tokenizer(export, backbone_weights=backbone_weights)
    if selection is not None:
        model.config.eval_selection = selection
    decoder = None
    if (export / f"{DECODER_EXPORT_NAME}.json").is_file():
        decoder = load_export(export, DECODER_EXPORT_NAME).eval()
    vit = model.config.vit
    splits = {}
    for split in ("train", "val"):
        key = (split, vit.image_size, vit.patch_size, frames_per_video)
        if key not in cache:
            cache[key] = load_keyframes(str(data / f"shards_{split}"), data / f"corpus_{split}", vit.image_size,
                                        vit.patch_size, frames_per_video)
        splits[split] = cache[key]
    sampled = model.config.eval_selection == "sample"
    runs = {split: [tokenize_features(model, decoder, splits[split], seed + 1000 * (split == "val") + d)
                    for d in range(draws if sampled else 1)] for split in splits}
    stats = {split: {name: float(np.mean([r[1][name] for r in runs[split]])) for name in runs[split][0][1]}
             for split in runs}
    result = {"export": str(export), "selection": model.config.eval_selection,
              "train_images": len(splits["train"].images), "val_images": len(splits["val"].images),
              "draws": len(runs["val"]), "stats": stats, "chance": {}, "accuracy": {}, "l2": {}}
    train, val = splits["train"], splits["val"]
    for label in LABELS:
        counts = {c: val.labels[label].count(c) for c in set(val.labels[label])}
        result["chance"][label] = max(counts.values()) / len(val.labels[label])
        for name in FEATURES:
            accuracy, l2 = probe_accuracy([r[0][name] for r in runs["train"]], train.labels[label], train.videos,
                                          [r[0][name] for r in runs["val"]], val.labels[label])
            result["accuracy"].setdefault(name, {})[label] = accuracy
            result["l2"].setdefault(name, {})[label] = l2
    return result


def print_result(result: dict) -> None:
    stats = result["stats"]["val"]
    print(f"\n{result['export']}  (train {result['train_images']} / held-out {result['val_images']} images, "
          f"selection {result['selection']!r}, {result['draws']} draw(s))")
    extra = ""
    if "object_patch_cosine" in stats:
        extra = (f", reconstruction cosine at the object's patch {stats['object_patch_cosine']:.3f} vs "
                 f"other patches {stats['other_patch_cosine']:.3f}")
    print(f"  held-out: {stats['tokens_per_image']:.1f} tokens/image, object's patch kept "
          f"{100 * stats['object_patch_kept']:.0f}%{extra}")
    print(f"  {'features':16s}" + "".join(f"{label:>12s}" for label in LABELS))
    for name in FEATURES:
        print(f"  {name:16s}" + "".join(f"{100 * result['accuracy'][name][label]:11.0f}%" for label in LABELS))
    print(f"  {'majority class':16s}" + "".join(f"{100 * result['chance'][label]:11.0f}%" for label in LABELS))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", type=Path, help="keyframe tokenizer export directories")
    parser.add_argument("--data", type=Path, default=REPO / "runs/tiny/data",
                        help="holds shards_{train,val} and corpus_{train,val}/metadata.jsonl")
    parser.add_argument("--frames-per-video", type=int, default=0,
                        help="0: the clip keyframes the keyframe view yields; N: N evenly spaced frames")
    parser.add_argument("--draws", type=int, default=4, help="selection draws per image (eval_selection: sample)")
    parser.add_argument("--selection", choices=("threshold", "sample"), default=None,
                        help="override the export's eval_selection (default: as exported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone-weights", default=None, help="override the backbone file the export records")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write all figures to this file")
    args = parser.parse_args(argv)
    if args.draws < 1 or args.frames_per_video < 0:
        parser.error("--draws must be >= 1 and --frames-per-video >= 0")
    torch.set_num_threads(args.threads)
    cache: dict = {}
    results = []
    for export in args.exports:
        result = probe_export(export, args.data, args.frames_per_video, args.draws, args.seed,
                              args.backbone_weights, cache, args.selection)
        print_result(result)
        results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
