"""``python -m videolavit import-release --release DIR --out EXPORTS``: the released Video-LaVIT weights into
our exports layout (``videolavit.release.importer``), ready for ``generate``, ``chat``, ``evaluate`` and the
stages' ``init_from``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "import a Video-LaVIT release directory (all components) into an exports directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--release", required=True, help="the release directory (language_model/, "
                        "visual_tokenizer/, motion_tokenizer.bin, video_detokenizer/, image_detokenizer/, ...)")
    parser.add_argument("--out", required=True, help="exports directory to write (created if missing)")
    parser.add_argument("--sizes", default=None,
                        help="JSON file of size overrides per component (reduced release-layout directories); "
                             "default: the release's sizes")


def run(args: argparse.Namespace) -> int:
    from videolavit.release.importer import ReleaseImportError, import_release

    sizes = None
    if args.sizes is not None:
        path = Path(args.sizes)
        try:
            sizes = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: --sizes {path} is not a readable JSON file: {exc}", file=sys.stderr)
            return 2
    try:
        report = import_release(args.release, args.out, sizes)
    except (ReleaseImportError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"imported {', '.join(report.written)} into {args.out}"
          + (f" (not in the release: {', '.join(report.skipped)})" if report.skipped else ""))
    return 0
