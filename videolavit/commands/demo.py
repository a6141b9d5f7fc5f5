"""``python -m videolavit demo``: the whole chain on the embedded synthetic corpus, on a laptop CPU.

Synthesises the moving-shapes corpus (train and held-out seeds), prepares shards, then runs each
stage's tiny config through ``python -m videolavit fit --config experiments/tiny/<stage>.yaml`` (the
path users run), chaining exports, and writes ``report.json`` + ``report.md`` with every stage's final
metrics and its learning check against a baseline. ``--smoke`` is a seconds-scale version for CI.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HELP = "run the whole chain on the synthetic corpus (CPU, minutes) and write a report"

WORKDIR = Path("runs/tiny")  # the tiny configs read and write here


@dataclass
class Stage:
    name: str
    config: str
    check: str  # what the learning check compares
    metric: str  # the logged scalar checked
    threshold: float  # pass when metric <= threshold
    smoke_overrides: list[str] = field(default_factory=list)
    export: str = ""


STAGES = [
    Stage(name="motion_tokenizer", config="experiments/tiny/motion_tokenizer.yaml",
          check="held-out reconstruction MSE / MSE of predicting zero motion", metric="val/recon_ratio",
          threshold=0.30, export="exports/motion_tokenizer.safetensors",
          smoke_overrides=["--trainer.max_steps", "20", "--trainer.val_check_interval", "20",
                           "--data.init_args.batch_size", "8"]),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few steps per stage (CI)")
    parser.add_argument("--train-videos", type=int, default=64)
    parser.add_argument("--val-videos", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)


def _run(cmd: list[str], log: Path) -> float:
    start = time.time()
    print(f"  $ {' '.join(cmd)}", flush=True)
    with open(log, "w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"demo: step failed (exit {done.returncode}); log {log}:\n{tail}")
    return time.time() - start


def _prepare_data(args: argparse.Namespace, logs: Path) -> dict:
    data = WORKDIR / "data"
    timings = {}
    train_videos, val_videos = (8, 4) if args.smoke else (args.train_videos, args.val_videos)
    for split, seed, count in (("train", 0, train_videos), ("val", 1, val_videos)):
        corpus, shards = data / f"corpus_{split}", data / f"shards_{split}"
        manifest = shards / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("written") == count:
            print(f"[data] {split}: reusing {shards}", flush=True)
            continue
        print(f"[data] {split}: {count} synthetic videos (seed {seed}) -> shards", flush=True)
        timings[f"synth_{split}"] = _run([sys.executable, "-m", "videolavit", "synth", "--out", str(corpus),
                                          "--num-videos", str(count), "--seed", str(seed), "--workers",
                                          str(args.workers), "--overwrite"], logs / f"synth_{split}.log")
        timings[f"prepare_{split}"] = _run([sys.executable, "-m", "videolavit", "prepare", "--videos",
                                            str(corpus / "videos"), "--captions", str(corpus / "captions.csv"),
                                            "--out", str(shards), "--workers", str(args.workers),
                                            "--videos-per-unit", "8", "--no-progress"], logs / f"prepare_{split}.log")
    return timings


def _last_scalars(log_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(log_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        return {}
    accumulator = EventAccumulator(str(versions[-1]))
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}


def run(args: argparse.Namespace) -> int:
    started = time.time()
    logs = WORKDIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report = {"mode": "smoke" if args.smoke else "full", "data": {}, "stages": {}}
    report["data"]["seconds"] = _prepare_data(args, logs)
    for stage in STAGES:
        print(f"[{stage.name}] fit --config {stage.config}", flush=True)
        cmd = [sys.executable, "-m", "videolavit", "fit", "--config", stage.config]
        seconds = _run(cmd + (stage.smoke_overrides if args.smoke else []), logs / f"{stage.name}.log")
        scalars = _last_scalars(WORKDIR / stage.name)
        value = scalars.get(stage.metric)
        export = WORKDIR / stage.export
        result = {"seconds": round(seconds, 1), "metrics": {k: round(v, 5) for k, v in scalars.items()
                                                             if k.startswith(("val/", "train/"))},
                  "check": stage.check, "check_metric": stage.metric, "check_value": value,
                  "check_threshold": stage.threshold, "passed": value is not None and value <= stage.threshold,
                  "export": str(export), "export_exists": export.is_file()}
        report["stages"][stage.name] = result
        print(f"[{stage.name}] {stage.metric} = {value} (check: <= {stage.threshold}: "
              f"{'pass' if result['passed'] else 'FAIL'}) in {seconds / 60:.1f} min", flush=True)
    report["minutes"] = round((time.time() - started) / 60, 2)
    (WORKDIR / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"# videolavit demo ({report['mode']}) — {report['minutes']} min", "",
             "| stage | learning check | value | threshold | result | minutes |", "|---|---|---|---|---|---|"]
    for name, r in report["stages"].items():
        value = "n/a" if r["check_value"] is None else f"{r['check_value']:.4f}"
        lines.append(f"| {name} | {r['check']} | {value} | ≤ {r['check_threshold']} | "
                     f"{'pass' if r['passed'] else 'FAIL'} | {r['seconds'] / 60:.1f} |")
    (WORKDIR / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport: {WORKDIR / 'report.json'}, {WORKDIR / 'report.md'}")
    return 0
