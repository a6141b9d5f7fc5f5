"""``generate`` (text-to-video, image-to-video, long video) and ``evaluate`` run from an imported release directory
(a fabricated release-layout directory, ``tests.release_fixtures``), with the release behaviour its import records."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from tests.release_fixtures import exports, release  # noqa: F401  (module fixtures: a fabricated release, imported)
from tests.test_evaluation_protocols import weights  # noqa: F401  (module fixture: random metric networks)
from videolavit.__main__ import main

FAST = ["--video-steps", "2", "--keyframe-steps", "2"]


def frames_of(path):
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def run(argv) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(argv)


def test_text_to_video_from_the_imports_writes_a_clip(exports, tmp_path):
    out = tmp_path / "clip.mp4"
    assert run(["generate", "--exports", str(exports), "--prompt", "a red circle moves left", "--out", str(out),
                *FAST]) == 0
    frames = frames_of(out)
    assert len(frames) == 24 and frames[0].shape == (32, 32, 3)


def test_image_to_video_from_the_imports_writes_a_clip(exports, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "start.png"
    Image.fromarray(np.full((48, 64, 3), (200, 30, 30), dtype=np.uint8)).save(image)
    out = tmp_path / "clip.mp4"
    assert run(["generate", "--exports", str(exports), "--prompt", "it moves left", "--image", str(image),
                "--out", str(out), *FAST]) == 0, capsys.readouterr().err
    assert len(frames_of(out)) == 24


@pytest.mark.slow
def test_a_long_video_from_the_imports_chains_clips(exports, tmp_path):
    out = tmp_path / "long.mp4"
    assert run(["generate", "--exports", str(exports), "--prompt", "a blue square moves up", "--clips", "2",
                "--out", str(out), *FAST]) == 0
    assert len(frames_of(out)) == 48


@pytest.mark.slow
def test_evaluate_scores_the_imported_pipeline(exports, weights, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\na red circle moves left\na blue square moves up\n")
    report = tmp_path / "report.json"
    assert run(["evaluate", "--protocol", "csv", "--root", str(prompts), "--out", str(report), "--pipeline",
                str(exports), "--clip", str(weights["clip"]), "--device", "cpu", "--no-progress", "--batch-size", "2",
                "--pipeline-option", "video_steps=2", "--pipeline-option", "keyframe_steps=2"]) == 0
    result = json.loads(report.read_text())
    assert result["num_items"] == 2 and -1.0 <= result["metrics"]["clipsim"] <= 1.0
