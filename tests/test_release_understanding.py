"""The release's understanding model (``language_model_sft/``) imported: keyframes enter the LLM as continuous
features, and ``chat`` gives the release's greedy ids (reference: tests/data/README.md)."""

from __future__ import annotations

import argparse

import pytest
import torch

from tests import release_fixtures as F
from tests.release_fixtures import exports, release  # noqa: F401  (module fixtures, rebuilt for this module)
from videolavit.llm.keyframe_features import KEYFRAME_SLOT_ID, read_keyframe_input


@pytest.fixture(scope="module")
def chat(exports):
    from videolavit.inference.video_chat import VideoChat

    return VideoChat(exports / "instruct", exports, template="video_lavit_release", seed=F.UNDERSTANDING_SEED)


def test_the_sft_export_reads_continuous_keyframes_with_the_checkpoints_own_tokenizers(release, exports):
    from videolavit.models.export import load_export
    from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

    _, made = release
    assert read_keyframe_input(exports / "instruct") == "continuous"
    assert read_keyframe_input(exports / "pretrain") == "codes"
    ours = load_keyframe_tokenizer(exports / "instruct").state_dict()
    source = made["understanding_keyframe"].state_dict()
    assert all(torch.equal(ours[k], source[k]) for k in source if not k.startswith("quantize.cluster"))
    # the generation model's tokenizer is the release's tokenizer_encoder.bin, not the SFT's merger
    generation = load_keyframe_tokenizer(exports).state_dict()
    assert not torch.equal(generation["vit_proj.weight"], ours["vit_proj.weight"])
    motion = load_export(exports / "instruct", "motion_tokenizer").state_dict()
    assert all(torch.equal(motion[k], v) for k, v in made["motion"].state_dict().items() if k in motion)
    from safetensors import safe_open

    with safe_open(str(exports / "instruct" / "model.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if k.startswith(("model.visual_tokenizer.", "model.motion_tokenizer."))]


def test_chat_gives_the_release_greedy_understanding_ids(chat):
    reference = F.load_reference()["llm_understanding_greedy"]
    inputs = F.understanding_inputs()
    ids, features = chat.encode_clips(inputs["keyframes"], inputs["motions"])
    assert [f.shape[1] for f in features] == [32, 32] and ids.count(KEYFRAME_SLOT_ID) == 2
    prompt = chat.prompt_ids(ids, F.UNDERSTANDING_QUESTION)
    start = prompt.index(ids[0])
    assert prompt[:start] + [-201] + prompt[start + len(ids):] == reference["prompt_ids"]
    from videolavit.llm.keyframe_features import splice_keyframe_features

    embeds = splice_keyframe_features(chat.model.get_input_embeddings(), [prompt], [features])["inputs_embeds"]
    assert embeds.shape[1] == reference["embedding_rows"]
    assert F.max_relative_difference(embeds[0], reference["embeddings"]) < 1e-5
    assert chat.min_new_tokens == reference["min_new_tokens"]
    out = chat.generate_ids([prompt], [features], max_new_tokens=reference["max_new_tokens"])[0]
    assert out == reference["output_ids"]


def test_gradients_reach_the_merger_and_vit_proj_only(exports):
    from videolavit.llm.keyframe_features import continuous_keyframe_features
    from videolavit.models.keyframe_tokenizer_export import load_keyframe_tokenizer

    tokenizer = load_keyframe_tokenizer(exports / "instruct").requires_grad_(True)
    features = continuous_keyframe_features(tokenizer, F.understanding_inputs()["keyframes"])
    torch.cat(features).square().sum().backward()
    touched = {name.split(".")[0] for name, p in tokenizer.named_parameters() if p.grad is not None
               and p.grad.abs().sum() > 0}
    assert touched == {"causal_encoder", "vit_proj"}


def test_chat_command_answers_about_a_video_with_the_imported_sft_model(exports, tmp_path, capsys):
    from tests.video_factory import write_moving_square
    from videolavit.commands import chat as command

    video = write_moving_square(tmp_path / "clip.mp4", seconds=9.0)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--model", str(exports / "instruct"), "--video", str(video), "--question",
                              "what moves?", "--max-new-tokens", "10", "--template", "video_lavit_release"])
    assert command.run(args) == 0
    answer = capsys.readouterr().out.strip()
    assert answer  # min_new_tokens 8: the release's runner never answers with nothing
