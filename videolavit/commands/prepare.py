"""``python -m videolavit prepare``: decompose raw videos into WebDataset shards."""

from __future__ import annotations

import argparse
import logging
import sys

from datamodules.prepare import PrepareConfig, run_prepare
from datamodules.prepare_inputs import InputError
from videolavit.video.decompose import DecomposeConfig

HELP = "decompose raw videos (or video2dataset shards) into training shards"


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part expects i/N (e.g. 3/16), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text}: need 0 <= i < N")
    return i, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DecomposeConfig()
    parser.add_argument("--videos", required=True,
                        help="directory of videos and/or video2dataset .tar shards (searched recursively), "
                             "or one file")
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--captions", help="captions CSV (WebVid: videoid,name; InternVid: YoutubeID,Caption)")
    parser.add_argument("--id-column", help="CSV column with the video id (default: detected)")
    parser.add_argument("--caption-column", help="CSV column with the caption (default: detected)")
    parser.add_argument("--allow-missing-captions", action="store_true",
                        help="keep videos without a caption (empty text) instead of skipping them")
    parser.add_argument("--workers", type=int, default=PrepareConfig.workers, help="decoding processes")
    parser.add_argument("--part", type=_part, default=(0, 1), help="this job's share i/N of the units")
    parser.add_argument("--videos-per-unit", type=int, default=256,
                        help="loose videos per resumable unit (each input .tar is its own unit)")
    parser.add_argument("--max-shard-mb", type=float, default=1024.0, help="shard size bound")
    parser.add_argument("--max-shard-samples", type=int, default=10_000)
    parser.add_argument("--fps", type=int, default=d.fps)
    parser.add_argument("--bit-rate", type=int, default=d.bit_rate, help="MPEG-4 re-encode bit rate")
    parser.add_argument("--max-short-side", type=int, default=d.max_short_side,
                        help="downscale videos whose shorter side exceeds this (0: never)")
    parser.add_argument("--max-seconds", type=float, default=d.max_seconds, help="cut longer videos (0: never)")
    parser.add_argument("--max-clips", type=int, default=d.max_clips, help="clips recorded per video")
    parser.add_argument("--drop-removed", action="store_true",
                        help="when input files of finished units are gone, redo those units without them "
                             "(default: refuse, so a wrong --videos never deletes prepared shards)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    decompose = DecomposeConfig(fps=args.fps, bit_rate=args.bit_rate, max_short_side=args.max_short_side or None,
                                max_seconds=args.max_seconds or None, max_clips=args.max_clips)
    cfg = PrepareConfig(videos=args.videos, out=args.out, captions=args.captions, id_column=args.id_column,
                        caption_column=args.caption_column, allow_missing_captions=args.allow_missing_captions,
                        workers=args.workers, part=args.part[0], num_parts=args.part[1],
                        videos_per_unit=args.videos_per_unit, max_shard_bytes=int(args.max_shard_mb * 2**20),
                        max_shard_samples=args.max_shard_samples, decompose=decompose,
                        progress=False if args.no_progress else None, drop_removed=args.drop_removed)
    try:
        manifest = run_prepare(cfg)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in manifest["skipped"].items()) or "none"
    print(f"written {manifest['written']} samples in {len(manifest['shards'])} shards; skipped: {skipped}; "
          f"{manifest['units_done']}/{manifest['units_total']} units done"
          f"{'' if manifest['complete'] else ' (incomplete: run the other parts)'} -> {args.out}/manifest.json")
    return 0
