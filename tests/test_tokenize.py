"""The tokenize job: token shards hold exactly the frozen tokenizers' ids per clip, one sample per video under its
key; reruns skip finished shards and refuse other exports; a killed job resumes without losing or duplicating a
video; ``--part i/N`` jobs share an output; the command's one-line errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import datamodules.tokenize_shards as tokenize_shards
from datamodules.sample_format import decode_sample
from datamodules.shard_list import resolve_shards
from datamodules.tar_reader import iter_tar_samples
from datamodules.tokenize_shards import TokenizeConfig, TokenizeError, run_tokenize
from tests.tiny_tokenizers import build_tokenizer_exports
from videolavit.__main__ import main
from videolavit.llm.token_shards import decode_token_sample
from videolavit.llm.video_codes import exports_fingerprint
from videolavit.llm.vocabulary import Vocabulary
from videolavit.video.clips import clip_motion, select_clip_starts
from videolavit.video.frames import decode_keyframes
from videolavit.video.motion_grid import TOKENIZER_SCALE

VOCAB = Vocabulary(text_size=300, visual_codes=16, motion_codes=32)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    return build_tokenizer_exports(tmp_path_factory.mktemp("exports"))


def run(shards, exports, out, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_tokenize(TokenizeConfig(shards=str(shards), exports=str(exports), out=str(out), progress=False,
                                           batch_clips=3, **kwargs))


def token_samples(out: Path) -> dict[str, dict]:
    """Every raw token sample of an output directory (through its manifest), by key; asserts no key twice."""
    found: dict[str, dict] = {}
    for url in resolve_shards(str(out)):
        for raw in iter_tar_samples(url, required=("txt", "json", "ids.npy")):
            assert raw["__key__"] not in found, f"{raw['__key__']} written twice"
            found[raw["__key__"]] = raw
    return found


def test_token_shards_hold_the_frozen_tokenizers_ids_per_clip(prepared_shards, exports, tmp_path):
    from videolavit.models.export import load_export
    from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

    manifest, totals = run(prepared_shards, exports, tmp_path / "tokens")
    assert torch.is_grad_enabled()  # the job runs in-process here: it leaves the caller's autograd state alone
    assert manifest["complete"] and manifest["written"] == 8 == totals["written"] and manifest["skipped"] == {}
    assert manifest["fingerprint"] == exports_fingerprint(exports, exports)
    assert manifest["codes"] == {"motion_codes": 32, "visual_codes": 16}
    videos = {raw["__key__"]: decode_sample(raw) for url in resolve_shards(str(prepared_shards))
              for raw in iter_tar_samples(url)}
    found = token_samples(tmp_path / "tokens")
    assert set(found) == set(videos)

    motion_model = load_export(exports, "motion_tokenizer").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keyframe_model = load_keyframe_tokenizer(exports)
    for key, video in videos.items():
        sample = decode_token_sample(found[key], VOCAB, fingerprints={manifest["fingerprint"]})
        meta = video["meta"]
        starts = select_clip_starts(meta["iframes"], meta["num_frames"], 24, 8)
        assert sample.clip_starts == starts and sample.caption == video["caption"]
        assert found[key]["ids.npy"][:6] == b"\x93NUMPY" and sample.motions.dtype == np.uint16
        with torch.inference_mode():
            fields = torch.stack([clip_motion(video["motion"], s, (8, 8), 24, TOKENIZER_SCALE) for s in starts])
            frames = decode_keyframes(video["mp4"], starts, meta["fps"], size=(56, 56))  # square: no crop
            ids, lengths = keyframe_model.tokenize(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
        assert sample.motions.tolist() == motion_model.encode(fields).tolist()
        assert [k.tolist() for k in sample.keyframes] == [row[:n].tolist() for row, n in zip(ids, lengths.tolist())]


def test_a_rerun_skips_finished_shards_and_other_exports_are_refused(prepared_shards, exports, tmp_path,
                                                                     capsys):
    out = tmp_path / "tokens"
    run(prepared_shards, exports, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    manifest, totals = run(prepared_shards, exports, out)
    assert totals == {"resumed_units": 4} and manifest["written"] == 8
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before  # nothing rewritten

    other = build_tokenizer_exports(tmp_path / "other", seed=1)
    with pytest.raises(TokenizeError, match="other tokenizer exports"):
        run(prepared_shards, other, out)
    with pytest.raises(TokenizeError, match="other settings"):
        run(prepared_shards, exports, out, max_clips=1)
    assert main(["tokenize", "--shards", str(prepared_shards), "--exports", str(other), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "other tokenizer exports" in err
    assert main(["tokenize", "--shards", str(prepared_shards), "--exports", str(tmp_path / "none"), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2
    assert "motion_tokenizer" in capsys.readouterr().err


def test_a_killed_job_resumes_without_losing_or_duplicating_a_video(prepared_shards, exports, tmp_path,
                                                                    monkeypatch):
    run(prepared_shards, exports, tmp_path / "clean")
    reference = token_samples(tmp_path / "clean")
    real = tokenize_shards.encode_token_sample
    calls = {"n": 0}

    def dies_at_the_fifth_video(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize_shards, "encode_token_sample", dies_at_the_fifth_video)
    out = tmp_path / "tokens"
    with pytest.raises(KeyboardInterrupt):
        run(prepared_shards, exports, out)
    monkeypatch.setattr(tokenize_shards, "encode_token_sample", real)
    assert len(list((out / ".units").glob("*.json"))) == 2  # two input shards were finished and published
    manifest, totals = run(prepared_shards, exports, out)
    assert totals["resumed_units"] == 2 and totals["written"] == 4 and manifest["complete"]
    resumed = token_samples(out)
    assert set(resumed) == set(reference) and len(resumed) == manifest["written"] == 8
    assert all(resumed[k]["ids.npy"] == reference[k]["ids.npy"] for k in reference)
    assert not (out / ".partial").exists()


def test_parts_share_one_output_and_motion_only_shards(prepared_shards, exports, tmp_path):
    out = tmp_path / "tokens"
    first, _ = run(prepared_shards, exports, out, part=0, num_parts=2, keyframes=False)
    assert not first["complete"] and first["units_done"] == 2 and first["units_total"] == 4
    second, _ = run(prepared_shards, exports, out, part=1, num_parts=2, keyframes=False)
    assert second["complete"] and second["written"] == 8
    assert second["fingerprint"] == exports_fingerprint(exports, None) and second["codes"]["visual_codes"] is None
    samples = token_samples(out)
    assert len(samples) == 8 and all(json.loads(raw["json"])["keyframe_lengths"] is None for raw in samples.values())
    sample = decode_token_sample(next(iter(samples.values())), VOCAB, need_keyframes=False)
    assert sample.motions.shape == (2, 16) and sample.keyframes is None  # 2 clips x 16 motion codes


def test_undecodable_samples_are_counted_skips(exports, tmp_path):
    import webdataset as wds

    from datamodules.sample_format import encode_sample

    shards = tmp_path / "shards"
    shards.mkdir()
    meta = {"source_id": "short", "width": 96, "height": 96, "fps": 6, "num_frames": 20, "iframes": [0, 12]}
    with wds.TarWriter(str(shards / "bad-000.tar")) as sink:
        sink.write(encode_sample("short", "c", meta, b"", np.zeros((20, 2, 6, 6), np.float16)))
        sink.write({"__key__": "broken", "txt": b"c", "json": b"{not json", "mp4": b"", "motion.npy": b"x"})
    manifest, _ = run(str(shards / "bad-000.tar"), exports, tmp_path / "tokens")  # named: no manifest
    assert manifest["written"] == 0 and manifest["skipped"] == {"too_short": 1, "corrupt_sample": 1}
    lines = [json.loads(line) for line in (tmp_path / "tokens" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(item["key"] for item in lines) == ["broken", "short"]
