"""prepare: bad inputs are named and counted, good videos all arrive, shards round-trip, resume, parts."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from datamodules.prepare import PrepareConfig, run_prepare
from datamodules.prepare_inputs import InputError
from datamodules.sample_format import decode_sample
from tests.video_factory import moving_square_frames, write_audio_only, write_moving_square, write_video
from videolavit.video import errors
from videolavit.video.decompose import decompose_video

REPO = Path(__file__).resolve().parents[1]


def _read_shards(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for name in manifest["shards"]:
        for raw in wds.DataPipeline(wds.SimpleShardList([str(out / name)]), wds.tarfile_to_samples()):
            samples[raw["__key__"]] = decode_sample(raw)
    return samples


@pytest.fixture(scope="module")
def messy_inputs(tmp_path_factory, synthetic_corpus) -> tuple[Path, Path, set[str]]:
    """Good synthetic videos plus every kind of bad or odd input; returns (dir, captions, good ids)."""
    root = tmp_path_factory.mktemp("messy")
    videos = root / "videos"
    shutil.copytree(synthetic_corpus / "videos", videos)
    good = {p.stem for p in videos.glob("*.mp4")}
    odd = videos / "odd"
    odd.mkdir()
    write_video(odd / "odd_size.mp4", moving_square_frames(150, 98, 120, (0.5, 0)), fps=12)
    write_moving_square(odd / "portrait.mp4", 96, 160, seconds=5.0)
    write_moving_square(odd / "vp9.webm", codec="libvpx-vp9", seconds=5.0)
    write_moving_square(odd / "mpeg4.avi", codec="mpeg4", seconds=5.0)
    times = np.cumsum([0] + [30 if k % 2 else 170 for k in range(59)]).tolist()  # variable frame rate, 5.9 s
    write_video(odd / "vfr.mp4", moving_square_frames(128, 96, 60, (1, 0)), timestamps_ms=times)
    good |= {"odd/odd_size", "odd/portrait", "odd/vp9", "odd/mpeg4", "odd/vfr"}
    bad = root / "videos" / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "corrupt.mp4").write_bytes(b"\x00\x01garbage" * 300)
    write_audio_only(bad / "audio_only.mp4")
    write_moving_square(bad / "short.mp4", seconds=2.0)
    write_moving_square(bad / "tiny.mp4", 16, 16, seconds=5.0, square=6)
    write_moving_square(bad / "no_caption.mp4", seconds=5.0)
    captions = root / "captions.csv"
    with open(synthetic_corpus / "captions.csv") as src, open(captions, "w", newline="") as dst:
        rows = list(csv.DictReader(src))
        writer = csv.DictWriter(dst, fieldnames=["videoid", "name"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"videoid": row["videoid"], "name": row["name"]})
        for vid in ["odd/odd_size", "odd/portrait", "odd/vp9", "odd/mpeg4", "odd/vfr", "bad/empty", "bad/corrupt",
                    "bad/audio_only", "bad/short", "bad/tiny"]:
            writer.writerow({"videoid": vid, "name": f"caption of {vid}"})
    return videos, captions, good


@pytest.fixture(scope="module")
def messy_prepared(messy_inputs, tmp_path_factory) -> Path:
    videos, captions, _ = messy_inputs
    out = tmp_path_factory.mktemp("messy_out")
    run_prepare(PrepareConfig(videos=str(videos), out=str(out), captions=str(captions), workers=2,
                              videos_per_unit=8, progress=False))
    return out


def test_every_bad_input_is_named_and_every_good_video_arrives(messy_inputs, messy_prepared):
    _, _, good = messy_inputs
    manifest = json.loads((messy_prepared / "manifest.json").read_text())
    assert manifest["skipped"] == {errors.EMPTY_FILE: 1, errors.UNREADABLE: 1, errors.NO_VIDEO_STREAM: 1,
                                   errors.TOO_SHORT: 1, errors.TOO_SMALL: 1, errors.MISSING_CAPTION: 1}
    assert manifest["written"] == len(good) and manifest["complete"]
    samples = _read_shards(messy_prepared)
    assert {s["meta"]["source_id"] for s in samples.values()} == good
    skipped = [json.loads(line) for line in (messy_prepared / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"]: s["reason"] for s in skipped} == {
        "bad/empty": errors.EMPTY_FILE, "bad/corrupt": errors.UNREADABLE, "bad/audio_only": errors.NO_VIDEO_STREAM,
        "bad/short": errors.TOO_SHORT, "bad/tiny": errors.TOO_SMALL, "bad/no_caption": errors.MISSING_CAPTION}
    codecs = {s["meta"]["source_id"]: s["meta"]["source"]["codec"] for s in samples.values()}
    assert codecs["odd/vp9"] == "vp9" and codecs["odd/mpeg4"] == "mpeg4"


def test_shards_round_trip(synthetic_corpus, prepared_shards):
    samples = _read_shards(prepared_shards)
    captions = {r["videoid"]: r["name"] for r in csv.DictReader(open(synthetic_corpus / "captions.csv"))}
    assert set(samples) == set(captions)
    key = sorted(samples)[0]
    sample = samples[key]
    direct = decompose_video(synthetic_corpus / "videos" / f"{key}.mp4")
    np.testing.assert_array_equal(sample["motion"], direct.motion)
    assert sample["mp4"] == direct.mp4 and sample["caption"] == captions[key]
    meta = sample["meta"]
    assert meta["source_id"] == key and meta["num_frames"] == 60 and meta["fps"] == 6
    assert meta["iframes"] == [0, 12, 24, 36, 48] and meta["clip_starts"] == [12, 36]
    assert (meta["width"], meta["height"]) == (96, 96) and meta["caption_source"] == "csv"
    manifest = json.loads((prepared_shards / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4 and set(manifest["shard_samples"].values()) == {2}


def test_rerun_resumes_only_unfinished_units(synthetic_corpus, tmp_path):
    cfg = PrepareConfig(videos=str(synthetic_corpus / "videos"), out=str(tmp_path), workers=1, videos_per_unit=3,
                        captions=str(synthetic_corpus / "captions.csv"), progress=False)
    first = run_prepare(cfg)
    assert first["units_total"] == 3 and first["complete"]
    shards = {name: (tmp_path / name).stat().st_mtime_ns for name in first["shards"]}
    lost = first["shards"][1]
    (tmp_path / lost).unlink()  # a half-finished job: one unit's shard is gone
    second = run_prepare(cfg)
    assert second["shards"] == first["shards"] and second["written"] == 8
    for name, mtime in shards.items():
        assert ((tmp_path / name).stat().st_mtime_ns == mtime) == (name != lost)
    with pytest.raises(InputError, match="other settings"):
        run_prepare(PrepareConfig(**{**cfg.__dict__, "allow_missing_captions": True}))


def test_parts_split_units_and_manifest_completes(synthetic_corpus, tmp_path):
    base = dict(videos=str(synthetic_corpus / "videos"), out=str(tmp_path), workers=1, videos_per_unit=2,
                captions=str(synthetic_corpus / "captions.csv"), progress=False, num_parts=2)
    part0 = run_prepare(PrepareConfig(**base, part=0))
    assert not part0["complete"] and part0["units_done"] == 2 and part0["written"] == 4
    both = run_prepare(PrepareConfig(**base, part=1))
    assert both["complete"] and both["written"] == 8 and len(both["shards"]) == 4


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_video2dataset_shards_as_input(synthetic_corpus, tmp_path):
    inputs = tmp_path / "v2d"
    inputs.mkdir()
    videos = sorted((synthetic_corpus / "videos").glob("*.mp4"))
    with tarfile.open(inputs / "00000.tar", "w") as tar:
        for index, path in enumerate(videos[:3]):
            _tar_add(tar, f"{index:09d}.mp4", path.read_bytes())
            _tar_add(tar, f"{index:09d}.txt", f"caption {index}".encode())
            _tar_add(tar, f"{index:09d}.json", json.dumps({"url": f"http://x/{index}"}).encode())
    with tarfile.open(tmp_path / "full.tar", "w") as tar:
        for index, path in enumerate(videos[3:6]):
            _tar_add(tar, f"1{index:08d}.mp4", path.read_bytes())
            _tar_add(tar, f"1{index:08d}.txt", b"caption")
    data = (tmp_path / "full.tar").read_bytes()
    (inputs / "00001.tar").write_bytes(data[: int(len(data) * 0.8)])  # a truncated download
    out = tmp_path / "out"
    manifest = run_prepare(PrepareConfig(videos=str(inputs), out=str(out), workers=2, progress=False))
    samples = _read_shards(out)
    assert manifest["skipped"] == {errors.TRUNCATED_SHARD: 1}
    assert manifest["written"] == len(samples) == 5  # 3 + the 2 complete members before the cut
    first = samples["000000000"]
    assert first["caption"] == "caption 0" and first["meta"]["video2dataset"] == {"url": "http://x/0"}


def test_errors_before_any_work(tmp_path, synthetic_corpus):
    with pytest.raises(InputError, match="does not exist"):
        run_prepare(PrepareConfig(videos=str(tmp_path / "nope"), out=str(tmp_path / "out")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not writable"):
        run_prepare(PrepareConfig(videos=str(synthetic_corpus / "videos"), out=str(blocker / "out")))
    with pytest.raises(InputError, match="--caption-column"):
        bad_csv = tmp_path / "c.csv"
        bad_csv.write_text("videoid,whatever\na,b\n")
        run_prepare(PrepareConfig(videos=str(synthetic_corpus / "videos"), out=str(tmp_path / "o"),
                                  captions=str(bad_csv)))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cli(synthetic_corpus, tmp_path):
    cmd = [sys.executable, "-m", "videolavit", "prepare", "--videos", str(synthetic_corpus / "videos"), "--captions",
           str(synthetic_corpus / "captions.csv"), "--out", str(tmp_path / "out"), "--workers", "2", "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "written 8 samples" in done.stdout
    missing = subprocess.run(cmd[:5] + [str(tmp_path / "missing")] + cmd[6:], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "input path does not exist" in missing.stderr
