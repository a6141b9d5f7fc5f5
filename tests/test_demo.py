"""The embedded default end to end (CI smoke): every stage's tiny config through `fit --config`, each export
loading into the next stage, then held-out QA and text-to-video from the final exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from videolavit.commands.demo import STAGES, _passes
from videolavit.video.frames import decode_all_frames

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, "-m", "videolavit", "demo", "--smoke", "--workdir", str(workdir),
                           "--workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=900)
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
    assert (smoke_run / "exports" / "instruct" / "config.json").is_file()
    assert "smoke: not checked" in (smoke_run / "report.md").read_text()


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


def test_pass_rules():
    assert _passes("<= 0.30", 0.2, None) and not _passes("<= 0.30", 0.4, None)
    assert _passes("< 0.5 * baseline", 3.0, 7.0) and not _passes("< 0.5 * baseline", 4.0, 7.0)
    assert not _passes("< 0.5 * baseline", 3.0, None) and not _passes(">= 0.5", None, None)
