"""The moving-shapes corpus: files, determinism, real H.264 video, and motion that matches the ground truth."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from videolavit.synth.moving_shapes import (
    COLORS,
    DIRECTIONS,
    MAX_SPEED_PX_PER_S,
    MIN_SPEED_PX_PER_S,
    SHAPES,
    CorpusExistsError,
    generate_corpus,
    load_corpus,
    plan_corpus,
    qa_pairs,
    render_frame,
    shape_coverage,
)

SIZE = (64, 64)
FPS = 12
SECONDS = 3.0
NUM_VIDEOS = 6
SEED = 7
COLOR_TOLERANCE = 65.0  # RGB distance: decoded shape interiors stay within ~50, backgrounds beyond ~80


def _generate(out_dir: Path, seed: int = SEED, num_videos: int = NUM_VIDEOS, **kwargs):
    return generate_corpus(out_dir, num_videos, seed, size=SIZE, fps=FPS, seconds=SECONDS, **kwargs)


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    _generate(out)
    return out


@pytest.fixture(scope="module")
def corpus_again(tmp_path_factory) -> Path:
    """Same arguments, rendered in two worker processes: must equal the single-process corpus."""
    out = tmp_path_factory.mktemp("corpus_again")
    _generate(out, workers=2)
    return out


def test_files_exist_and_parse(corpus):
    specs = load_corpus(corpus)
    ids = [s.videoid for s in specs]
    assert ids == [f"s{SEED}_{i:06d}" for i in range(NUM_VIDEOS)]
    assert sorted(p.name for p in (corpus / "videos").iterdir()) == [f"{i}.mp4" for i in ids]

    with open(corpus / "captions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["videoid", "name", "duration", "page_dir"]
    assert [r[0] for r in rows[1:]] == ids
    for row, spec in zip(rows[1:], specs):
        assert row[1] == spec.caption and spec.color in row[1] and spec.shape in row[1]
        assert row[2] == "PT00H00M03S"
        assert (corpus / row[3] / f"{row[0]}.mp4").is_file()

    record = json.loads((corpus / "metadata.jsonl").read_text().splitlines()[0])
    for key in ("videoid", "shape", "color", "color_rgb", "direction", "speed_px_per_s", "dx_px_per_s",
                "dy_px_per_s", "width", "height", "fps", "num_frames", "start_x", "start_y"):  # fmt: skip
        assert key in record, key


def test_qa_answers_agree_with_metadata(corpus):
    specs = {s.videoid: s for s in load_corpus(corpus)}
    qa = json.loads((corpus / "qa.json").read_text())
    assert len(qa) == 3 * len(specs)
    for pair in qa:
        assert set(pair) == {"video_id", "question", "answer", "attribute"}
        spec = specs[pair["video_id"]]
        assert pair["answer"] == getattr(spec, pair["attribute"])
        assert pair["answer"].isalpha() and pair["question"].endswith("?")
    for video_id in specs:
        assert sorted(p["attribute"] for p in qa if p["video_id"] == video_id) == ["color", "direction", "shape"]
    # Several phrasings are in use across a larger corpus.
    questions = {q["question"] for s in plan_corpus(30, SEED, SIZE, FPS, SECONDS) for q in qa_pairs(s)}
    assert len(questions) > 3


def test_same_seed_gives_identical_corpus(corpus, corpus_again):
    for name in ("captions.csv", "qa.json", "metadata.jsonl", "corpus.json"):
        assert (corpus / name).read_bytes() == (corpus_again / name).read_bytes(), name
    for path in sorted((corpus / "videos").iterdir()):
        np.testing.assert_array_equal(_decode(path), _decode(corpus_again / "videos" / path.name))


def test_different_seed_gives_different_corpus(corpus, tmp_path):
    specs = _generate(tmp_path, seed=SEED + 1, num_videos=2)
    assert not {s.videoid for s in specs} & {s.videoid for s in load_corpus(corpus)}
    assert (tmp_path / "metadata.jsonl").read_text() != (corpus / "metadata.jsonl").read_text()
    first = _decode(tmp_path / "videos" / f"{specs[0].videoid}.mp4")
    other = _decode(corpus / "videos" / f"s{SEED}_000000.mp4")
    assert first.shape == other.shape and not np.array_equal(first, other)


def test_videos_are_h264_with_expected_geometry(corpus):
    for spec in load_corpus(corpus):
        with av.open(str(corpus / "videos" / f"{spec.videoid}.mp4")) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.codec_context.pix_fmt == "yuv420p"
            assert (stream.width, stream.height) == SIZE
            assert stream.average_rate == FPS
            frames = sum(1 for _ in container.decode(video=0))
        assert frames == spec.num_frames == round(FPS * SECONDS)


def test_shape_moves_in_known_direction_at_known_speed(corpus):
    for spec in load_corpus(corpus):
        frames = _decode(corpus / "videos" / f"{spec.videoid}.mp4").astype(np.float64)
        mask = np.linalg.norm(frames - np.asarray(spec.color_rgb), axis=-1) < COLOR_TOLERANCE
        # Inside the frame throughout: no shape-coloured pixel on the outermost pixel ring.
        assert not (mask[:, 0].any() or mask[:, -1].any() or mask[:, :, 0].any() or mask[:, :, -1].any())
        ys, xs = np.mgrid[0 : spec.height, 0 : spec.width]
        area = mask.sum(axis=(1, 2))
        coverage = shape_coverage(spec.shape, spec.shape_radius_px, spec.center_at(0), spec.height, spec.width)
        expected_area = coverage.sum()
        assert np.all(area > 0.6 * expected_area) and np.all(area < 1.2 * expected_area), spec.videoid
        cx = (mask * xs).sum(axis=(1, 2)) / area
        cy = (mask * ys).sum(axis=(1, 2)) / area
        t = np.arange(len(frames)) / spec.fps
        vx, vy = np.polyfit(t, cx, 1)[0], np.polyfit(t, cy, 1)[0]
        assert vx == pytest.approx(spec.dx_px_per_s, abs=0.6), spec.videoid
        assert vy == pytest.approx(spec.dy_px_per_s, abs=0.6), spec.videoid
        ux, uy = DIRECTIONS[spec.direction]
        assert vx * ux + vy * uy > MIN_SPEED_PX_PER_S - 0.6  # moving the named way, fast enough to measure
        truth = np.array([spec.center_at(i) for i in range(len(frames))])
        assert np.abs(np.stack([cx, cy], axis=1) - truth).max() < 1.0, spec.videoid


def test_frames_change_the_background_only_where_the_shape_covers_it():
    """Frames are composited around the shape only; every pixel the full-frame coverage leaves at 0 must be the
    background's, and every covered pixel must get the shape (shapes touching the border included)."""
    specs = plan_corpus(12, seed=7, size=(96, 64), seconds=4.0)
    for spec in specs:
        for index in (0, spec.num_frames // 2, spec.num_frames - 1):
            black = np.zeros((spec.height, spec.width, 3))  # so any shape pixel shows
            frame = render_frame(spec, index, black).astype(np.int64)
            coverage = shape_coverage(spec.shape, spec.shape_radius_px, spec.center_at(index), spec.height, spec.width)
            assert not frame[coverage == 0].any(), spec.videoid
            assert (frame[coverage == 1].sum(axis=-1) > 0).all(), spec.videoid


def test_background_is_static(corpus):
    for spec in load_corpus(corpus):
        frames = _decode(corpus / "videos" / f"{spec.videoid}.mp4").astype(np.float64)
        last = spec.num_frames - 1
        near_shape = sum(
            shape_coverage(spec.shape, spec.shape_radius_px + 3, spec.center_at(i), spec.height, spec.width)
            for i in range(0, spec.num_frames)
        )
        background = near_shape == 0
        assert background.mean() > 0.3
        assert np.abs(frames[0] - frames[last])[background].mean() < 2.0, spec.videoid
        assert frames[0].mean(axis=-1)[background].std() > 1.5  # textured, not flat: motion search can match it


def test_named_color_is_the_only_palette_color_present(corpus):
    for spec in load_corpus(corpus):
        frame = _decode(corpus / "videos" / f"{spec.videoid}.mp4")[0].astype(np.float64)
        counts = {name: int((np.linalg.norm(frame - np.asarray(rgb), axis=-1) < COLOR_TOLERANCE).sum())
                  for name, rgb in COLORS.items()}  # fmt: skip
        others = max(n for name, n in counts.items() if name != spec.color)
        assert counts[spec.color] > 20 and others < 0.05 * counts[spec.color], (spec.videoid, counts)


def test_attributes_are_balanced_and_cover_every_value():
    specs = plan_corpus(43, SEED, SIZE, FPS, SECONDS)
    for attribute, values in (("shape", SHAPES), ("color", COLORS), ("direction", DIRECTIONS)):
        counts = Counter(getattr(s, attribute) for s in specs)
        assert set(counts) == set(values), attribute
        assert max(counts.values()) - min(counts.values()) <= 1, (attribute, counts)
        held_out = plan_corpus(len(COLORS), SEED + 100, SIZE, FPS, SECONDS)
        assert {getattr(s, attribute) for s in held_out} == set(values)
    assert len({(s.shape, s.color, s.direction) for s in specs}) > 20  # attributes are not locked together
    verbs = {verb for s in specs for verb in ("moving", "slides", "travelling", "drifts") if verb in s.caption.split()}
    assert len(verbs) == 4  # every caption template is in use


@pytest.mark.parametrize(
    "size,seconds", [((64, 64), 3.0), ((128, 128), 10.0), ((96, 64), 4.0), ((64, 64), 8.0), ((320, 176), 10.0)]
)
def test_planned_paths_stay_inside_the_frame(size, seconds):
    for spec in plan_corpus(60, 3, size, 12, seconds):
        assert MIN_SPEED_PX_PER_S <= spec.speed_px_per_s <= MAX_SPEED_PX_PER_S
        assert abs(spec.dx_px_per_s) + abs(spec.dy_px_per_s) == spec.speed_px_per_s
        for frame_index in (0, spec.num_frames - 1):
            x, y = spec.center_at(frame_index)
            extent = spec.shape_radius_px + 0.5  # anti-aliased edge
            assert extent <= x <= spec.width - extent and extent <= y <= spec.height - extent


def test_frame_too_small_for_the_motion_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        plan_corpus(1, 0, (64, 64), 12, 30.0)
    with pytest.raises(ValueError, match="even"):
        plan_corpus(1, 0, (63, 64), 12, 3.0)


def test_refuses_to_overwrite_a_different_corpus(tmp_path):
    out = tmp_path / "c"
    generate_corpus(out, 1, 1, size=SIZE, fps=FPS, seconds=1.0)
    generate_corpus(out, 1, 1, size=SIZE, fps=FPS, seconds=1.0)  # same corpus again: fine
    (out / "videos" / "s1_000000.mp4").unlink()
    generate_corpus(out, 1, 1, size=SIZE, fps=FPS, seconds=1.0)  # resumes: the missing video comes back
    assert (out / "videos" / "s1_000000.mp4").is_file()
    with pytest.raises(CorpusExistsError, match="--overwrite"):
        generate_corpus(out, 1, 2, size=SIZE, fps=FPS, seconds=1.0)
    generate_corpus(out, 1, 2, size=SIZE, fps=FPS, seconds=1.0, overwrite=True)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["s2_000000.mp4"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusExistsError, match="no moving-shapes corpus"):
        generate_corpus(foreign, 1, 1, size=SIZE, fps=FPS, seconds=1.0, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def _cli(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run the subcommand on a one-video, one-second 64x64 corpus; later options override earlier ones."""
    args = ["--out", str(out), "--num-videos", "1", "--seed", "0", "--size", "64x64", "--seconds", "1", *overrides]
    return subprocess.run(
        [sys.executable, "-m", "videolavit", "synth", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_writes_a_corpus(tmp_path):
    out = tmp_path / "cli"
    result = _cli(out, "--num-videos", "2", "--seed", "4")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["s4_000000.mp4", "s4_000001.mp4"]
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 2
    assert _cli(out, "--num-videos", "2", "--seed", "4").returncode == 0  # same corpus again: fine
    other = _cli(out, "--seed", "5")
    assert other.returncode == 2 and "--overwrite" in other.stderr


def test_cli_errors_clearly_on_unwritable_output(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _cli(blocker / "corpus")
    assert result.returncode == 2
    assert "not writable" in result.stderr and "Traceback" not in result.stderr


def test_cli_errors_clearly_on_impossible_geometry(tmp_path):
    result = _cli(tmp_path / "c", "--seconds", "30")
    assert result.returncode == 2
    assert "too small" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_cli_errors_on_read_only_directory(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = _cli(out)
    finally:
        out.chmod(0o755)
    assert result.returncode == 2 and "not writable" in result.stderr
