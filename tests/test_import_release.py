"""`import-release`: a fabricated release-layout directory (random weights, reduced sizes) imports into our
exports layout; every import computes what its source module computes; bad directories get named errors."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from tests.release_fixtures import exports, release  # noqa: F401  (module fixtures, rebuilt for this module)
from videolavit.release.importer import ReleaseImportError, import_release


def test_tokenizers_give_the_source_ids(release, exports):
    from videolavit.models.export import load_export
    from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

    _, made = release
    motion = torch.randn(2, 2, 24, 20, 36, generator=torch.Generator().manual_seed(0))
    imported = load_export(exports, "motion_tokenizer").eval()
    with torch.no_grad():
        assert torch.equal(imported.encode(motion), made["motion"].encode(motion))
    keyframe = load_keyframe_tokenizer(exports).eval()
    size = keyframe.config.vit.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, source = keyframe.tokenize(images), made["keyframe"].tokenize(images)
    assert all(torch.equal(a, b) for a, b in zip(ours, source))


def test_detokenizers_compute_what_the_source_modules_compute(release, exports):
    from videolavit.models.keyframe_detokenizer import load_keyframe_detokenizer
    from videolavit.models.latent_space import build_latent_space
    from videolavit.models.video_detokenizer import load_video_detokenizer, read_video_detokenizer_spec

    _, made = release
    g_i = load_keyframe_detokenizer(exports / "keyframe_detokenizer")
    assert g_i.config.diffusion.sampler == "ddim" and g_i.config.diffusion.scheduler["set_alpha_to_one"] is False
    cond = g_i.conditioning(torch.tensor([[3, 9, 27, -1]]))
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(g_i.unet(x, torch.tensor([500.0]), **cond), made["image_unet"](x, torch.tensor([500.0]), **cond))
    assert build_latent_space(g_i.latent_space_spec).channels == 4  # the VAE, re-written as safetensors

    g_v, space = load_video_detokenizer(exports / "video_detokenizer")
    assert g_v.config.is_release and read_video_detokenizer_spec(exports / "video_detokenizer").motion_grid == (20, 36)
    source = made["video"]
    state = source.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in g_v.state_dict().items())
    assert build_latent_space(space).temporal_decoder


def test_imported_detokenizers_are_diffusers_directories_without_absolute_paths(release, exports):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from videolavit.models.video_unet import VideoUNet

    _, made = release
    unet = UNet2DConditionModel.from_pretrained(str(exports / "keyframe_detokenizer" / "unet")).eval()
    source = made["image_unet"].net.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in unet.state_dict().items())
    assert DDIMScheduler.from_pretrained(str(exports / "keyframe_detokenizer" / "scheduler")).config.set_alpha_to_one is False
    video_unet = VideoUNet.from_pretrained(str(exports / "video_detokenizer" / "unet"))
    assert video_unet.video_config.temporal_context_resize == "nearest"  # the release behaviour
    for name in ("keyframe_detokenizer", "video_detokenizer"):
        texts = [p.read_text() for p in (exports / name).rglob("*.json")]
        assert texts and not [t for t in texts if str(exports) in t or '"/' in t], name


def test_llms_get_safetensors_a_fast_tokenizer_and_the_release_vocabulary(release, exports):
    from videolavit.inference.video_chat import load_llm, read_llm_vocabulary
    from videolavit.llm.text_tokenizer import load_text_tokenizer
    from videolavit.release.layout import read_behaviour

    _, made = release
    for name, export in (("language_model", "pretrain"), ("language_model_sft", "instruct")):
        directory = exports / export
        assert not list(directory.glob("*.bin")) and (directory / "model.safetensors").is_file()
        vocab = read_llm_vocabulary(directory)
        assert (vocab.text_size, vocab.visual_codes, vocab.motion_codes) == (300, 64, 1024)
        assert load_text_tokenizer(directory, vocab).is_fast
        assert read_behaviour(directory)["llm_generation"] == "release"
        assert (directory / "visual_weight.safetensors").is_file()
        ids = torch.tensor([[1, 5, vocab.image_start_id, vocab.visual_offset + 3]])
        with torch.no_grad():
            assert torch.equal(load_llm(directory)(ids).logits, made["llms"][name](ids).logits)


@pytest.mark.slow
def test_text_to_video_runs_from_the_imports_with_the_release_behaviour(exports):
    from videolavit.inference.text_to_video import TextToVideo

    pipeline = TextToVideo.from_directory(exports, video_steps=2, keyframe_steps=2)
    assert pipeline.options.llm_behaviour == "release"
    frames = pipeline.generate("a red circle", seed=0)
    assert frames.shape == (24, 3, 32, 32) and frames.dtype == torch.uint8


def _copy(release, tmp_path):
    directory, made = release
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    return copy, made["sizes"]


def test_missing_unexpected_and_mis_shaped_parts_are_named(release, tmp_path):
    copy, sizes = _copy(release, tmp_path)
    (copy / "notes.txt").write_text("?")
    with pytest.raises(ReleaseImportError, match=r"unexpected entries.*notes\.txt"):
        import_release(copy, tmp_path / "out", sizes)
    (copy / "notes.txt").unlink()
    (copy / "motion_tokenizer.bin").rename(copy / "motion_tokenizer.old")
    with pytest.raises(ReleaseImportError, match="unexpected entries"):
        import_release(copy, tmp_path / "out", sizes)
    (copy / "motion_tokenizer.old").unlink()
    with pytest.raises(ReleaseImportError, match=r"missing the motion tokenizer.*motion_tokenizer\.bin"):
        import_release(copy, tmp_path / "out", sizes)
    shutil.copy(release[0] / "motion_tokenizer.bin", copy / "motion_tokenizer.bin")
    state = torch.load(copy / "motion_tokenizer.bin", weights_only=True)
    state["encoder.pos_embed"] = state["encoder.pos_embed"][:, :10]
    state["encoder.extra"] = torch.zeros(1)
    torch.save(state, copy / "motion_tokenizer.bin")
    with pytest.raises(ReleaseImportError, match=r"1 unexpected \['encoder.extra'\].*mis-shaped \['encoder.pos_embed"):
        import_release(copy, tmp_path / "out", sizes)
    shutil.copy(release[0] / "motion_tokenizer.bin", copy / "motion_tokenizer.bin")
    (copy / "video_detokenizer" / "unet" / "video_3d_unet.bin").unlink()
    with pytest.raises(ReleaseImportError, match="missing the g_V weights"):
        import_release(copy, tmp_path / "out", sizes)


def test_pickled_code_is_refused(release, tmp_path):
    copy, sizes = _copy(release, tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"encoder.pos_embed": Payload()}, copy / "motion_tokenizer.bin")
    with pytest.raises(ReleaseImportError, match="weights_only"):
        import_release(copy, tmp_path / "out", sizes)


def test_import_command(release, tmp_path, capsys):
    from videolavit.commands import import_release as command

    directory, made = release
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps(made["sizes"]))
    args = argparse.Namespace(release=str(directory), out=str(tmp_path / "exports"), sizes=str(sizes))
    assert command.run(args) == 0
    assert "imported motion_tokenizer" in capsys.readouterr().out
    bad = argparse.Namespace(release=str(tmp_path / "nowhere"), out=str(tmp_path / "x"), sizes=None)
    assert command.run(bad) == 2
    assert "does not exist" in capsys.readouterr().err
