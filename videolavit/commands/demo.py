"""``python -m videolavit demo``: the whole Video-LaVIT chain on the embedded synthetic corpus, on a laptop CPU.

It synthesises the moving-shapes corpus, trains every stage through its tiny config with the same
``python -m videolavit fit`` command users run, answers held-out questions, generates held-out videos and writes
``report.json`` + ``report.md`` with each stage's learning check against its baseline (zero motion, the untrained
model, chance): one command shows that information flows through the chain (the steps: ``run``'s docstring).

Steps 1-3 are jobs of a dependency graph (``NEEDS``) run on ``--jobs`` lanes (default 2): each job is one
single-threaded process at a time, so on 2 cores two independent stages (the two tokenizers; a detokenizer next
to pre-training) train side by side. ``--jobs 1`` runs them one after another in the listed order.
``--from-stage X`` reruns X and every job downstream of it; the other stages' exports must already exist.
Everything is written under ``WORKDIR/runs/tiny`` (``--workdir``, default the current directory; the tiny
configs use paths relative to it; one log per command under ``runs/tiny/logs``). ``--smoke`` runs a
seconds-scale version (8 + 4 videos, a few steps per stage) for CI: it checks that every export loads into the
next stage and that the outputs are well formed, not that anything learned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from functools import partial
from pathlib import Path

from videolavit.commands.demo_checks import Rule, load_demo_checks, passes
from videolavit.commands.demo_schedule import Job, JobFailed, Outcome, downstream, run_jobs, upstream
from videolavit.synth.stills import IMAGE_QA_FILE

HELP = ("run the whole chain on the synthetic corpus (CPU, ~15 min on 2 idle cores, independent stages on 2 lanes) "
        "and write a report with learning checks")

REPO = Path(__file__).resolve().parents[2]
TINY = Path("runs/tiny")  # relative to the work directory, as in the tiny configs
EXPORTS = TINY / "exports"
TOKENS = {split: TINY / "data" / f"tokens_{split}" for split in ("train", "val")}  # the tiny LLM configs' shards
CHANCE = {"shape": 1 / 4, "color": 1 / 5, "direction": 1 / 4}
STILLS_PER_VIDEO = 8  # training stills: the tiny pretrain/instruct configs' image-text and image-QA sources
VAL_STILLS_PER_VIDEO = 2  # held-out stills: the vision backbone's validation
CHECKS = load_demo_checks()  # experiments/tiny/demo/checks.yaml: pass rules and generation settings
STAGES = CHECKS.stages
SMOKE_STEPS = CHECKS.smoke_steps
FIGURES = {"text_to_video": "text_to_video.png", "curves": "training_curves.png"}  # under runs/tiny

# The job graph: what each job reads (shards, or exports in runs/tiny/exports) comes from the jobs it needs.
# Ready jobs start in this order, so one lane runs them in exactly this order.
NEEDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "motion_tokenizer": ("data",),
    "vision_backbone": ("data",),  # the stills of corpus_train / corpus_val
    "keyframe_tokenizer": ("vision_backbone",),  # backbone_weights: the vision backbone export
    "keyframe_detokenizer": ("keyframe_tokenizer",),  # init_from: the keyframe tokenizer + feature decoder
    "video_detokenizer": ("motion_tokenizer",),  # init_from: the motion tokenizer (motion_source: tokenizer)
    # Both frozen tokenizers over both splits, once: the LLM stages read these token shards.
    "tokenize": ("motion_tokenizer", "keyframe_tokenizer"),
    # The text tokenizer is built from shards_train by the job itself (its validate-before-training run), so
    # nothing else writes it.
    "pretrain": ("tokenize",),
    "instruct": ("pretrain",),  # init_from / tokenizer: the pretrain export (+ the tokenizers, via pretrain)
    "question_answering": ("instruct",),  # chat: instruct + both tokenizers
    "text_to_video": ("pretrain", "keyframe_detokenizer", "video_detokenizer"),  # generate: the pre-trained LLM
}
EVALUATION = ("question_answering", "text_to_video")  # --from-stage evaluation: both


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=".", help="where runs/tiny is written (default: current directory)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few steps per stage (CI)")
    parser.add_argument("--train-videos", type=int, default=256,
                        help="training videos synthesised (default 256: with 64 the tiny LLM overfits)")
    parser.add_argument("--val-videos", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="processes of the data job's synth and prepare")
    parser.add_argument("--from-stage", default=None,
                        help="rerun this job and every job downstream of it, reusing the other stages' exports "
                             f"(which must exist); one of {list(NEEDS) + ['evaluation']}")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="lanes: how many independent jobs run at once (default: min(2, CPU cores); "
                             "1 = one after another)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where every stage trains and the held-out QA and generation run (the timings and "
                             "figures quoted are the CPU's)")
    parser.add_argument("--precision", default=None,
                        help="Lightning precision of every stage (default: the tiny configs' 32-true), e.g. "
                             "bf16-mixed on a GPU")


class DemoError(RuntimeError):
    """A demo step failed; the message says which command and shows its log's tail."""


class Runner:
    """Runs ``python -m videolavit ...`` in the work directory, logging to runs/tiny/logs/<name>.log."""

    def __init__(self, workdir: Path, device: str = "cpu", precision: str | None = None):
        self.workdir = workdir
        # Appended to every stage's fit/validate, and the device of chat/generate.
        self.device = device
        self.trainer_overrides = (["--trainer.accelerator", "gpu", "--trainer.devices", "1"] if device == "cuda"
                                  else [])
        if precision:
            self.trainer_overrides += ["--trainer.precision", precision]
        self.logs = workdir / TINY / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # One intra-op thread per process: the tiny ops are small, and the other core runs the data workers and
        # the job on the other lane.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def __call__(self, name: str, *args: str) -> float:
        cmd = [sys.executable, "-m", "videolavit", *args]
        log = self.logs / f"{name}.log"
        print(f"  $ {' '.join(cmd)}   (log: {log})", flush=True)
        start = time.time()
        with open(log, "w") as handle:
            done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env)
        if done.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise DemoError(f"`{name}` failed (exit {done.returncode}); log {log}:\n{tail}")
        return time.time() - start


def _prepare_data(run: Runner, args: argparse.Namespace) -> dict:
    data = TINY / "data"
    timings = {}
    counts = (8, 4) if args.smoke else (args.train_videos, args.val_videos)
    splits = (("train", 0, counts[0], STILLS_PER_VIDEO), ("val", 1, counts[1], VAL_STILLS_PER_VIDEO))
    for split, seed, count, stills in splits:
        corpus, shards = data / f"corpus_{split}", data / f"shards_{split}"
        manifest = run.workdir / shards / "manifest.json"
        has_stills = not stills or (run.workdir / corpus / IMAGE_QA_FILE).is_file()
        if manifest.is_file() and json.loads(manifest.read_text()).get("written") == count and has_stills:
            print(f"[data] {split}: reusing {shards}", flush=True)
            continue
        print(f"[data] {split}: {count} synthetic videos (seed {seed}) -> shards", flush=True)
        timings[f"synth_{split}"] = run(f"synth_{split}", "synth", "--out", str(corpus), "--num-videos", str(count),
                                        "--seed", str(seed), "--workers", str(args.workers), "--overwrite",
                                        "--stills-per-video", str(stills))
        import shutil

        for stale in (shards, TOKENS[split]):  # new videos: their token shards must be made again too
            if (run.workdir / stale).exists():
                shutil.rmtree(run.workdir / stale)
        timings[f"prepare_{split}"] = run(f"prepare_{split}", "prepare", "--videos", str(corpus / "videos"),
                                          "--captions", str(corpus / "captions.csv"), "--out", str(shards),
                                          "--workers", str(args.workers), "--videos-per-unit", "8", "--no-progress")
    return {k: round(v, 1) for k, v in timings.items()}


def _tokenize(run: Runner) -> dict:
    """Token shards of both splits from the frozen tokenizers (made again from scratch: the exports are new)."""
    import shutil

    result = {"minutes": 0.0}
    for split, out in TOKENS.items():
        if (run.workdir / out).exists():
            shutil.rmtree(run.workdir / out)
        seconds = run(f"tokenize_{split}", "tokenize", "--shards", str(TINY / "data" / f"shards_{split}"),
                      "--exports", str(EXPORTS), "--out", str(out), "--no-progress",
                      "--devices", "cuda" if run.device == "cuda" else "cpu")
        manifest = json.loads((run.workdir / out / "manifest.json").read_text())
        if not manifest.get("complete") or not manifest["written"]:
            raise DemoError(f"tokenize wrote no complete token shards in {out}: {manifest}")
        result[split] = {"videos": manifest["written"], "clips": manifest["clips"], "skipped": manifest["skipped"]}
        result["minutes"] = round(result["minutes"] + seconds / 60, 2)
    return result


def last_scalars(log_dir: Path) -> dict[str, float]:
    """The last value of every scalar in the newest ``version_*`` TensorBoard run under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(log_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        return {}
    accumulator = EventAccumulator(str(versions[-1]))
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}


def _run_stage(run: Runner, stage: Stage, smoke: bool) -> dict:
    extra = (SMOKE_STEPS + stage.smoke if smoke else []) + run.trainer_overrides
    baseline = None
    seconds = 0.0
    if stage.baseline is not None:
        # The same model before any training (seeded init) on the same held-out data.
        seconds += run(f"{stage.name}_before", "validate", "--config", str(stage.config), *extra)
        baseline = last_scalars(run.workdir / TINY / stage.name).get(stage.metric)
    seconds += run(stage.name, "fit", "--config", str(stage.config), *extra)
    scalars = last_scalars(run.workdir / TINY / stage.name)
    value = scalars.get(stage.metric) if stage.metric else None
    if stage.baseline_metric is not None:
        baseline = scalars.get(stage.baseline_metric)
    export = run.workdir / EXPORTS / stage.export
    result = {"minutes": round(seconds / 60, 2), "export": str(EXPORTS / stage.export), "export_exists": export.exists(),
              "metrics": {k: round(v, 5) for k, v in sorted(scalars.items()) if k.startswith("val/")}}
    if stage.metric:
        result["check"] = {"what": stage.check, "metric": stage.metric, "value": value, "rule": stage.passes,
                           "baseline": baseline, "passed": None if smoke else passes(stage.passes, value, baseline)}
    if not result["export_exists"]:
        raise DemoError(f"{stage.name} finished but wrote no export at {export}")
    return result


def _question_answering(run: Runner, smoke: bool) -> dict:
    """Held-out QA with ``chat --qa-file``, scored by chat itself (its ``.accuracy.json``)."""
    from videolavit.commands.chat import accuracy_path

    corpus = TINY / "data" / "corpus_val"
    out = TINY / "qa_predictions.jsonl"
    seconds = run("chat_heldout", "chat", "--model", str(EXPORTS / "instruct"), "--tokenizers", str(EXPORTS),
                  "--qa-file", str(corpus / "qa.json"), "--videos", str(corpus / "videos"), "--out", str(out),
                  "--device", run.device)
    records = [json.loads(line) for line in (run.workdir / out).read_text().splitlines() if line.strip()]
    if not records or not all({"question", "answer", "pred"} <= set(r) for r in records):
        raise DemoError(f"{out} is not well formed")
    scored = json.loads((run.workdir / accuracy_path(out)).read_text()).get("accuracy")
    if not scored:
        raise DemoError(f"chat wrote no accuracy for {out} (are the held-out answers one word each?)")
    accuracy = {k: v["accuracy"] for k, v in scored["per_attribute"].items()}
    rule = Rule(CHECKS.question_answering)
    return {"minutes": round(seconds / 60, 2), "questions": len(records), "predictions": str(out),
            "accuracy": accuracy, "chance": {k: CHANCE.get(k) for k in accuracy}, "rule": rule.text,
            "passed": None if smoke else all(rule.passes(acc) for acc in accuracy.values())}


def _clip_attributes(frames, count: int) -> tuple[str | None, str | None]:
    """The colour and shape most of ``count`` evenly spaced frames of a uint8 [T, H, W, 3] clip show."""
    from collections import Counter

    import torch

    from videolavit.evaluation.figures import pick_frames
    from videolavit.metrics.shape_color import dominant_colors, dominant_shapes

    images = torch.from_numpy(pick_frames(frames, count)).permute(0, 3, 1, 2).contiguous()

    def majority(values):
        found = Counter(v for v in values if v is not None).most_common(1)
        return found[0][0] if found else None

    return majority(dominant_colors(images)), majority(dominant_shapes(images))


def _real_clip(run: Runner, spec, size: tuple[int, int]):
    """The held-out video of ``spec`` at the generated clips' frame size (the views' antialiased resize)."""
    import torch

    from videolavit.video.frames import decode_all_frames

    video = next((run.workdir / TINY / "data" / "corpus_val" / "videos").glob(f"{spec.videoid}.*"))
    frames = torch.from_numpy(decode_all_frames(video)).permute(0, 3, 1, 2).float()
    frames = torch.nn.functional.interpolate(frames, size=size, mode="bilinear", antialias=True)
    return frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _text_to_video(run: Runner, smoke: bool) -> dict:
    from videolavit.evaluation.figures import ClipRow, clip_grid
    from videolavit.metrics.shape_color import attribute_agreement
    from videolavit.synth.moving_shapes import load_corpus
    from videolavit.video.frames import decode_all_frames
    from videolavit.video.motion_direction import direction_agreement, measure_motion

    settings = CHECKS.text_to_video
    steps = 2 if smoke else settings.steps
    specs = load_corpus(run.workdir / TINY / "data" / "corpus_val")[:settings.prompts if not smoke else 2]
    prompts = run.workdir / TINY / "t2v_prompts.txt"
    prompts.write_text("".join(s.caption + "\n" for s in specs))  # the held-out videos' own captions
    out_dir = TINY / "t2v"
    seconds = run("generate_heldout", "generate", "--exports", str(EXPORTS), "--prompts-file", str(prompts),
                  "--out-dir", str(out_dir), "--video-steps", str(steps), "--keyframe-steps", str(steps),
                  "--device", run.device, *settings.sampling)
    measured, colors, shapes, rows, frames_ok = [], [], [], [], True
    real = {"direction": [], "color": [], "shape": []}  # the same measures on the real clips: their ceiling
    for index, spec in enumerate(specs):
        frames = decode_all_frames(run.workdir / out_dir / f"clip_{index:04d}.mp4")
        frames_ok &= frames.shape[0] == 24
        measured.append(measure_motion(frames).direction)
        color, shape = _clip_attributes(frames, settings.frames_shown)
        colors.append(color)
        shapes.append(shape)
        step = max(1, round(spec.fps / 6))  # the generated clip's span at 6 fps
        source = _real_clip(run, spec, frames.shape[1:3])[:step * len(frames):step]
        real_color, real_shape = _clip_attributes(source, settings.frames_shown)
        real["color"].append(real_color)
        real["shape"].append(real_shape)
        real["direction"].append(measure_motion(source).direction)
        rows.append(ClipRow(f"{spec.caption} -> generated: {color} {shape} moving {measured[-1]}",
                            [frames, source], ["generated", "real"]))
    truth = {"direction": [s.direction for s in specs], "color": [s.color for s in specs],
             "shape": [s.shape for s in specs]}
    generated = {"direction": measured, "color": colors, "shape": shapes}
    agreement = {k: attribute_agreement(generated[k], truth[k]) for k in truth}
    ceiling = {k: attribute_agreement(real[k], truth[k]) for k in truth}
    picture = clip_grid(rows, run.workdir / TINY / FIGURES["text_to_video"], frames_per_clip=settings.frames_shown)
    # What the LLM wrote before g_I and g_V rendered it: tells a text-to-motion failure from a rendering one.
    records = [json.loads(line) for line in (run.workdir / out_dir / "generated.jsonl").read_text().splitlines()]
    llm_directions = [r["clips"][0]["motion_direction"] for r in records]
    keyframe_codes = [r["clips"][0]["keyframe_codes"] for r in records]
    checks = {k: {"value": agreement[k], "rule": rule, "real_clips": ceiling[k],
                  "passed": None if smoke else Rule(rule).passes(agreement[k])}
              for k, rule in settings.passes.items()}
    return {"minutes": round(seconds / 60, 2), "videos": len(specs), "sampling_steps": steps,
            "llm_sampling": " ".join(settings.sampling), "frames_per_video_ok": bool(frames_ok),
            "direction_agreement": agreement["direction"], "chance": CHANCE, "checks": checks,
            "generated": generated, "expected": truth, "picture": str(picture.relative_to(run.workdir / TINY)),
            "motion_codes_agreement": direction_agreement(llm_directions, truth["direction"]),
            "motion_codes_directions": llm_directions,
            "keyframe_codes_mean": sum(keyframe_codes) / len(keyframe_codes),
            "passed": None if smoke else all(c["passed"] for c in checks.values())}


def training_curves_of(workdir: Path, stages: list) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per stage, its training loss and its check's metric (every point logged) from its newest TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for stage in stages:
        versions = sorted((workdir / TINY / stage.name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        if not versions:
            continue
        accumulator = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        wanted = [t for t in tags if t == "train/loss" or t == stage.metric or t == stage.baseline_metric]
        curves[stage.name] = {t: [(e.step, e.value) for e in accumulator.Scalars(t)] for t in wanted}
    return curves


def _verdict(passed: bool | None) -> str:
    return "smoke: not checked" if passed is None else ("pass" if passed else "FAIL")


def _markdown(report: dict) -> str:
    lanes = report["lanes"]
    lines = [f"# videolavit demo ({report['mode']}) — {report['minutes']} min on {lanes} lane{'s' * (lanes > 1)}"
             f" ({report['device']})",
             "",
             "| stage | learning check | value | pass rule | result | minutes |", "|---|---|---|---|---|---|"]
    for name, r in report["stages"].items():
        check = r.get("check")
        if check is None:
            lines.append(f"| {name} | — | — | — | — | {r['minutes']} |")
            continue
        value = "n/a" if check["value"] is None else f"{check['value']:.4f}"
        rule = check["rule"].replace("baseline", f"{check['baseline']:.4f}" if check["baseline"] is not None else "?")
        lines.append(f"| {name} | {check['what']} | {value} | {rule} | {_verdict(check['passed'])} | "
                     f"{r['minutes']} |")
    qa = report.get("question_answering")
    if qa:
        lines += ["", f"Held-out QA ({qa['questions']} questions, {qa['minutes']} min; goal {qa['rule']} on every "
                      f"attribute: {_verdict(qa['passed'])}):", "",
                  "| attribute | accuracy | chance |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {qa['chance'].get(k) or 0:.3f} |" for k, v in qa["accuracy"].items()]
    t2v = report.get("text_to_video")
    if t2v:
        lines += ["", f"Text-to-video on {t2v['videos']} held-out prompts ({t2v['minutes']} min, "
                      f"{t2v['sampling_steps']} sampling steps): {_verdict(t2v['passed'])}", "",
                  "| measured on the generated clips | value | goal | result | same measure on the real clips | chance |",
                  "|---|---|---|---|---|---|"]
        for name, check in t2v["checks"].items():
            lines.append(f"| {name} | {check['value']:.3f} | {check['rule']} | {_verdict(check['passed'])} | "
                         f"{check['real_clips']:.3f} | {t2v['chance'].get(name, 0):.3f} |")
        lines += ["", f"The LLM's motion codes alone (decoded by the motion tokenizer) point the caption's way in "
                      f"{t2v['motion_codes_agreement']:.3f}; its keyframes have {t2v['keyframe_codes_mean']:.1f} codes "
                      "on average.", "",
                  f"![generated clip (left) beside the real clip of the same caption (right)]({t2v['picture']})"]
    if report.get("curves"):
        lines += ["", "Training curves (each stage's training loss and the scalar its check reads):", "",
                  f"![training curves]({report['curves']})"]
    skipped = f"; not rerun (--from-stage): {', '.join(report['skipped'])}" if report["skipped"] else ""
    lines += ["", f"Jobs ({report['job_minutes']} min of job time in {report['minutes']} min wall clock{skipped}):", "",
              "| job | lane | started (min) | minutes |", "|---|---|---|---|"]
    lines += [f"| {name} | {j['lane']} | {j['started_minute']} | {j['minutes']} |"
              for name, j in report["jobs"].items()]
    return "\n".join(lines) + "\n"


def _select(jobs: list[Job], from_stage: str | None, workdir: Path) -> set[str]:
    """The jobs to run: all, or (``--from-stage``) data plus the named job and everything downstream of it."""
    names = [job.name for job in jobs]
    if from_stage is None:
        return set(names)
    if from_stage not in names + ["evaluation"]:
        raise SystemExit(f"demo: unknown --from-stage {from_stage!r}; one of {names + ['evaluation']}")
    selected = downstream(jobs, EVALUATION if from_stage == "evaluation" else [from_stage]) | {"data"}
    reused = [s for s in STAGES if s.name in upstream(jobs, selected) - selected]
    missing = [str(EXPORTS / s.export) for s in reused if not (workdir / EXPORTS / s.export).exists()]
    if "tokenize" in upstream(jobs, selected) - selected:
        missing += [str(out / "manifest.json") for out in TOKENS.values()
                    if not (workdir / out / "manifest.json").is_file()]
    if missing:
        raise SystemExit(f"demo: --from-stage {from_stage} reuses exports that do not exist: {missing}; "
                         "start from an earlier stage")
    return selected


def _summary(name: str, result) -> str:
    """One line of a finished job's learning check for the progress log."""
    if name == "question_answering":
        accuracy = ", ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items())
        return f"; accuracy {accuracy} (goal {result['rule']} each: {_verdict(result['passed'])})"
    if name == "tokenize":
        return "; " + ", ".join(f"{split}: {result[split]['clips']} clips of {result[split]['videos']} videos"
                                for split in TOKENS)
    if name == "text_to_video":
        measured = ", ".join(f"{k} {c['value']:.2f} ({c['rule']})" for k, c in result["checks"].items())
        return f"; {measured}: {_verdict(result['passed'])}"
    check = result.get("check") if isinstance(result, dict) else None
    if not check:
        return ""
    value = "n/a" if check["value"] is None else f"{check['value']:.4f}"
    against = "" if check["baseline"] is None else f", baseline {check['baseline']:.4f}"
    return f"; {check['metric']} = {value} ({check['rule']}{against}: {_verdict(check['passed'])})"


def _failure(outcome: Outcome) -> str:
    error = outcome.error
    if isinstance(error, DemoError):
        return str(error)
    return "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()


def _shown_path(path: Path) -> Path:
    """``path`` as users of a checkout type it (relative to the checkout); absolute for an installed package."""
    try:
        return path.relative_to(REPO)
    except ValueError:
        return path


def run(args: argparse.Namespace) -> int:
    """The demo's steps:

    1. synthesise the moving-shapes corpus (training seed 0 with 8 stills per video for the LLM stages' image
       sources, held-out seed 1) and ``prepare`` shards;
    2. run every stage's tiny config through ``python -m videolavit fit --config experiments/tiny/...`` (the path
       users run), each stage reading the exports of the ones it needs from ``runs/tiny/exports``: motion
       tokenizer, keyframe tokenizer, keyframe detokenizer, video detokenizer, pre-training (validated once before
       training too: the caption-loss baseline), instruction tuning. Between the tokenizers and the LLM stages,
       ``python -m videolavit tokenize`` runs the frozen tokenizers once over both splits; pre-training and
       instruction tuning read its token shards (``runs/tiny/data/tokens_{train,val}``);
    3. answer the held-out questions with ``chat --qa-file`` and generate one video per held-out caption with
       ``generate --prompts-file``, measuring the direction of motion in each generated mp4 with our own
       decomposition;
    4. write ``report.json`` + ``report.md``: every stage's final metrics and the learning checks against their
       baselines (zero motion, the untrained model, chance), and when each job ran on which lane.
    """
    started = time.time()
    if args.jobs < 1:
        raise SystemExit(f"demo: --jobs must be >= 1, got {args.jobs}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("demo: --device cuda, but torch sees no CUDA device")
    workdir = Path(args.workdir).resolve()
    runner = Runner(workdir, args.device, args.precision)
    # Each stage keeps its config's DataLoader workers on any number of lanes: 0 or 1 instead of 2 measured no
    # faster with two stages side by side on 2 cores (the same work, just in fewer processes).
    actions = {"data": partial(_prepare_data, runner, args),
               **{s.name: partial(_run_stage, runner, s, args.smoke) for s in STAGES},
               "tokenize": partial(_tokenize, runner),
               "question_answering": partial(_question_answering, runner, args.smoke),
               "text_to_video": partial(_text_to_video, runner, args.smoke)}
    graph = [Job(name, actions[name], needs) for name, needs in NEEDS.items()]
    selected = _select(graph, args.from_stage, workdir)
    # A skipped job's export is already there: what needs it can start at once.
    jobs = [Job(j.name, j.action, tuple(n for n in j.needs if n in selected)) for j in graph if j.name in selected]
    skipped = [name for name in NEEDS if name not in selected]
    configs = {s.name: f": fit --config {_shown_path(s.config)}" for s in STAGES}

    def clock() -> str:
        return f"[{(time.time() - started) / 60:5.1f} min]"

    def on_start(o: Outcome) -> None:
        print(f"{clock()} start {o.name} on lane {o.lane}{configs.get(o.name, '')}", flush=True)

    def on_end(o: Outcome) -> None:
        if o.error is not None:
            print(f"{clock()} FAILED {o.name} after {o.seconds / 60:.1f} min; starting no new jobs", flush=True)
        else:
            print(f"{clock()} done {o.name} in {o.seconds / 60:.1f} min{_summary(o.name, o.result)}", flush=True)

    print(f"demo: {len(jobs)} jobs on {args.jobs} lane{'s' * (args.jobs > 1)}"
          + (f", not rerunning {', '.join(skipped)}" if skipped else "") + f"; logs in {runner.logs}", flush=True)
    try:
        outcomes = run_jobs(jobs, args.jobs, on_start, on_end)
    except JobFailed as failed:
        raise SystemExit(f"demo: job `{failed.name}` failed after {(time.time() - started) / 60:.1f} min "
                         f"(the jobs running beside it finished first): {_failure(failed.outcomes[failed.name])}")
    results = {name: o.result for name, o in outcomes.items()}
    report = {"mode": "smoke" if args.smoke else "full", "workdir": str(workdir), "lanes": args.jobs,
              "device": args.device, "precision": args.precision or "the configs' (32-true)",
              "skipped": skipped,
              "stages": {s.name: results[s.name] for s in STAGES if s.name in results},
              "data_seconds": results["data"]}
    if "tokenize" in results:
        report["tokenize"] = results["tokenize"]
    for name in EVALUATION:
        if name in results:
            report[name] = results[name]
    # When each job started (minutes after the first one) on which lane, and how long it took; in start order.
    report["jobs"] = {o.name: {"lane": o.lane, "started_minute": round(o.start / 60, 2),
                               "minutes": round(o.seconds / 60, 2)}
                      for o in sorted(outcomes.values(), key=lambda o: o.start)}
    report["job_minutes"] = round(sum(o.seconds for o in outcomes.values()) / 60, 2)
    curves = training_curves_of(workdir, STAGES)  # every stage with a log, rerun or not
    if curves and any(any(tags.values()) for tags in curves.values()):
        from videolavit.evaluation.figures import training_curves

        report["curves"] = training_curves(curves, workdir / TINY / FIGURES["curves"]).name
    report["minutes"] = round((time.time() - started) / 60, 2)  # wall clock, setup and report included
    (workdir / TINY / "report.json").write_text(json.dumps(report, indent=2))
    markdown = _markdown(report)
    (workdir / TINY / "report.md").write_text(markdown)
    print(markdown)
    print(f"{clock()} all {len(jobs)} jobs done on {args.jobs} lane{'s' * (args.jobs > 1)}: "
          f"{report['minutes']} min wall clock, {report['job_minutes']} min of job time")
    print(f"report: {workdir / TINY / 'report.json'}, {workdir / TINY / 'report.md'}")
    return 0
