"""``python -m videolavit synth``: write the procedurally generated moving-shapes corpus (docs/design.md §11)."""

from __future__ import annotations

import argparse
import sys

from videolavit.commands.user_errors import UsageError, check_range, fail

MAX_VIDEOS = 10_000_000  # beyond any disk: a typo
HELP = "generate the synthetic moving-shapes corpus (mp4 + captions.csv + qa.json + metadata.jsonl)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--num-videos", type=int, required=True, help="number of videos to render")
    parser.add_argument("--seed", type=int, required=True, help="corpus seed (>= 0); ids are s{seed}_{index}")
    parser.add_argument("--size", default="128x128", help="frame size WIDTHxHEIGHT, even, >= 32 (default 128x128)")
    parser.add_argument("--fps", type=int, default=12, help="source frame rate (default 12)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of every video (default 10)")
    parser.add_argument("--workers", type=int, default=1, help="render videos in this many processes (default 1)")
    parser.add_argument("--stills-per-video", type=int, default=0,
                        help="also write this many still images per video with captions (image_text.jsonl) and "
                             "shape/colour questions (image_qa.json), for the stages' image sources (default 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a different moving-shapes corpus already in --out"
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from videolavit.synth.moving_shapes import CorpusExistsError, generate_corpus, parse_size

    try:
        check_range("--num-videos", args.num_videos, 1, MAX_VIDEOS)
        check_range("--seed", args.seed, 0)
        check_range("--fps", args.fps, 1, 240)
        check_range("--seconds", args.seconds, 0, 3600, low_inclusive=False)
        check_range("--workers", args.workers, 1, 256)
        check_range("--stills-per-video", args.stills_per_video, 0, 1000)
        size = parse_size(args.size)
        with tqdm(total=args.num_videos, unit="video", disable=not sys.stderr.isatty()) as bar:
            specs = generate_corpus(
                args.out, args.num_videos, args.seed, size=size, fps=args.fps, seconds=args.seconds,
                workers=args.workers, overwrite=args.overwrite, progress=bar.update,
                stills_per_video=args.stills_per_video,
            )  # fmt: skip
    except (UsageError, ValueError, OSError, CorpusExistsError) as error:
        return fail(error)
    geometry = f"{size[0]}x{size[1]}, {args.fps} fps, {specs[0].duration_s:g} s"
    stills = f" and {args.stills_per_video} stills per video" if args.stills_per_video else ""
    print(f"wrote {len(specs)} videos ({geometry}){stills} to {args.out}")
    return 0
