"""``python -m videolavit evaluate``: text-to-video benchmarks of paper A.4 (MSR-VTT, UCF-101, own CSV).

    python -m videolavit evaluate --protocol msrvtt --root /data/MSRVTT --pipeline exports/ \\
        --clip /weights/clip-vit-base-patch16 --i3d /weights/rgb_imagenet.pt --out msrvtt.json

The trained model is reached through :func:`load_generator` only; the benchmark readers are in
``videolavit.evaluation.protocols`` and the scoring in ``videolavit.evaluation.run``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path

import torch

from videolavit.commands.user_errors import UsageError, check_output_dir, check_output_file, check_range, fail
from videolavit.evaluation.protocols import PROTOCOLS, ProtocolLayoutError, read_protocol, ucf101_real_videos
from videolavit.evaluation.run import (
    METRIC_TITLES,
    METRIC_WEIGHTS,
    PROTOCOL_METRICS,
    GenerateFn,
    MetricSettings,
    RealVideoSettings,
    EvaluationError,
    EvaluationSettings,
    build_metrics,
    evaluate_text_to_video,
    protocol_weight_flags,
)
from videolavit.metrics.weights import MissingWeightsError
from videolavit.models.export import ExportError

HELP = "score a text-to-video pipeline on MSR-VTT / UCF-101 / a prompt CSV (FVD, CLIPSIM, FID, IS)"
PIPELINE_MODULE = "videolavit.inference.text_to_video"


class PipelineUnavailableError(RuntimeError):
    """The text-to-video pipeline cannot be loaded from ``--pipeline``."""


def _pipeline_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--pipeline-option expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, null, lists
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS,
                        help="msrvtt: test split, one caption per video; ucf101: class-name prompts × 20; "
                             "csv: your own prompt[,video] CSV")
    parser.add_argument("--root", required=True,
                        help="benchmark folder (MSR-VTT / UCF-101), or the CSV file (or a folder with prompts.csv)")
    parser.add_argument("--out", required=True, help="report JSON to write")
    parser.add_argument("--pipeline", required=True,
                        help="directory of the trained exports (read by TextToVideo.from_directory)")
    parser.add_argument("--pipeline-option", action="append", default=[], type=_pipeline_option, metavar="KEY=VALUE",
                        help="extra keyword for TextToVideo.from_directory (repeatable; VALUE is parsed as JSON "
                             "when it can be)")
    weights = parser.add_argument_group("metric weights (local files; only the metrics given are computed)")
    weights.add_argument("--i3d", help="FVD: I3D weights (pytorch-i3d rgb_imagenet.pt or TorchScript detector)")
    weights.add_argument("--clip", help="CLIPSIM: CLIP directory (save_pretrained of ViT-B/16)")
    weights.add_argument("--fid-weights", help="frame FID: TorchScript Inception file or CLIP directory")
    weights.add_argument("--c3d", help="IS: C3D UCF-101 weights (state dict or TorchScript)")
    parser.add_argument("--real-stats-dir",
                        help="cache of real-side FVD/FID statistics (default: real_stats/ next to --out)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items (deterministic)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate() call")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (batch k uses seed + its first index)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the metric networks (and the pipeline's, passed as device=)")
    parser.add_argument("--save-videos", help="also write the generated videos as mp4 to this folder")
    parser.add_argument("--save-fps", type=int, default=6, help="frame rate of the saved mp4 files")
    parser.add_argument("--no-progress", action="store_true")
    bench = parser.add_argument_group("benchmark layout")
    bench.add_argument("--annotations", help="msrvtt: annotation JSON (default: found under --root)")
    bench.add_argument("--videos-dir", help="msrvtt: folder of video*.mp4 (default: found under --root)")
    bench.add_argument("--caption-seed", type=int, default=0, help="msrvtt: seed choosing each video's caption")
    bench.add_argument("--prompts-file", help="ucf101: class → prompt overrides (JSON object or class,prompt CSV)")
    bench.add_argument("--videos-per-class", type=int, default=20, help="ucf101: generated videos per class")
    bench.add_argument("--ucf-real", choices=("paired", "all"), default="paired",
                       help="ucf101 real side: 20 clips per class spread over its groups (paired) or every clip")
    real = parser.add_argument_group("real videos and metric protocol")
    defaults, metric_defaults = RealVideoSettings(), MetricSettings()
    real.add_argument("--real-frames", type=int, default=defaults.num_frames, help="frames decoded per real video")
    real.add_argument("--real-fps", type=float, default=None,
                      help="resample real videos to this rate (default: their own)")
    real.add_argument("--real-clip", choices=("first", "center"), default=defaults.clip,
                      help="take the real clip from the start or the middle of each video")
    real.add_argument("--real-short-side", type=int, default=None, help="downscale real videos while decoding")
    real.add_argument("--decode-workers", type=int, default=4, help="threads decoding real videos")
    real.add_argument("--fvd-frames", type=int, default=metric_defaults.fvd_frames)
    real.add_argument("--fvd-resolution", type=int, default=metric_defaults.fvd_resolution)
    real.add_argument("--fid-frames-per-video", type=int, default=None, help="frames per video for FID (default: all)")
    real.add_argument("--is-splits", type=int, default=metric_defaults.is_splits)


def load_generator(pipeline_dir: str | Path, args: argparse.Namespace) -> GenerateFn:
    """``TextToVideo.from_directory(pipeline_dir, device=..., **--pipeline-option)`` as a generate callable.

    The pipeline module is imported only here, so everything else in evaluation works (and is tested)
    without it; its ``__call__(prompts, generator)`` must return uint8 [B, T, 3, H, W].
    """
    pipeline_dir = Path(pipeline_dir).expanduser()
    if not pipeline_dir.is_dir():
        raise PipelineUnavailableError(f"--pipeline '{pipeline_dir}' is not a directory of trained exports")
    try:
        module = importlib.import_module(PIPELINE_MODULE)
    except ModuleNotFoundError as error:
        if error.name is not None and not PIPELINE_MODULE.startswith(error.name):
            raise  # a dependency of the pipeline is missing: show the real error
        raise PipelineUnavailableError(
            f"the text-to-video pipeline ({PIPELINE_MODULE}) is not available in this installation, so "
            f"--pipeline cannot be loaded ({error})") from None
    pipeline_class = getattr(module, "TextToVideo", None)
    if pipeline_class is None or not hasattr(pipeline_class, "from_directory"):
        raise PipelineUnavailableError(f"{PIPELINE_MODULE} has no TextToVideo.from_directory")
    options = dict(args.pipeline_option)
    options.setdefault("device", args.device)
    try:
        pipeline = pipeline_class.from_directory(pipeline_dir, **options)
    except (ExportError, FileNotFoundError, TypeError, ValueError) as error:  # missing exports, unknown options
        raise PipelineUnavailableError(f"cannot load the pipeline from --pipeline '{pipeline_dir}': {error}") from error
    if not callable(pipeline):
        raise PipelineUnavailableError(f"TextToVideo.from_directory('{pipeline_dir}') returned a non-callable")
    return pipeline


def _reader_options(args: argparse.Namespace) -> dict:
    if args.protocol == "msrvtt":
        return {"seed": args.caption_seed, "annotations": args.annotations, "videos_dir": args.videos_dir}
    if args.protocol == "ucf101":
        return {"videos_per_class": args.videos_per_class, "prompts_file": args.prompts_file}
    return {}


def check_arguments(args: argparse.Namespace) -> None:
    """Raise :class:`UsageError` for a count or output that cannot work, before anything is loaded or scored."""
    check_range("--batch-size", args.batch_size, 1)
    check_range("--limit", args.limit, 1)
    check_range("--save-fps", args.save_fps, 1, 240)
    check_range("--real-frames", args.real_frames, 1)
    check_range("--real-fps", args.real_fps, 0, low_inclusive=False)
    check_range("--real-short-side", args.real_short_side, 1)
    check_range("--decode-workers", args.decode_workers, 1)
    check_range("--fvd-frames", args.fvd_frames, 1)
    check_range("--fvd-resolution", args.fvd_resolution, 1)
    check_range("--fid-frames-per-video", args.fid_frames_per_video, 1)
    check_range("--is-splits", args.is_splits, 1)
    check_range("--videos-per-class", args.videos_per_class, 1)
    check_output_file("--out", args.out)
    if args.real_stats_dir:
        check_output_dir("--real-stats-dir", args.real_stats_dir)
    if args.save_videos:
        check_output_dir("--save-videos", args.save_videos)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.protocol not in PROTOCOLS:
        return fail(f"unknown --protocol '{args.protocol}'; choose one of {list(PROTOCOLS)}")
    given = [name for name in PROTOCOL_METRICS[args.protocol] if getattr(args, METRIC_WEIGHTS[name]) is not None]
    if not given:
        return fail(f"no metric weights given for --protocol {args.protocol}: pass at least one of "
                     f"{protocol_weight_flags(args.protocol)}")
    root = Path(args.root).expanduser()
    if not root.exists():
        return fail(f"--root '{root}' does not exist")
    try:
        check_arguments(args)
    except UsageError as error:
        return fail(error)
    try:
        items = read_protocol(args.protocol, root, limit=args.limit, **_reader_options(args))
        real_videos = ucf101_real_videos(root) if args.protocol == "ucf101" and args.ucf_real == "all" else None
        metric_settings = MetricSettings(
            i3d=args.i3d, clip=args.clip, fid_weights=args.fid_weights, c3d=args.c3d,
            fvd_frames=args.fvd_frames, fvd_resolution=args.fvd_resolution,
            fid_frames_per_video=args.fid_frames_per_video, is_splits=args.is_splits, device=args.device)
        real = RealVideoSettings(num_frames=args.real_frames, fps=args.real_fps, clip=args.real_clip,
                                 short_side=args.real_short_side)
        metrics = build_metrics(args.protocol, metric_settings)
        generate = load_generator(args.pipeline, args)
    except (ProtocolLayoutError, MissingWeightsError, PipelineUnavailableError, ValueError) as error:
        return fail(str(error))
    out = Path(args.out)
    stats_dir = Path(args.real_stats_dir) if args.real_stats_dir else out.parent / "real_stats"
    print(f"{args.protocol}: {len(items)} prompts, {sum(i.real_video is not None for i in items)} paired real "
          f"videos; metrics: {', '.join(METRIC_TITLES[n] for n in metrics)}")
    try:
        settings = EvaluationSettings(
            metric_settings, protocol=args.protocol, batch_size=args.batch_size, seed=args.seed,
            real_stats_dir=stats_dir, real=real, real_videos=real_videos, save_videos=args.save_videos,
            save_fps=args.save_fps, out=out, decode_workers=args.decode_workers, progress=not args.no_progress,
            extra_settings={"root": str(root), "pipeline": str(args.pipeline), "limit": args.limit,
                            "caption_seed": args.caption_seed if args.protocol == "msrvtt" else None,
                            "ucf_real": args.ucf_real if args.protocol == "ucf101" else None,
                            "pipeline_options": dict(args.pipeline_option)})
        report = evaluate_text_to_video(items, generate, settings, built_metrics=metrics)
    except EvaluationError as error:
        return fail(str(error))
    values = ", ".join(f"{k}={v:.4g}" for k, v in report["metrics"].items())
    print(f"{values}; {report['skipped']['real_videos']} real videos skipped; "
          f"{report['wall_time_s']:.1f} s -> {out}")
    return 0
