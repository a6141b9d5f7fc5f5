"""Text-to-video evaluation (paper A.4): benchmark readers, the scoring run with tiny random-weight metric
networks and real short videos, the real-statistics cache, skips, and the `evaluate` command's errors."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests.tiny_models import StyleGanVDetector, build_tiny_clip
from tests.video_factory import moving_square_frames, write_video
from videolavit.commands import evaluate as evaluate_command
from videolavit.evaluation.protocols import (
    ProtocolLayoutError,
    class_name_prompt,
    read_csv_protocol,
    read_msrvtt,
    read_protocol,
    read_ucf101,
    ucf101_real_videos,
)
from videolavit.evaluation.run import (
    EvaluationError,
    EvaluationSettings,
    GeneratedVideoError,
    MetricSettings,
    RealVideoSettings,
    evaluate_text_to_video,
    read_real_clip,
    real_statistics_file,
    real_video_entries,
    to_symmetric,
)
from videolavit.metrics.clip_similarity import CLIPSimilarity
from videolavit.metrics.weights import MissingWeightsError

REAL = RealVideoSettings(num_frames=16)
WIDTH, HEIGHT = 64, 48


class TinyC3D(nn.Module):
    """Stands in for a TorchScript C3D: uint8 clips [B, 3, T, H, W] → 101 UCF-101 logits."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 101)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.float().mean(dim=(2, 3, 4)) / 25.0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Random-weight metric networks as local files: TorchScript I3D and C3D, a tiny CLIP directory."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.jit.script(StyleGanVDetector(num_features=400)).save(str(root / "i3d_torchscript.pt"))
    torch.jit.script(TinyC3D()).save(str(root / "c3d.pt"))
    _, _, clip_dir = build_tiny_clip(root)
    return {"i3d": root / "i3d_torchscript.pt", "c3d": root / "c3d.pt", "clip": clip_dir}


def metric_settings(weights, **overrides) -> MetricSettings:
    options = dict(i3d=weights["i3d"], clip=weights["clip"], fid_weights=weights["clip"], fvd_resolution=32)
    options.update(overrides)
    return MetricSettings(**options)


def write_clip(path: Path, seed: int, width: int = WIDTH, height: int = HEIGHT, codec: str = "libx264") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    velocity = ((seed % 3) - 1.0, (seed % 2) * 1.0 - 0.5)
    return write_video(path, moving_square_frames(width, height, 20, velocity, square=16, seed=seed), fps=12,
                       codec=codec)


def msrvtt_annotation(test_ids: list[str], train_ids: list[str], captions_per_video: int = 4) -> dict:
    videos = [{"video_id": v, "split": "test", "category": 1} for v in test_ids]
    videos += [{"video_id": v, "split": "train", "category": 1} for v in train_ids]
    sentences = [{"video_id": v, "caption": f"caption {c} of {v}", "sen_id": i * captions_per_video + c}
                 for i, v in enumerate(test_ids + train_ids) for c in range(captions_per_video)]
    return {"info": {}, "videos": videos, "sentences": sentences}


@pytest.fixture(scope="module")
def msrvtt_root(tmp_path_factory) -> Path:
    """3 test videos + 2 train videos, MSRVTT_data.json and videos/all/<id>.mp4."""
    root = tmp_path_factory.mktemp("msrvtt")
    test_ids, train_ids = ["video7100", "video7010", "video7012"], ["video0", "video1"]
    (root / "MSRVTT_data.json").write_text(json.dumps(msrvtt_annotation(test_ids, train_ids)))
    for seed, video_id in enumerate(test_ids + train_ids):
        write_clip(root / "videos" / "all" / f"{video_id}.mp4", seed)
    return root


def real_video_generator(items, settings: RealVideoSettings = REAL, calls: list | None = None):
    """A stub model that 'generates' each prompt's own real video (decoded once, up front)."""
    videos = {item.prompt: torch.from_numpy(read_real_clip(item.real_video, settings)).permute(0, 3, 1, 2)
              for item in items}

    def generate(prompts: list[str], generator: torch.Generator) -> Tensor:
        if calls is not None:
            calls.append((list(prompts), generator.initial_seed()))
        return torch.stack([videos[p] for p in prompts])

    return generate, videos


# -- readers ----------------------------------------------------------------------------------------------


def test_msrvtt_reads_one_caption_per_test_video(msrvtt_root):
    items = read_msrvtt(msrvtt_root, seed=0)
    assert [item.id for item in items] == ["video7010", "video7012", "video7100"]  # test split, numeric order
    for item in items:
        assert item.prompt in {f"caption {c} of {item.id}" for c in range(4)}
        assert item.real_video == msrvtt_root / "videos" / "all" / f"{item.id}.mp4" and item.label is None
    assert read_msrvtt(msrvtt_root, seed=0) == items  # deterministic
    choices = {tuple(i.prompt for i in read_msrvtt(msrvtt_root, seed=s)) for s in range(8)}
    assert len(choices) > 1  # the seed picks the caption
    # A video's caption does not depend on which other videos are read.
    assert read_msrvtt(msrvtt_root, seed=0, limit=2) == items[:2]


def test_msrvtt_official_test_file_in_annotation_folder(tmp_path):
    (tmp_path / "annotation").mkdir()
    (tmp_path / "annotation" / "test_videodatainfo.json").write_text(
        json.dumps(msrvtt_annotation(["video7011", "video7010"], [])))
    write_clip(tmp_path / "TestVideo" / "video7010.mp4", 0)
    items = read_protocol("msrvtt", tmp_path)
    assert [i.id for i in items] == ["video7010", "video7011"]
    # Found in TestVideo/; the absent file keeps its expected path (counted as skipped when scored).
    assert items[0].real_video == tmp_path / "TestVideo" / "video7010.mp4"
    assert items[1].real_video == tmp_path / "TestVideo" / "video7011.mp4" and not items[1].real_video.exists()


def test_msrvtt_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(ProtocolLayoutError, match="test_videodatainfo.json or MSRVTT_data.json"):
        read_msrvtt(tmp_path)
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"videos": []}))
    with pytest.raises(ProtocolLayoutError, match="sentences"):
        read_msrvtt(tmp_path)
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(msrvtt_annotation([], ["video0"])))
    with pytest.raises(ProtocolLayoutError, match="no videos of split 'test'.*train"):
        read_msrvtt(tmp_path)
    with pytest.raises(ValueError, match="unknown protocol 'kinetics'"):
        read_protocol("kinetics", tmp_path)


@pytest.mark.parametrize("name,prompt", [
    ("ApplyEyeMakeup", "apply eye makeup"), ("YoYo", "yo yo"), ("TaiChi", "tai chi"),
    ("HandstandPushups", "handstand pushups"), ("Skijet", "skijet"), ("PlayingDaf", "playing daf"),
])
def test_ucf_class_names_become_prompts(name, prompt):
    assert class_name_prompt(name) == prompt


def make_ucf_layout(root: Path, clips: dict[str, list[tuple[int, int]]], prefix: dict[str, str] | None = None,
                    real: bool = False) -> Path:
    """UCF-101/<Class>/v_<Prefix>_gXX_cYY.avi; empty files unless ``real`` (then tiny MPEG-4 AVIs)."""
    for index, (name, groups) in enumerate(clips.items()):
        for group, clip in groups:
            path = root / "UCF-101" / name / f"v_{(prefix or {}).get(name, name)}_g{group:02d}_c{clip:02d}.avi"
            if real:
                write_clip(path, seed=10 * index + group, codec="mpeg4")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    return root


def test_ucf101_prompts_labels_and_real_clips(tmp_path):
    all_groups = [(g, c) for g in range(1, 6) for c in range(1, 6)]  # 25 clips in 5 groups
    make_ucf_layout(tmp_path, {"YoYo": all_groups, "ApplyEyeMakeup": [(1, 1), (1, 2), (2, 1)],
                               "HandstandPushups": [(3, 1)]}, prefix={"HandstandPushups": "HandStandPushups"})
    (tmp_path / "ucfTrainTestlist").mkdir()
    (tmp_path / "ucfTrainTestlist" / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n3 YoYo\n")
    items = read_ucf101(tmp_path)
    assert len(items) == 3 * 20
    by_class = {}
    for item in items:
        by_class.setdefault(item.id.split("/")[0], []).append(item)
    assert {name: len(v) for name, v in by_class.items()} == {"ApplyEyeMakeup": 20, "HandstandPushups": 20, "YoYo": 20}
    assert {(i.prompt, i.label) for i in by_class["YoYo"]} == {("yo yo", 2)}
    assert {(i.prompt, i.label) for i in by_class["ApplyEyeMakeup"]} == {("apply eye makeup", 0)}
    # Interleaved over classes, so a limit keeps every class.
    assert [i.id for i in items[:4]] == ["ApplyEyeMakeup/00", "HandstandPushups/00", "YoYo/00", "ApplyEyeMakeup/01"]
    # 20 distinct real clips spread over all 5 groups of YoYo, not only its first groups.
    yoyo = [i.real_video.name for i in by_class["YoYo"]]
    assert len(set(yoyo)) == 20 and {name.split("_")[2] for name in yoyo} == {f"g0{g}" for g in range(1, 6)}
    # Fewer clips than generated videos: each clip once, the rest have no real partner.
    apply = [i.real_video for i in by_class["ApplyEyeMakeup"]]
    assert len({p for p in apply if p is not None}) == 3 and apply.count(None) == 17
    # The class whose files are spelled differently from its folder still finds them.
    assert by_class["HandstandPushups"][0].real_video.name == "v_HandStandPushups_g03_c01.avi"
    assert len(read_ucf101(tmp_path, limit=5)) == 5
    assert len(ucf101_real_videos(tmp_path)) == 25 + 3 + 1


def test_ucf101_prompt_overrides_and_layout_errors(tmp_path):
    make_ucf_layout(tmp_path, {"ApplyEyeMakeup": [(1, 1)], "YoYo": [(1, 1)]})
    (tmp_path / "prompts.json").write_text(json.dumps({"YoYo": "a person playing with a yo-yo"}))
    items = read_ucf101(tmp_path, videos_per_class=2, prompts_file=tmp_path / "prompts.json")
    assert [i.prompt for i in items] == ["apply eye makeup", "a person playing with a yo-yo"] * 2
    assert [i.label for i in items[:2]] == [0, 1]  # sorted folder names without classInd.txt
    (tmp_path / "typo.json").write_text(json.dumps({"YoYoo": "x"}))
    with pytest.raises(ProtocolLayoutError, match="YoYoo"):
        read_ucf101(tmp_path, prompts_file=tmp_path / "typo.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProtocolLayoutError, match=r"<Class>/v_<Class>_gXX_cYY.avi"):
        read_ucf101(tmp_path / "empty")


def test_csv_protocol(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "prompts.csv").write_text("prompt,video,label\na cat,clips/a.mp4,3\na dog,,\n\"x, y\",clips/b.mp4,\n")
    items = read_csv_protocol(tmp_path)  # a folder means its prompts.csv
    assert [(i.prompt, i.id, i.label) for i in items] == [("a cat", "000000", 3), ("a dog", "000001", None),
                                                          ("x, y", "000002", None)]
    assert items[0].real_video == tmp_path / "clips" / "a.mp4" and items[1].real_video is None
    assert read_csv_protocol(tmp_path / "prompts.csv", limit=1) == items[:1]
    (tmp_path / "bad.csv").write_text("text_prompt,video\na,b\n")
    with pytest.raises(ProtocolLayoutError, match="no prompt column"):
        read_csv_protocol(tmp_path / "bad.csv")


# -- scoring --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".avi", "mpeg4")])
def test_real_clip_takes_the_frames_the_settings_name(tmp_path, suffix, codec):
    path = write_clip(tmp_path / f"v{suffix}", 0, codec=codec)  # 20 frames at 12 fps
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(frames) == 20
    assert np.array_equal(read_real_clip(path, RealVideoSettings(num_frames=16)), frames[2:18])  # centre
    assert np.array_equal(read_real_clip(path, RealVideoSettings(num_frames=16, clip="first")), frames[:16])
    # Resampled to 6 fps: every other frame.
    assert np.array_equal(read_real_clip(path, RealVideoSettings(num_frames=5, fps=6, clip="first")), frames[0:10:2])
    # Shorter than the clip: stretched over the whole video.
    stretched = np.linspace(0, 19, 40).round().astype(int)
    assert np.array_equal(read_real_clip(path, RealVideoSettings(num_frames=40)), frames[stretched])
    assert read_real_clip(path, RealVideoSettings(short_side=24)).shape == (16, 24, 32, 3)


def test_real_videos_as_generations_score_zero_distance_and_the_metrics_own_clipsim(weights, msrvtt_root, tmp_path):
    items = read_msrvtt(msrvtt_root)
    calls = []
    generate, videos = real_video_generator(items, calls=calls)
    settings = metric_settings(weights)
    report = evaluate_text_to_video(items, generate, EvaluationSettings(
        settings, protocol="msrvtt", batch_size=2, seed=5, real=REAL, out=tmp_path / "metrics.json", progress=False))
    assert set(report["metrics"]) == {"clipsim", "fvd", "fid"}
    assert calls == [([i.prompt for i in items[:2]], 5), ([items[2].prompt], 7)]  # seed + first index of batch

    # Same videos on both sides → the same features → zero Fréchet distances, on the scale of a real difference.
    def shifted(prompts, generator):
        return torch.stack([videos[p].roll(8, dims=-1) // 2 for p in prompts])

    other = evaluate_text_to_video(items, shifted,
                                   EvaluationSettings(settings, protocol="msrvtt", real=REAL, progress=False))
    for name in ("fvd", "fid"):
        assert other["metrics"][name] > 0
        assert abs(report["metrics"][name]) <= 1e-6 * other["metrics"][name]

    clipsim = CLIPSimilarity(weights["clip"])
    clipsim.update(to_symmetric(torch.stack([videos[i.prompt] for i in items])), [i.prompt for i in items])
    assert report["metrics"]["clipsim"] == pytest.approx(float(clipsim.compute()), abs=1e-6)

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["protocol"] == "msrvtt" and written["num_items"] == 3
    assert written["skipped"] == {"real_videos": 0, "by_reason": {}, "videos": []}
    assert written["settings"]["seed"] == 5 and written["settings"]["weights"]["i3d"] == str(weights["i3d"])
    assert written["settings"]["generated_video"] == {"frames": 16, "height": HEIGHT, "width": WIDTH}
    assert written["settings"]["real_video"]["num_frames"] == 16 and written["wall_time_s"] > 0
    assert written["real_statistics"]["fvd"] == {"source": "computed", "path": None, "num_samples": 3,
                                                 "num_videos": 3}


def test_real_statistics_are_cached_and_reused_without_the_real_videos(weights, tmp_path):
    for seed in range(3):
        write_clip(tmp_path / "data" / f"{seed}.mp4", seed)
    rows = "".join(f"prompt {s},{s}.mp4\n" for s in range(3))
    (tmp_path / "data" / "prompts.csv").write_text("prompt,video\n" + rows)
    items = read_csv_protocol(tmp_path / "data")
    generate, _ = real_video_generator(items)
    settings = metric_settings(weights, clip=None)
    cache = tmp_path / "cache"
    first = evaluate_text_to_video(items, generate, EvaluationSettings(settings, real_stats_dir=cache, progress=False))
    assert {first["real_statistics"][n]["source"] for n in ("fvd", "fid")} == {"computed"}
    files = sorted(p.name for p in cache.iterdir())
    assert len([f for f in files if f.endswith(".npz")]) == 2 and len(files) == 4  # + a JSON note each
    assert all(f.startswith("csv-") for f in files)

    for item in items:
        item.real_video.unlink()
    second = evaluate_text_to_video(items, generate, EvaluationSettings(settings, real_stats_dir=cache, progress=False))
    assert {second["real_statistics"][n]["source"] for n in ("fvd", "fid")} == {"cache"}
    assert second["real_statistics"]["fvd"]["num_videos"] == 3
    for name in ("fvd", "fid"):
        assert second["metrics"][name] == pytest.approx(first["metrics"][name], abs=1e-9)
    assert second["skipped"]["real_videos"] == 0

    # Another decoding, another real set or another network is another cache entry.
    entries = real_video_entries(items)
    fingerprint = "FVD:x"
    base = real_statistics_file(cache, "csv", "fvd", fingerprint, entries, REAL)
    assert base != real_statistics_file(cache, "csv", "fvd", fingerprint, entries, RealVideoSettings(num_frames=8))
    assert base != real_statistics_file(cache, "csv", "fvd", fingerprint, entries[:2], REAL)
    assert base != real_statistics_file(cache, "csv", "fvd", "FVD:y", entries, REAL)
    # Same file names elsewhere: another CSV set, but the same (moved) benchmark.
    moved = [(video_id, tmp_path / "moved" / path.name) for video_id, path in entries]
    assert base != real_statistics_file(cache, "csv", "fvd", fingerprint, moved, REAL)
    assert (real_statistics_file(cache, "msrvtt", "fvd", fingerprint, entries, REAL)
            == real_statistics_file(cache, "msrvtt", "fvd", fingerprint, moved, REAL))
    # Without the cache and without the videos, the error says what is missing.
    with pytest.raises(EvaluationError, match="none of the 3 exists"):
        evaluate_text_to_video(items, generate, EvaluationSettings(settings, progress=False))


def test_unreadable_and_missing_real_videos_are_counted_skips(weights, tmp_path):
    write_clip(tmp_path / "a.mp4", 0)
    write_clip(tmp_path / "b.mp4", 1)
    write_clip(tmp_path / "c.mp4", 2, width=56, height=40)  # another size: batched separately
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 50)
    rows = ["a.mp4", "b.mp4", "c.mp4", "broken.mp4", "gone.mp4"]
    (tmp_path / "prompts.csv").write_text("prompt,video\n" + "".join(f"p{i},{v}\n" for i, v in enumerate(rows)))
    items = read_csv_protocol(tmp_path / "prompts.csv")

    def generate(prompts, generator):
        return torch.randint(0, 256, (len(prompts), 12, 3, 32, 32), generator=generator, dtype=torch.uint8)

    report = evaluate_text_to_video(items, generate, EvaluationSettings(
        metric_settings(weights, clip=None, fid_weights=None), batch_size=4, out=tmp_path / "m.json", decode_workers=2,
        progress=False))
    assert report["num_items"] == 5 and report["metrics"]["fvd"] > 0
    assert report["real_statistics"]["fvd"]["num_videos"] == 3
    assert report["skipped"]["real_videos"] == 2
    assert report["skipped"]["by_reason"] == {"unreadable": 1, "missing_file": 1}
    assert {v["id"]: v["reason"] for v in report["skipped"]["videos"]} == {"000003": "unreadable",
                                                                          "000004": "missing_file"}
    assert json.loads((tmp_path / "m.json").read_text())["skipped"]["by_reason"] == report["skipped"]["by_reason"]


def test_generated_videos_are_saved_and_checked(weights, msrvtt_root, tmp_path):
    items = read_msrvtt(msrvtt_root)
    generate, _ = real_video_generator(items)
    settings = metric_settings(weights, i3d=None, fid_weights=None)
    evaluate_text_to_video(items, generate, EvaluationSettings(settings, protocol="msrvtt",
                                                                save_videos=tmp_path / "videos", progress=False))
    index = [json.loads(line) for line in (tmp_path / "videos" / "index.jsonl").read_text().splitlines()]
    assert [(row["id"], row["prompt"]) for row in index] == [(i.id, i.prompt) for i in items]
    with av.open(str(tmp_path / "videos" / index[0]["file"])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (HEIGHT, WIDTH, 3)

    def floats(prompts, generator):
        return torch.rand(len(prompts), 4, 3, 32, 32)

    with pytest.raises(GeneratedVideoError, match=r"uint8 \[B, T, 3, H, W\]"):
        evaluate_text_to_video(items, floats, EvaluationSettings(settings, protocol="msrvtt", progress=False))


def test_protocol_metrics_need_their_weights(weights, msrvtt_root):
    items = read_msrvtt(msrvtt_root)
    generate, _ = real_video_generator(items)
    with pytest.raises(MissingWeightsError, match="--i3d.*--c3d"):  # CLIPSIM is not a UCF-101 metric
        evaluate_text_to_video(items, generate, EvaluationSettings(
            MetricSettings(clip=weights["clip"]), protocol="ucf101", progress=False))
    with pytest.raises(MissingWeightsError, match="FVD \\(--i3d\\)"):
        evaluate_text_to_video(items, generate, EvaluationSettings(
            MetricSettings(i3d=weights["i3d"].with_name("none.pt")), protocol="msrvtt", progress=False))


# -- the command ---------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate_command.add_arguments(parser)
    return parser.parse_args(argv)


class FakeTextToVideo:
    """What videolavit.inference.text_to_video.TextToVideo offers: from_directory and __call__."""

    loaded: list = []

    @classmethod
    def from_directory(cls, directory, **options):
        cls.loaded.append((Path(directory), options))
        return cls()

    def __call__(self, prompts, generator):
        return torch.randint(0, 256, (len(prompts), 10, 3, 40, 40), generator=generator, dtype=torch.uint8)


@pytest.fixture
def fake_pipeline(monkeypatch):
    module = types.ModuleType(evaluate_command.PIPELINE_MODULE)
    module.TextToVideo = FakeTextToVideo
    monkeypatch.setitem(sys.modules, evaluate_command.PIPELINE_MODULE, module)
    FakeTextToVideo.loaded = []
    return module


def test_command_scores_ucf101_through_the_pipeline(weights, tmp_path, fake_pipeline, capsys):
    root = make_ucf_layout(tmp_path / "ucf", {"ApplyEyeMakeup": [(1, 1), (2, 1)], "YoYo": [(1, 1), (2, 1)]}, real=True)
    (tmp_path / "exports").mkdir()
    args = parse(["--protocol", "ucf101", "--root", str(root), "--out", str(tmp_path / "out" / "ucf.json"),
                  "--pipeline", str(tmp_path / "exports"), "--i3d", str(weights["i3d"]), "--c3d", str(weights["c3d"]),
                  "--videos-per-class", "2", "--is-splits", "2", "--fvd-resolution", "32", "--device", "cpu",
                  "--pipeline-option", "steps=4", "--save-videos", str(tmp_path / "generated"), "--no-progress"])
    assert evaluate_command.run(args) == 0, capsys.readouterr().err
    assert FakeTextToVideo.loaded == [(tmp_path / "exports", {"steps": 4, "device": "cpu"})]
    report = json.loads((tmp_path / "out" / "ucf.json").read_text())
    assert report["protocol"] == "ucf101" and report["num_items"] == 4
    assert set(report["metrics"]) == {"fvd", "is", "is_std"}
    assert 1.0 <= report["metrics"]["is"] <= 101.0 and report["metrics"]["fvd"] > 0
    assert report["real_statistics"]["fvd"]["num_videos"] == 4
    assert report["settings"]["pipeline_options"] == {"steps": 4}
    assert len(list((tmp_path / "out" / "real_stats").glob("ucf101-fvd-*.npz"))) == 1  # default cache: next to --out
    assert len(list((tmp_path / "generated").glob("*.mp4"))) == 4
    assert "fvd=" in capsys.readouterr().out


def test_command_argument_errors(weights, msrvtt_root, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        parse(["--protocol", "kinetics", "--root", ".", "--out", "x.json", "--pipeline", "."])
    assert "invalid choice: 'kinetics'" in capsys.readouterr().err

    base = ["--out", str(tmp_path / "m.json"), "--pipeline", str(tmp_path), "--no-progress"]
    assert evaluate_command.run(parse(["--protocol", "msrvtt", "--root", str(msrvtt_root)] + base)) == 2
    assert "--clip (CLIPSIM), --i3d (FVD), --fid-weights (frame FID)" in capsys.readouterr().err
    clip = ["--clip", str(weights["clip"])]
    assert evaluate_command.run(parse(["--protocol", "ucf101", "--root", str(tmp_path)] + base + clip)) == 2
    assert "--i3d (FVD), --c3d (IS)" in capsys.readouterr().err
    assert evaluate_command.run(parse(["--protocol", "msrvtt", "--root", str(tmp_path / "no")] + base + clip)) == 2
    assert "--root" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate_command.run(parse(["--protocol", "msrvtt", "--root", str(tmp_path / "empty")] + base + clip)) == 2
    assert "MSRVTT_data.json" in capsys.readouterr().err
    missing_i3d = ["--i3d", str(tmp_path / "rgb_imagenet.pt")]
    assert evaluate_command.run(parse(["--protocol", "msrvtt", "--root", str(msrvtt_root)] + base + missing_i3d)) == 2
    assert "--i3d" in capsys.readouterr().err
    not_clip = ["--clip", str(msrvtt_root)]  # a folder, but no CLIP model in it
    assert evaluate_command.run(parse(["--protocol", "msrvtt", "--root", str(msrvtt_root)] + base + not_clip)) == 2
    assert "CLIPSIM (--clip): cannot load the weights" in capsys.readouterr().err

    # The pipeline module: absent, or without TextToVideo.
    monkeypatch.setitem(sys.modules, evaluate_command.PIPELINE_MODULE, None)
    assert evaluate_command.run(parse(["--protocol", "msrvtt", "--root", str(msrvtt_root)] + base + clip)) == 2
    assert "text-to-video pipeline (videolavit.inference.text_to_video) is not available" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, evaluate_command.PIPELINE_MODULE, types.ModuleType("empty"))
    assert evaluate_command.run(parse(["--protocol", "msrvtt", "--root", str(msrvtt_root)] + base + clip)) == 2
    assert "has no TextToVideo.from_directory" in capsys.readouterr().err

    class Refusing:
        @classmethod
        def from_directory(cls, directory, **options):
            raise TypeError(f"unknown generation options {sorted(options)}")

    monkeypatch.setitem(sys.modules, evaluate_command.PIPELINE_MODULE, types.SimpleNamespace(TextToVideo=Refusing))
    option = ["--pipeline-option", "stepz=3"]
    assert evaluate_command.run(parse(["--protocol", "msrvtt", "--root", str(msrvtt_root)] + base + clip + option)) == 2
    assert "cannot load the pipeline from --pipeline" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--protocol", "csv", "--root", ".", "--out", "x", "--pipeline", ".", "--pipeline-option", "steps"])
    assert "KEY=VALUE" in capsys.readouterr().err
