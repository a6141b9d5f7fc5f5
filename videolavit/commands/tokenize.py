"""``python -m videolavit tokenize``: run the frozen stage-1 tokenizers over prepared shards -> token shards.

    python -m videolavit tokenize --shards runs/tiny/data/shards_train --exports runs/tiny/exports \\
        --out runs/tiny/data/tokens_train
    python -m videolavit tokenize --shards /data/shards/webvid_train --exports /ckpt/stage1/export \\
        --out /data/tokens/webvid_train --devices cuda:0,cuda:1,cuda:2,cuda:3 --workers 6 --part 3/16

Resumable (a rerun skips finished input shards and refuses other exports); many nodes by ``--part i/N`` jobs or
one ``torchrun``/``srun`` launch (``datamodules.tokenize_shards`` describes the layout).
"""

from __future__ import annotations

import argparse
import logging
import sys

HELP = "tokenize prepared video shards with the frozen stage-1 tokenizers into token shards for the LLM stages"


def part_of(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part expects i/N (e.g. 3/16), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text}: need 0 <= i < N")
    return i, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, nargs="+",
                        help="prepared shards: a `prepare` output directory, its manifest.json, or patterns")
    parser.add_argument("--exports", required=True,
                        help="directory of the stage-1 exports (motion_tokenizer.*, keyframe_tokenizer.*)")
    parser.add_argument("--out", required=True, help="output directory for the token shards and manifest.json")
    keyframes = parser.add_mutually_exclusive_group()
    keyframes.add_argument("--keyframes", dest="keyframes", action="store_true", default=None,
                           help="tokenize keyframes (default: when a keyframe_tokenizer export is there)")
    keyframes.add_argument("--no-keyframes", dest="keyframes", action="store_false",
                           help="motion ids only (for a motion-only LLM: keyframe_source none)")
    parser.add_argument("--keyframe-backbone-weights", default=None,
                        help="local ViT weight file, overriding the path recorded in the keyframe export")
    parser.add_argument("--devices", default="cpu",
                        help="comma-separated devices, one process each: cpu | cuda | cuda:0,cuda:1,... "
                             "(default cpu)")
    parser.add_argument("--part", type=part_of, default=(0, 1), help="this job's share i/N of the input shards")
    parser.add_argument("--max-clips", type=int, default=8, help="clips tokenized per video (default 8)")
    parser.add_argument("--batch-clips", type=int, default=64, help="clips per tokenizer batch, across videos")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes per device (0: in-process)")
    parser.add_argument("--max-shard-mb", type=float, default=1024.0, help="token shard size bound")
    parser.add_argument("--max-shard-samples", type=int, default=10_000)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from datamodules.shard_list import ShardSpecError
    from datamodules.tokenize_shards import TokenizeConfig, TokenizeError, run_tokenize
    from videolavit.llm.video_codes import TokenizerExportError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if any(d.startswith("cuda") for d in devices):
        import torch

        if not torch.cuda.is_available():
            print(f"error: --devices {args.devices}, but torch sees no CUDA device; pass --devices cpu",
                  file=sys.stderr)
            return 2
    if args.max_clips < 1 or args.batch_clips < 1 or args.workers < 0:
        print("error: --max-clips and --batch-clips must be >= 1 and --workers >= 0", file=sys.stderr)
        return 2
    cfg = TokenizeConfig(shards=args.shards if len(args.shards) > 1 else args.shards[0], exports=args.exports,
                         out=args.out, keyframes=args.keyframes,
                         keyframe_backbone_weights=args.keyframe_backbone_weights, devices=devices,
                         part=args.part[0], num_parts=args.part[1], max_clips=args.max_clips,
                         batch_clips=args.batch_clips, workers=args.workers,
                         max_shard_bytes=int(args.max_shard_mb * 2**20), max_shard_samples=args.max_shard_samples,
                         progress=False if args.no_progress else None)
    try:
        manifest, totals = run_tokenize(cfg)
    except (TokenizeError, TokenizerExportError, ShardSpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items()) or "none"
    print(f"this job: {totals.get('written', 0)} videos in {totals.get('units', 0)} input shards, "
          f"{totals.get('resumed_units', 0)} already done. Output: {manifest['written']} videos "
          f"({manifest['clips']} clips) in {len(manifest['shards'])} token shards; skipped: {skipped}; "
          f"{manifest['units_done']}/{manifest['units_total']} input shards done; exports "
          f"{str(manifest['fingerprint'])[:12]} -> {args.out}/manifest.json")
    return 0
