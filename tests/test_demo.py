"""The embedded default end to end (CI smoke): every stage's tiny config through `fit --config`, each export
loading into the next stage, then held-out QA and text-to-video from the final exports; and the scheduler that
runs those jobs on parallel lanes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from videolavit.commands.demo import EXPORTS, NEEDS, STAGES, TOKENS, _select
from videolavit.commands.demo_checks import passes
from videolavit.commands.demo_schedule import GraphError, Job, JobFailed, check_graph, run_jobs
from videolavit.video.frames import decode_all_frames

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, "-m", "videolavit", "demo", "--smoke", "--workdir", str(workdir),
                           "--workers", "1", "--jobs", "2"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return workdir / "runs" / "tiny"


def test_every_stage_runs_and_hands_its_export_to_the_next(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    assert list(report["stages"]) == [s.name for s in STAGES]
    for name, stage in report["stages"].items():
        assert stage["export_exists"], name
        assert stage["metrics"], f"{name} logged no validation metrics"
        if "check" in stage:
            assert stage["check"]["value"] is not None and stage["check"]["passed"] is None  # smoke: not judged
    assert report["stages"]["pretrain"]["check"]["baseline"] > 0  # validated before training
    keyframes = report["stages"]["keyframe_detokenizer"]  # the control condition of the same run
    assert keyframes["check"]["baseline"] == pytest.approx(keyframes["metrics"]["val/loss_other_codes"], abs=1e-5)
    assert (smoke_run / "exports" / "instruct" / "config.json").is_file()
    assert "smoke: not checked" in (smoke_run / "report.md").read_text()


def test_the_smoke_run_kept_to_the_graph_and_its_lanes(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    jobs = report["jobs"]
    assert report["lanes"] == 2 and set(jobs) == set(NEEDS)
    end = {name: j["started_minute"] + j["minutes"] for name, j in jobs.items()}
    for name, needs in NEEDS.items():
        for need in needs:  # report times are rounded to 0.01 min
            assert jobs[name]["started_minute"] >= end[need] - 0.011, (name, need)
    most_alongside = 0
    for name, j in jobs.items():
        assert j["lane"] in (1, 2)
        alongside = [other for other, k in jobs.items()
                     if other != name and k["started_minute"] <= j["started_minute"] < end[other] - 0.011]
        assert len(alongside) <= 1, (name, alongside)
        most_alongside = max(most_alongside, len(alongside))
    assert most_alongside == 1  # the two tokenizers (at least) trained side by side
    assert "| job | lane | started (min) | minutes |" in (smoke_run / "report.md").read_text()


def test_held_out_answers_and_generated_videos_are_well_formed(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    qa = report["question_answering"]
    assert qa["questions"] == 12 and set(qa["accuracy"]) == {"shape", "color", "direction"}
    lines = (smoke_run / "qa_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 12 and all({"question", "answer", "pred"} <= set(json.loads(line)) for line in lines)
    t2v = report["text_to_video"]
    assert t2v["videos"] == 2 and t2v["frames_per_video_ok"]
    for index in range(2):
        frames = decode_all_frames(smoke_run / "t2v" / f"clip_{index:04d}.mp4")
        assert frames.shape[0] == 24 and frames.dtype.name == "uint8"
    # The LLM's own codes, recorded beside the videos: one direction per prompt, keyframes within the cap.
    assert len(t2v["motion_codes_directions"]) == 2
    assert set(t2v["motion_codes_directions"]) <= {"left", "right", "up", "down", None}
    assert t2v["motion_codes_agreement"] == sum(
        m == e for m, e in zip(t2v["motion_codes_directions"], t2v["expected"])) / 2
    assert 1 <= t2v["keyframe_codes_mean"] <= 64
    markdown = (smoke_run / "report.md").read_text()
    assert "The LLM's motion codes alone" in markdown
    # Generated clips are scored on their frames with the same measures as the real clips of the same captions.
    assert set(t2v["checks"]) == {"direction", "color", "shape"}
    for name, check in t2v["checks"].items():
        assert check["passed"] is None and 0.0 <= check["value"] <= 1.0 and check["real_clips"] == 1.0, name
        assert f"| {name} | {check['value']:.3f} |" in markdown


def test_the_report_shows_pictures_of_the_clips_and_the_training_curves(smoke_run):
    from PIL import Image

    report = json.loads((smoke_run / "report.json").read_text())
    markdown = (smoke_run / "report.md").read_text()
    for name in (report["text_to_video"]["picture"], report["curves"]):
        assert f"]({name})" in markdown  # relative to report.md
        with Image.open(smoke_run / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 100
    with Image.open(smoke_run / report["text_to_video"]["picture"]) as image:  # one row per held-out prompt
        assert image.height > 2 * 32


def test_pass_rules():
    assert passes("<= 0.30", 0.2, None) and not passes("<= 0.30", 0.4, None)
    assert passes("< 0.5 * baseline", 3.0, 7.0) and not passes("< 0.5 * baseline", 4.0, 7.0)
    assert not passes("< 0.5 * baseline", 3.0, None) and not passes(">= 0.5", None, None)
    assert passes("< baseline", 3.0, 7.0) and not passes("> baseline", 3.0, 7.0)


class Recorder:
    """Fake jobs that sleep, recording when each ran and how many ran at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans: dict[str, tuple[float, float]] = {}
        self.order: list[str] = []
        self.running = self.most_running = 0

    def job(self, name: str, needs: tuple[str, ...] = (), seconds: float = 0.05, error: BaseException | None = None):
        def action():
            with self.lock:
                self.order.append(name)
                self.running += 1
                self.most_running = max(self.most_running, self.running)
            start = time.monotonic()
            time.sleep(seconds)
            with self.lock:
                self.running -= 1
                self.spans[name] = (start, time.monotonic())
            if error is not None:
                raise error
            return f"result of {name}"

        return Job(name, action, needs)


def _diamond(rec: Recorder) -> list[Job]:
    return [rec.job("a"), rec.job("b", ("a",)), rec.job("c", ("a",)), rec.job("d", ("b",)), rec.job("e", ("c",)),
            rec.job("f", ("d", "e")), rec.job("g", seconds=0.2)]


@pytest.mark.parametrize("lanes", [2, 3])
def test_jobs_start_after_what_they_need_with_at_most_lanes_at_once(lanes):
    rec = Recorder()
    jobs = _diamond(rec)
    outcomes = run_jobs(jobs, lanes)
    assert set(outcomes) == {j.name for j in jobs} and all(o.result == f"result of {o.name}" for o in outcomes.values())
    for job in jobs:
        for need in job.needs:
            assert rec.spans[job.name][0] >= rec.spans[need][1], (job.name, need)
    assert rec.most_running == lanes  # parallel, but never more than the lanes
    assert all(1 <= o.lane <= lanes for o in outcomes.values())


def test_one_lane_runs_the_jobs_in_listed_order():
    rec = Recorder()
    jobs = _diamond(rec)
    run_jobs(jobs, 1)
    assert rec.order == [j.name for j in jobs] and rec.most_running == 1
    # So `demo --jobs 1` runs the chain in the order it is listed: data, the stages, then the evaluations.
    order: list[str] = []
    run_jobs([Job(name, lambda name=name: order.append(name), needs) for name, needs in NEEDS.items()], 1)
    assert order == list(NEEDS) and [n for n in order if n in {s.name for s in STAGES}] == [s.name for s in STAGES]


@pytest.mark.parametrize("error", [RuntimeError("exit 1"), SystemExit("exit 1")])
def test_a_failure_starts_nothing_new_waits_for_running_jobs_and_names_the_job(error):
    rec = Recorder()
    ended: list[str] = []
    jobs = [rec.job("slow", seconds=0.3), rec.job("bad", error=error), rec.job("after_bad", ("bad",)),
            rec.job("later"), rec.job("after_slow", ("slow",))]
    with pytest.raises(JobFailed) as failed:
        run_jobs(jobs, 2, on_end=lambda o: ended.append(o.name))
    assert failed.value.name == "bad" and "bad" in str(failed.value) and failed.value.error is error
    assert rec.order == ["slow", "bad"]  # a lane was free for "later", but nothing starts after a failure
    assert set(ended) == {"slow", "bad"} and failed.value.outcomes["slow"].result == "result of slow"


def test_bad_graphs_are_named():
    def noop():
        return None

    with pytest.raises(GraphError, match="'b' needs unknown jobs \\['z'\\]"):
        check_graph([Job("a", noop), Job("b", noop, ("z",))])
    with pytest.raises(GraphError, match="cycle among \\['b', 'c'\\]"):
        check_graph([Job("a", noop), Job("b", noop, ("a", "c")), Job("c", noop, ("b",))])
    with pytest.raises(GraphError, match="duplicate"):
        check_graph([Job("a", noop), Job("a", noop)])
    with pytest.raises(ValueError, match="lanes"):
        run_jobs([Job("a", noop)], 0)


def test_from_stage_reruns_that_job_and_everything_downstream(tmp_path):
    graph = [Job(name, lambda: None, needs) for name, needs in NEEDS.items()]
    with pytest.raises(SystemExit, match="do not exist.*keyframe_tokenizer.safetensors"):
        _select(graph, "keyframe_detokenizer", tmp_path)
    for stage in STAGES:
        (tmp_path / EXPORTS / stage.export).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / EXPORTS / stage.export).touch()
    with pytest.raises(SystemExit, match="tokens_train/manifest.json"):  # the token shards pretrain reads
        _select(graph, "pretrain", tmp_path)
    for out in TOKENS.values():
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "manifest.json").touch()
    assert _select(graph, "keyframe_detokenizer", tmp_path) == {"data", "keyframe_detokenizer", "text_to_video"}
    assert _select(graph, "pretrain", tmp_path) == {"data", "pretrain", "instruct", "question_answering",
                                                    "text_to_video"}
    assert _select(graph, "evaluation", tmp_path) == {"data", "question_answering", "text_to_video"}
    assert _select(graph, "motion_tokenizer", tmp_path) >= {"tokenize", "pretrain", "instruct"}
    assert _select(graph, None, tmp_path) == set(NEEDS)
    with pytest.raises(SystemExit, match="unknown --from-stage 'nope'"):
        _select(graph, "nope", tmp_path)


def test_device_and_precision_reach_every_stage_and_the_evaluation_commands(tmp_path, monkeypatch):
    from videolavit.commands import demo

    calls = []

    class Recording(demo.Runner):
        def __call__(self, name, *args):
            calls.append((name, args))
            stage = next((s for s in STAGES if s.name == name), None)
            if stage is not None:  # what the fit would leave behind
                (self.workdir / EXPORTS / stage.export).parent.mkdir(parents=True, exist_ok=True)
                (self.workdir / EXPORTS / stage.export).touch()
            return 0.0

    runner = Recording(tmp_path, "cuda", "bf16-mixed")
    demo._run_stage(runner, STAGES[0], smoke=True)
    fit = dict(calls)[STAGES[0].name]
    assert fit[:2] == ("fit", "--config")
    assert fit[-6:] == ("--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed")
    assert Recording(tmp_path).trainer_overrides == []  # CPU, the configs' precision

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(SystemExit, match="--device cuda, but torch sees no CUDA device"):
        demo.run(parser.parse_args(["--workdir", str(tmp_path), "--device", "cuda"]))
