"""Video decomposition: motion recovers known movement, GOP structure, release clip rule, grids."""

import numpy as np
import pytest

from tests.video_factory import real_clip, write_moving_square, write_video, moving_square_frames
from videolavit.video import errors
from videolavit.video.clips import PAPER_GRID, RELEASE_GRID, clip_motion, select_clip_starts
from videolavit.video.decompose import DecomposeConfig, decompose_video
from videolavit.video.frames import decode_clip, decode_keyframes
from videolavit.video.motion_grid import MOTION_STD, TOKENIZER_SCALE, aggregate_motion_vectors

WIDTH, HEIGHT = 128, 96


def _moving_blocks_mean(motion: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """Mean standardised displacement (x, y) over P-frame blocks that moved."""
    m = motion.astype(np.float32)
    moving = np.abs(m).sum(1) > threshold  # [T, rows, cols]
    return np.array([m[:, c][moving].mean() for c in range(2)])


@pytest.mark.parametrize("direction,velocity", [("right", (12, 0)), ("left", (-12, 0)), ("down", (0, 12)),
                                                ("up", (0, -12)), ("fast-right", (24, 0))])
def test_motion_recovers_direction_and_speed(tmp_path, direction, velocity):
    path = write_moving_square(tmp_path / "v.mp4", WIDTH, HEIGHT, seconds=6.0, fps=24, velocity_px_s=velocity)
    video = decompose_video(path)
    mean = _moving_blocks_mean(video.motion)
    # Expected standardised displacement per 6 fps frame: px/s / 6 / size / std.
    expected = np.array([velocity[0] / 6 / WIDTH / MOTION_STD[0], velocity[1] / 6 / HEIGHT / MOTION_STD[1]])
    axis = 0 if velocity[0] else 1
    assert np.sign(mean[axis]) == np.sign(expected[axis])
    assert mean[axis] == pytest.approx(expected[axis], rel=0.25)
    assert abs(mean[1 - axis]) < 0.25 * abs(expected[axis])


def test_gop_structure_and_sizes(tmp_path):
    path = write_moving_square(tmp_path / "v.mp4", WIDTH, HEIGHT, seconds=11.0, fps=30)
    video = decompose_video(path)
    assert video.num_frames == 66  # 11 s at 6 fps
    assert video.iframes == list(range(0, 66, 12))
    assert set(video.frame_types[np.setdiff1d(np.arange(66), video.iframes)]) == {2}  # P only, no B
    assert video.motion.shape == (66, 2, HEIGHT // 16, WIDTH // 16) and video.motion.dtype == np.float16
    assert not video.motion[video.iframes].any()  # I-frames carry no vectors
    assert video.metadata()["clip_starts"] == video.clip_starts == [12, 36]


@pytest.mark.parametrize("iframes,num_frames,max_clips,expected", [
    ([0], 24, 8, []),  # no next I-frame 12 later: no regular GOP
    ([0, 12], 24, 8, [0]),  # exactly one clip
    ([0, 12, 24], 36, 8, [0]),  # clip at 12 would run past the end
    ([0, 12, 24, 36, 48, 60], 66, 8, [12, 36]),  # >2 candidates: skip the first, every second
    ([0, 12, 30, 42, 54], 66, 8, [30]),  # irregular GOP at 12→30 removes 12 as a start
    (list(range(0, 600, 12)), 600, 8, [12, 84, 156, 228, 324, 396, 468, 564]),  # uniform subsample of 24
])
def test_release_clip_rule(iframes, num_frames, max_clips, expected):
    assert select_clip_starts(iframes, num_frames, 24, max_clips) == expected


def test_clip_motion_grids_and_interpolated_iframe():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(48, 2, 6, 8)).astype(np.float16)
    grid[[0, 12, 24, 36]] = 0
    release = clip_motion(grid, 12, RELEASE_GRID)
    paper = clip_motion(grid, 12, PAPER_GRID, scale=1.0)
    assert release.shape == (2, 24, 20, 36) and paper.shape == (2, 24, 16, 16)
    native = clip_motion(grid, 12, (6, 8), scale=1.0)  # no resize: exact values
    expected_mid = 0.5 * (grid[23].astype(np.float32) + grid[25].astype(np.float32))
    np.testing.assert_allclose(native[:, 12].numpy(), expected_mid, atol=1e-3)
    np.testing.assert_allclose(native[:, 0].numpy(), 0.0)  # the clip's own I-frame stays zero
    np.testing.assert_allclose(clip_motion(grid, 12, (6, 8)).numpy(), TOKENIZER_SCALE * native.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="needs 24 frames"):
        clip_motion(grid, 36, RELEASE_GRID)


def test_aggregation_is_per_channel_max_and_normalised():
    dtype = [("source", "i4"), ("w", "u1"), ("h", "u1"), ("src_x", "i2"), ("src_y", "i2"), ("dst_x", "i2"),
             ("dst_y", "i2"), ("flags", "u8"), ("motion_x", "i4"), ("motion_y", "i4"), ("motion_scale", "u2")]
    vectors = np.array([(-1, 8, 8, 0, 0, 4, 4, 0, -4, 2, 2),  # block (0,0): +2 px x, -1 px y
                        (-1, 8, 8, 0, 0, 12, 12, 0, 2, -6, 2),  # block (0,0): -1 px x, +3 px y
                        (-1, 16, 16, 0, 0, 40, 8, 0, 0, 0, 2)], dtype=dtype)  # block (0,2): zero
    grid = aggregate_motion_vectors(vectors, height=32, width=48)
    assert grid.shape == (2, 2, 3)
    assert grid[0, 0, 0] == pytest.approx(2 / 48 / MOTION_STD[0], rel=1e-5)
    assert grid[1, 0, 0] == pytest.approx(3 / 32 / MOTION_STD[1], rel=1e-5)
    assert grid[:, 1].sum() == 0 and grid[:, 0, 2].sum() == 0


def test_frames_are_decoded_only_on_request_and_match(tmp_path):
    path = write_moving_square(tmp_path / "v.mp4", WIDTH, HEIGHT, seconds=9.0, fps=24)
    video = decompose_video(path)
    full = decode_clip(video.mp4, 0, video.num_frames)
    assert full.shape == (54, HEIGHT, WIDTH, 3)
    keys = decode_keyframes(video.mp4, [12, 24])
    np.testing.assert_array_equal(keys, full[[12, 24]])
    np.testing.assert_array_equal(decode_clip(video.mp4, 24, 24), full[24:48])
    assert decode_clip(video.mp4, 0, 24, size=(32, 48)).shape == (24, 32, 48, 3)


def test_odd_sizes_vfr_and_other_codecs_decompose(tmp_path):
    frames = moving_square_frames(150, 98, 240, (0.5, 0.0))
    odd = decompose_video(write_video(tmp_path / "odd.mp4", frames))
    assert (odd.width, odd.height) == (150, 98) and odd.motion.shape[2:] == (7, 10)
    portrait = decompose_video(write_moving_square(tmp_path / "p.mp4", 96, 160, seconds=5.0))
    assert portrait.motion.shape[2:] == (10, 6)
    vp9 = decompose_video(write_moving_square(tmp_path / "v.webm", codec="libvpx-vp9", seconds=5.0))
    assert vp9.source["codec"] == "vp9" and vp9.num_frames == 30
    mpeg4 = decompose_video(write_moving_square(tmp_path / "m.mp4", codec="mpeg4", seconds=5.0))
    assert mpeg4.source["codec"] == "mpeg4" and mpeg4.num_frames == 30
    # Variable frame rate: 30 frames alternating 20 ms / 180 ms gaps = 3 s → 18 frames at 6 fps.
    times = np.cumsum([0] + [20 if k % 2 else 180 for k in range(29)]).tolist()
    vfr = decompose_video(write_video(tmp_path / "vfr.mp4", moving_square_frames(WIDTH, HEIGHT, 30, (1, 0)),
                                      timestamps_ms=times), DecomposeConfig(clip_frames=12, gop=12))
    assert vfr.num_frames == pytest.approx(times[-1] / 1000 * 6, abs=1.5)


def test_large_videos_are_downscaled(tmp_path):
    path = write_moving_square(tmp_path / "big.mp4", 1280, 720, seconds=4.0, fps=6)
    video = decompose_video(path, DecomposeConfig(max_short_side=360))
    assert (video.width, video.height) == (640, 360)
    assert video.source["width"] == 1280


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b""), errors.EMPTY_FILE),
    (lambda p: p.write_bytes(b"\x00not a video" * 500), errors.UNREADABLE),
    (lambda p: write_moving_square(p, seconds=2.0), errors.TOO_SHORT),
    (lambda p: write_moving_square(p, 16, 16, seconds=5.0, square=8), errors.TOO_SMALL),
])
def test_bad_videos_raise_named_skips(tmp_path, make, reason):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(errors.VideoSkip) as info:
        decompose_video(path)
    assert info.value.reason == reason


def test_audio_only_and_truncated(tmp_path):
    from tests.video_factory import write_audio_only

    with pytest.raises(errors.VideoSkip) as info:
        decompose_video(write_audio_only(tmp_path / "a.mp4"))
    assert info.value.reason == errors.NO_VIDEO_STREAM
    good = write_moving_square(tmp_path / "g.mkv", seconds=10.0).read_bytes()
    # A streamable file cut short still yields the clips it holds (no good data is lost) ...
    cut = decompose_video(good[: len(good) * 3 // 4])
    assert 24 <= cut.num_frames < 60 and cut.clip_starts
    # ... and one cut before any full clip is skipped, as is an mp4 whose index (moov) is gone.
    with pytest.raises(errors.VideoSkip) as info:
        decompose_video(good[:3000])
    assert info.value.reason in (errors.TOO_SHORT, errors.DECODE_ERROR, errors.UNREADABLE)
    mp4 = write_moving_square(tmp_path / "g.mp4", seconds=10.0).read_bytes()
    with pytest.raises(errors.VideoSkip) as info:
        decompose_video(mp4[: len(mp4) // 2])
    assert info.value.reason == errors.UNREADABLE


def test_real_h264_clip_statistics():
    path = real_clip("carphone_pristine.mp4")
    video = decompose_video(path)
    assert video.source["codec"] == "h264" and (video.width, video.height) == (176, 144)
    assert video.num_frames == 24 and video.iframes == [0, 12] and video.clip_starts == [0]
    motion = video.motion.astype(np.float32)
    p_frames = np.setdiff1d(np.arange(24), video.iframes)
    moving = (np.abs(motion[p_frames]).sum(1) > 0).mean()
    assert 0.2 < moving < 1.0  # a talking head in a car: much, not all, of the frame moves
    assert 0.01 < np.abs(motion[p_frames]).mean() < 1.0  # magnitudes on the scale of the release std
    assert np.isfinite(motion).all()


def test_synthetic_corpus_motion_matches_ground_truth(synthetic_corpus, prepared_shards):
    """Every corpus video: the prepared motion grid moves the way its metadata says, at its speed."""
    import json

    import webdataset as wds

    from datamodules.sample_format import decode_sample

    truth = {m["videoid"]: m for m in map(json.loads, (synthetic_corpus / "metadata.jsonl").read_text().splitlines())}
    manifest = json.loads((prepared_shards / "manifest.json").read_text())
    checked = 0
    for name in manifest["shards"]:
        for raw in wds.DataPipeline(wds.SimpleShardList([str(prepared_shards / name)]), wds.tarfile_to_samples()):
            sample = decode_sample(raw)
            gt = truth[sample["meta"]["source_id"]]
            size = (sample["meta"]["width"], sample["meta"]["height"])
            expected = np.array([gt["dx_px_per_s"] / 6 / size[0] / MOTION_STD[0],
                                 gt["dy_px_per_s"] / 6 / size[1] / MOTION_STD[1]])
            axis = int(np.argmax(np.abs(expected)))
            assert np.sign(_moving_blocks_mean(sample["motion"])[axis]) == np.sign(expected[axis]), gt
            # Speed from the block the shape covers fully: the release's per-channel max pulls blocks it
            # only partly covers towards zero for leftward/upward motion (max of -v and 0 is 0).
            field = sample["motion"][:, axis].astype(np.float32).reshape(len(sample["motion"]), -1)
            peak = np.take_along_axis(field, np.abs(field).argmax(1)[:, None], 1)[:, 0]
            peak = peak[np.abs(peak) > 0.02]
            assert np.median(peak) == pytest.approx(expected[axis], rel=0.3), gt
            checked += 1
    assert checked == len(truth) == 8
