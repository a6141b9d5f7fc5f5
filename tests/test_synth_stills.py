"""Stills of the moving-shapes corpus: the images, captions and questions the LLM stages' image sources read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.instruct_views import read_conversations
from videolavit.synth.moving_shapes import DIRECTIONS, DIRECTION_PHRASES, generate_corpus, load_corpus, render_frame
from videolavit.synth.stills import IMAGE_QA_FILE, IMAGE_TEXT_FILE, still_frames, write_stills

SIZE, FPS, SECONDS, NUM_VIDEOS, SEED, PER_VIDEO = (64, 64), 12, 3.0, 5, 4, 3


def _generate(out_dir: Path, stills: int = PER_VIDEO, **kwargs):
    return generate_corpus(out_dir, NUM_VIDEOS, SEED, size=SIZE, fps=FPS, seconds=SECONDS, stills_per_video=stills,
                           **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stills")
    _generate(out)
    return out


def test_every_still_is_its_video_frame_with_a_caption_of_what_it_shows(corpus):
    specs = {s.videoid: s for s in load_corpus(corpus)}
    pairs = [json.loads(line) for line in (corpus / IMAGE_TEXT_FILE).read_text().splitlines()]
    assert len(pairs) == NUM_VIDEOS * PER_VIDEO
    direction_words = {*DIRECTIONS, *" ".join(DIRECTION_PHRASES.values()).split(), "moving", "upwards", "downwards"}
    for pair in pairs:
        videoid, frame = Path(pair["image"]).stem.rsplit("_", 1)
        spec = specs[videoid]
        pixels = np.asarray(Image.open(corpus / pair["image"]).convert("RGB"))
        np.testing.assert_array_equal(pixels, render_frame(spec, int(frame)))  # lossless, no H.264 round trip
        words = pair["caption"].replace("-", " ").split()
        assert spec.color in words and spec.shape in words and spec.background in words, pair
        assert not direction_words & set(words), f"a still cannot show its direction: {pair['caption']!r}"


def test_stills_span_the_video_evenly():
    spec = plan_one()
    assert still_frames(spec, 4) == [0, 12, 23, 35]
    assert still_frames(spec, 1) == [0]
    assert still_frames(spec, 1000) == list(range(spec.num_frames))  # never a frame twice
    with pytest.raises(ValueError, match="stills per video must be >= 1"):
        still_frames(spec, 0)


def plan_one():
    from videolavit.synth.moving_shapes import plan_corpus

    return plan_corpus(1, SEED, SIZE, FPS, SECONDS)[0]


def test_image_questions_are_llava_conversations_with_the_right_answers(corpus):
    specs = {s.videoid: s for s in load_corpus(corpus)}
    items = json.loads((corpus / IMAGE_QA_FILE).read_text())
    assert len(items) == 2 * NUM_VIDEOS * PER_VIDEO
    for item in items:
        spec = specs[Path(item["image"]).stem.rsplit("_", 1)[0]]
        question, answer = item["conversations"]
        assert question["value"].startswith("<image>\n") and "video" not in question["value"]
        assert answer["value"] == {"shape": spec.shape, "color": spec.color}[item["attribute"]]
    samples = read_conversations(corpus / IMAGE_QA_FILE)  # what InstructionSequenceView reads
    assert {s.media_kind for s in samples} == {"image"}
    assert all((corpus / s.media).is_file() for s in samples)


def test_stills_are_deterministic_and_recorded_in_the_manifest(corpus, tmp_path):
    _generate(tmp_path)
    for name in (IMAGE_TEXT_FILE, IMAGE_QA_FILE):
        assert (tmp_path / name).read_bytes() == (corpus / name).read_bytes()
    assert json.loads((tmp_path / "corpus.json").read_text())["stills_per_video"] == PER_VIDEO
    first = sorted((corpus / "images").iterdir())[0].name
    assert (tmp_path / "images" / first).read_bytes() == (corpus / "images" / first).read_bytes()


def test_a_corpus_without_stills_keeps_its_manifest_and_gains_them_on_overwrite(tmp_path):
    _generate(tmp_path, stills=0)
    assert "stills_per_video" not in json.loads((tmp_path / "corpus.json").read_text())
    assert not (tmp_path / IMAGE_TEXT_FILE).exists()
    _generate(tmp_path, stills=2, overwrite=True)
    assert len((tmp_path / IMAGE_TEXT_FILE).read_text().splitlines()) == 2 * NUM_VIDEOS
    _generate(tmp_path, stills=0, overwrite=True)  # overwriting removes the stills with the rest
    assert not (tmp_path / "images").exists() and not (tmp_path / IMAGE_QA_FILE).exists()


def test_write_stills_keeps_finished_images(corpus, tmp_path):
    specs = load_corpus(corpus)[:1]
    write_stills(tmp_path, specs, 2)
    image = sorted((tmp_path / "images").iterdir())[0]
    image.write_bytes(b"kept")  # a finished file is not rendered again
    assert write_stills(tmp_path, specs, 2) == 2
    assert image.read_bytes() == b"kept"


def test_cli_writes_stills_and_rejects_a_negative_count(tmp_path):
    cmd = [sys.executable, "-m", "videolavit", "synth", "--out", str(tmp_path / "c"), "--num-videos", "2", "--seed",
           "0", "--size", "64x64", "--seconds", "2", "--stills-per-video", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 stills per video" in done.stdout
    assert len((tmp_path / "c" / IMAGE_TEXT_FILE).read_text().splitlines()) == 4
    bad = subprocess.run([*cmd[:-1], "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--stills-per-video must be >= 0" in bad.stderr
