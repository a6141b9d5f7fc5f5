"""prepare never loses or duplicates an input: units are their content, concurrent runs are kept apart,
the manifest's counts are its shards', every input file is accounted, and the DataModule reads only a
complete manifest's shards. User errors are one line and exit 2."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from datamodules.prepare import PrepareConfig, SettingsMismatchError, run_prepare
from datamodules.prepare_inputs import DUPLICATE_ID, NOT_A_VIDEO, InputError
from datamodules.prepare_locks import PrepareBusyError
from datamodules.prepare_plan import PlanError
from datamodules.shard_list import ManifestError
from datamodules.video_datamodule import VideoDataModule
from tests.prepare_crash import check_prepared, start, wait_for
from tests.video_factory import write_audio_only
from videolavit.__main__ import main
from videolavit.video import errors


@pytest.fixture
def videos(synthetic_corpus, tmp_path) -> Path:
    """A private copy of the 8 corpus videos (tests add and remove files)."""
    target = tmp_path / "videos"
    shutil.copytree(synthetic_corpus / "videos", target)
    return target


def _config(videos: Path, out: Path, synthetic_corpus: Path, **overrides) -> dict:
    return {"videos": str(videos), "out": str(out), "captions": str(synthetic_corpus / "captions.csv"),
            "workers": 1, "progress": False, **overrides}


def _stems(videos: Path) -> set[str]:
    return {p.stem for p in videos.glob("*.mp4")}


def test_rerun_with_other_videos_per_unit_keeps_every_video_once(videos, synthetic_corpus, tmp_path):
    out = tmp_path / "out"
    half = run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3, num_parts=2)))
    assert not half["complete"] and half["written"] == 5  # units of 3, 3, 2: part 0 holds the first and last
    done = run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=2)))
    manifest, sources = check_prepared(out)
    assert done == manifest and manifest["complete"]
    assert set(sources) == _stems(videos) and set(sources.values()) == {1}
    assert manifest["written"] == 8 == manifest["inputs"] == manifest["input_files"]
    # A finished output is kept as it is under yet another unit size: nothing is redone.
    mtimes = {name: (out / name).stat().st_mtime_ns for name in manifest["shards"]}
    again = run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=5)))
    assert again["shards"] == manifest["shards"] and again["complete"]
    assert {name: (out / name).stat().st_mtime_ns for name in again["shards"]} == mtimes


def test_an_added_input_that_sorts_first_is_prepared_and_nothing_twice(videos, synthetic_corpus, tmp_path):
    out = tmp_path / "out"
    first = run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3)))
    mtimes = {name: (out / name).stat().st_mtime_ns for name in first["shards"]}
    shutil.copy(next(videos.glob("*.mp4")), videos / "000_added.mp4")
    (videos / "000_added.txt").write_text("an added video")  # its caption, as a sidecar
    second = run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3)))
    manifest, sources = check_prepared(out)
    assert second["complete"] and second["written"] == 9 == second["input_files"]
    assert set(sources) == _stems(videos) and set(sources.values()) == {1}
    # Only the new input's unit was prepared; the finished units' shards are untouched.
    assert set(mtimes) < set(second["shards"]) and len(second["shards"]) == len(mtimes) + 1
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in mtimes.items())


def test_removed_inputs_are_refused_unless_dropped(videos, synthetic_corpus, tmp_path):
    out = tmp_path / "out"
    run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3)))
    gone = sorted(videos.glob("*.mp4"))[4]
    gone.unlink()
    with pytest.raises(PlanError, match=f"input files are gone.*{gone.name}.*--drop-removed"):
        run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3)))
    assert check_prepared(out)[0]["written"] == 8  # refused before touching anything
    run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3, drop_removed=True)))
    manifest, sources = check_prepared(out)
    assert manifest["complete"] and set(sources) == _stems(videos) and set(sources.values()) == {1}
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(manifest["shards"])  # the dropped unit's are gone


def _video2dataset_tar(path: Path, videos: list[Path], cut: float = 1.0) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, video in enumerate(videos):
            for ext, data in (("mp4", video.read_bytes()), ("txt", f"caption {index}".encode())):
                info = tarfile.TarInfo(f"{path.stem}{index:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data[: int(len(data) * cut)])


def test_a_replaced_input_shard_is_redone_not_added(videos, tmp_path):
    inputs, out = tmp_path / "v2d", tmp_path / "out"
    inputs.mkdir()
    clips = sorted(videos.glob("*.mp4"))
    _video2dataset_tar(inputs / "a.tar", clips[:3])
    _video2dataset_tar(inputs / "b.tar", clips[3:6], cut=0.8)  # a truncated download
    first = run_prepare(PrepareConfig(videos=str(inputs), out=str(out), workers=1, progress=False))
    assert first["skipped"] == {errors.TRUNCATED_SHARD: 1} and first["written"] == 5
    _video2dataset_tar(inputs / "b.tar", clips[3:6])  # downloaded again, in full
    second = run_prepare(PrepareConfig(videos=str(inputs), out=str(out), workers=1, progress=False))
    manifest, sources = check_prepared(out)
    assert second == manifest and manifest["skipped"] == {} and manifest["written"] == 6 == len(sources)
    assert set(sources.values()) == {1} and manifest["input_files"] == 2


def test_other_settings_are_refused(videos, synthetic_corpus, tmp_path):
    out = tmp_path / "out"
    run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3, num_parts=2)))
    with pytest.raises(SettingsMismatchError, match="other settings \\(allow_missing_captions\\)"):
        run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3, num_parts=2, part=1,
                                            allow_missing_captions=True)))


def test_a_second_run_of_the_same_part_is_refused_and_a_killed_ones_locks_vanish(videos, synthetic_corpus, tmp_path):
    out = tmp_path / "out"
    config = _config(videos, out, synthetic_corpus, videos_per_unit=2)
    ready, release = tmp_path / "ready", tmp_path / "release"
    first = start(config, "hang-after-write", 1, ready, release)
    try:
        wait_for(ready, first)
        with pytest.raises(PrepareBusyError, match="already working on --part 0/1"):
            run_prepare(PrepareConfig(**config))
        # While a part runs, the plan cannot change under it: a new unit size is refused too.
        with pytest.raises(PrepareBusyError, match="videos-per-unit 2 -> 4.*rerun this one"):
            run_prepare(PrepareConfig(**{**config, "videos_per_unit": 4}))
    finally:
        first.kill()
        first.wait(30)
    manifest = run_prepare(PrepareConfig(**config))  # the killed run's locks went with it
    assert manifest["complete"]
    assert set(check_prepared(out)[1].values()) == {1} and manifest["written"] == 8


def test_two_parts_at_once_give_one_consistent_manifest(videos, synthetic_corpus, tmp_path):
    out = tmp_path / "out"
    config = _config(videos, out, synthetic_corpus, videos_per_unit=2, num_parts=2)
    ready, release = tmp_path / "ready", tmp_path / "release"
    part0 = start({**config, "part": 0}, "hang-after-write", 1, ready, release)
    try:
        wait_for(ready, part0)
        part1 = run_prepare(PrepareConfig(**config, part=1))
        assert not part1["complete"] and part1["units_done"] == 2 and part1 == check_prepared(out)[0]
        release.touch()
        assert part0.wait(120) == 0, part0.stderr.read()
    finally:
        part0.kill()
        part0.wait(30)
    manifest, sources = check_prepared(out)
    assert manifest["complete"] and manifest["units_done"] == manifest["units_total"] == 4
    assert set(sources) == _stems(videos) and set(sources.values()) == {1}


def test_every_input_file_is_accounted_for(videos, synthetic_corpus, tmp_path):
    write_audio_only(videos / "song.m4a")
    (videos / "notes.md").write_text("not a video")
    (videos / "sub").mkdir()
    (videos / "sub" / "README").write_text("no extension")
    video = sorted(videos.glob("*.mp4"))[0]
    video.with_suffix(".txt").write_text("a sidecar caption: not an input of its own")
    shutil.copy(video, video.with_suffix(".webm"))  # same sample key as the .mp4, which sorts first
    manifest = run_prepare(PrepareConfig(**_config(videos, tmp_path / "out", synthetic_corpus, videos_per_unit=4)))
    assert manifest["skipped"] == {NOT_A_VIDEO: 3, DUPLICATE_ID: 1} and manifest["written"] == 8
    assert manifest["inputs"] == manifest["input_files"] == 12 and manifest["complete"]
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {s["id"]: s["reason"] for s in skipped} == {"notes.md": NOT_A_VIDEO, "song.m4a": NOT_A_VIDEO,
                                                       "sub/README": NOT_A_VIDEO, f"{video.stem}.webm": DUPLICATE_ID}
    assert check_prepared(tmp_path / "out")[1][video.stem] == 1


def test_an_output_directory_inside_the_inputs_is_not_read_as_input(videos, synthetic_corpus):
    out = videos / "prepared"
    first = run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3)))
    again = run_prepare(PrepareConfig(**_config(videos, out, synthetic_corpus, videos_per_unit=3)))
    assert first == again and again["input_files"] == 8 and again["written"] == 8
    with pytest.raises(InputError, match="is the output directory or lies inside it; pass another --out"):
        run_prepare(PrepareConfig(**_config(out, videos, synthetic_corpus)))


def _keys(dm: VideoDataModule) -> set[str]:
    return {key for batch in dm.val_dataloader() for key in batch["key"]}


def test_datamodule_reads_only_a_complete_manifests_shards(videos, synthetic_corpus, prepared_shards, tmp_path,
                                                          caplog):
    loose = tmp_path / "loose"
    loose.mkdir()
    for shard in prepared_shards.glob("*.tar"):
        shutil.copy(shard, loose / shard.name)
    with pytest.raises(ManifestError, match="has no manifest.json.*allow_incomplete: true"):
        _keys(VideoDataModule(val_shards=str(loose), batch_size=4, num_workers=0))
    with caplog.at_level(logging.WARNING, logger="datamodules.shard_list"):
        assert len(_keys(VideoDataModule(val_shards=str(loose), batch_size=4, num_workers=0,
                                         allow_incomplete=True))) == 8
    assert "no manifest.json" in caplog.text
    caplog.clear()

    partial = tmp_path / "partial"
    half = run_prepare(PrepareConfig(**_config(videos, partial, synthetic_corpus, videos_per_unit=3, num_parts=2)))
    with pytest.raises(ManifestError, match="incomplete \\(2/3 units done\\).*every --part"):
        _keys(VideoDataModule(val_shards=str(partial), batch_size=4, num_workers=0))
    shutil.copy(loose / sorted(p.name for p in loose.glob("*.tar"))[0], partial / "videos-stray-000.tar")
    with caplog.at_level(logging.WARNING, logger="datamodules.shard_list"):
        keys = _keys(VideoDataModule(val_shards=str(partial / "manifest.json"), batch_size=4, num_workers=0,
                                     allow_incomplete=True))
    assert "incomplete" in caplog.text
    assert keys == set(check_prepared(partial)[1]) and len(keys) == half["written"] == 5  # not the stray shard

    (partial / half["shards"][0]).unlink()
    with pytest.raises(ManifestError, match="1 shard\\(s\\) listed in .* are missing"):
        _keys(VideoDataModule(val_shards=str(partial), batch_size=4, num_workers=0, allow_incomplete=True))
    # Shards named one by one are read as given.
    listed = [str(loose / name) for name in sorted(p.name for p in loose.glob("*.tar"))[:2]]
    assert len(_keys(VideoDataModule(val_shards=listed, batch_size=4, num_workers=0))) == 4


@pytest.mark.parametrize("case", ["videos_per_unit", "non_utf8_csv", "missing_videos", "unwritable_out"])
def test_user_errors_are_one_line_and_exit_2(case, synthetic_corpus, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("videoid,name\nclip_000,caf\u00e9 au lait\n".encode("latin-1"))
    args = {"--videos": str(synthetic_corpus / "videos"), "--out": str(tmp_path / "out"),
            "--captions": str(synthetic_corpus / "captions.csv")}
    expected = {"videos_per_unit": "--videos-per-unit must be positive (got 0)",
                "non_utf8_csv": "is not UTF-8 (byte 0xe9",
                "missing_videos": "input path does not exist",
                "unwritable_out": "is not writable"}[case]
    extra = []
    if case == "videos_per_unit":
        extra = ["--videos-per-unit", "0"]
    elif case == "non_utf8_csv":
        args["--captions"] = str(latin1)
    elif case == "missing_videos":
        args["--videos"] = str(tmp_path / "nowhere")
    else:
        args["--out"] = str(blocker / "out")
    argv = ["prepare", "--no-progress", *[x for kv in args.items() for x in kv], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists()  # validated before any work
