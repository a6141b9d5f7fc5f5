"""Text-to-video, image-to-video and long video through the whole chain of (tiny, random) exports."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_instruct import VOCAB, build_pretrain_export, tokenizer_dir, tokenizer_exports  # noqa: F401
from tests.test_keyframe_detokenizer import tiny_config
from tests.test_stage_video_detokenizer import DETOKENIZER
from videolavit.commands import generate as generate_command
from videolavit.inference.text_to_video import TextToVideo
from videolavit.models.export import ExportError
from videolavit.models.keyframe_detokenizer import KeyframeDetokenizer, save_keyframe_detokenizer
from videolavit.models.video_detokenizer import (VideoDetokenizer, VideoDetokenizerConfig, VideoDetokenizerSpec,
                                                 save_video_detokenizer)
from videolavit.video.frames import decode_all_frames
from videolavit.video.motion_direction import motion_field_direction

PIXELS = {"class_path": "videolavit.models.latent_space.PixelSpace", "init_args": {}}
FRAME = (16, 16)




@pytest.fixture(scope="module")
def exports(tokenizer_exports, tokenizer_dir, tmp_path_factory) -> Path:  # noqa: F811
    """Every export the generation chain reads, in one directory as the stages write them."""
    root = tmp_path_factory.mktemp("exports")
    for path in tokenizer_exports.iterdir():
        shutil.copy(path, root / path.name)
    build_pretrain_export(tokenizer_dir, root / "pretrain")
    torch.manual_seed(0)
    config = tiny_config()
    config.num_codes = VOCAB.visual_codes
    save_keyframe_detokenizer(KeyframeDetokenizer(config), root / "keyframe_detokenizer", PIXELS)
    video = VideoDetokenizer(VideoDetokenizerConfig(**DETOKENIZER))
    save_video_detokenizer(video, root / "video_detokenizer", VideoDetokenizerSpec(
        latent_space=PIXELS, frame_size=FRAME, num_frames=24, motion_grid=(8, 8), motion_scale=10.0))
    return root


def fast(**options):
    return {"video_steps": 2, "keyframe_steps": 2, **options}


def test_text_to_video_gives_clips_of_the_right_shape_deterministically(exports):
    pipeline = TextToVideo.from_directory(exports, **fast())
    one = pipeline.generate("a red circle moving to the left", seed=3)
    assert one.dtype == torch.uint8 and one.shape == (24, 3, *FRAME)
    assert torch.equal(one, pipeline.generate("a red circle moving to the left", seed=3))
    assert not torch.equal(one, pipeline.generate("a red circle moving to the left", seed=4))
    frames, clips = pipeline.generate_with_tokens("a red circle moving to the left", seed=3)
    assert torch.equal(frames, one) and len(clips) == 1 and len(clips[0].motion) == pipeline.motion_tokenizer.num_tokens
    batch = pipeline(["a", "b"], torch.Generator().manual_seed(0))  # the evaluation protocol's interface
    assert batch.shape == (2, 24, 3, *FRAME)


def test_generated_codes_stay_in_their_ranges(exports):
    pipeline = TextToVideo.from_directory(exports, **fast())
    clips = pipeline.clip_tokens("a blue star", num_clips=2, generator=torch.Generator().manual_seed(0))
    for clip in clips:
        assert 1 <= len(clip.keyframe) <= pipeline.keyframe_detokenizer.config.decoder.max_codes
        assert all(0 <= c < VOCAB.visual_codes for c in clip.keyframe)
        assert len(clip.motion) == pipeline.motion_tokenizer.num_tokens
        assert all(0 <= c < VOCAB.motion_codes for c in clip.motion)


@pytest.mark.parametrize("start", ["noise", "invert"])
def test_long_video_chains_clips(exports, start):
    pipeline = TextToVideo.from_directory(exports, **fast(long_video_start=start))
    frames = pipeline.generate("a green square", num_clips=2, seed=0)
    assert frames.shape == (48, 3, *FRAME)


def test_image_to_video_starts_from_the_image(exports):
    pipeline = TextToVideo.from_directory(exports, **fast())
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[0] = 200  # a red image
    frames = pipeline.generate("moving up", image=image, seed=0)
    assert frames.shape == (24, 3, *FRAME)
    clips = pipeline.clip_tokens("moving up", image=image, generator=torch.Generator().manual_seed(0))
    assert clips[0].keyframe == []  # its keyframe codes came from the image, in the prompt


def test_missing_exports_are_named(exports, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        TextToVideo.from_directory(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(exports, partial)
    shutil.rmtree(partial / "video_detokenizer")
    with pytest.raises(ExportError, match="video_detokenizer"):
        TextToVideo.from_directory(partial)
    with pytest.raises(TypeError, match="unknown generation options"):
        TextToVideo.from_directory(exports, video_stepz=3)


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate_command.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_generate_command_writes_playable_mp4s(exports, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert generate_command.run(_args(exports=exports, prompt="a red circle", out=out, clips=2, video_steps=2,
                                      keyframe_steps=2)) == 0
    frames = decode_all_frames(out)
    assert frames.shape == (48, *FRAME, 3)
    import av
    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == 6
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star\n")
    assert generate_command.run(_args(exports=exports, prompts_file=prompts, out_dir=tmp_path / "many",
                                      video_steps=2, keyframe_steps=2)) == 0
    assert sorted(p.name for p in (tmp_path / "many").glob("*.mp4")) == ["clip_0000.mp4", "clip_0001.mp4"]
    records = [json.loads(line) for line in (tmp_path / "many" / "generated.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "a blue star"]
    pipeline = TextToVideo.from_directory(exports, **fast())
    for record in records:  # what the LLM wrote, as the pipeline generates it for that prompt and seed
        (clip,) = pipeline.generate_with_tokens(record["prompt"], seed=record["seed"])[1]
        field = pipeline.motion_field(clip.motion)
        assert record["clips"] == [{"keyframe_codes": len(clip.keyframe), "motion_codes": len(clip.motion),
                                    "motion_direction": motion_field_direction(field)}]
        assert record["clips"][0]["motion_direction"] in ("left", "right", "up", "down")
    assert generate_command.run(_args(exports=tmp_path / "missing", prompt="x", out=out)) == 2
    assert "error:" in capsys.readouterr().err


def test_keyframe_sampler_choice_is_checked_against_the_keyframe_detokenizer(exports):
    with pytest.raises(ExportError, match="keyframe_sampler 'ddim'.*discrete scaling"):
        TextToVideo.from_directory(exports, keyframe_sampler="ddim", **fast())
    pipeline = TextToVideo.from_directory(exports, keyframe_sampler="euler", **fast())
    assert pipeline.keyframe_detokenizer.config.diffusion.sampler == "euler"
