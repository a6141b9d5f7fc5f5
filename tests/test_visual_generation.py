"""LLM sampling of clip code blocks: structure, code ranges, determinism, guidance, image-to-video prompts."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from videolavit.llm.sequences import image_token_ids
from videolavit.llm.visual_generation import SamplingOptions, generate_clips
from videolavit.llm.vocabulary import Vocabulary

VOCAB = Vocabulary(text_size=300, visual_codes=40, motion_codes=30)


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=VOCAB.size, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _options(**kw):
    return SamplingOptions(**{"motion_length": 6, "keyframe_max_length": 5, **kw})


def test_clips_have_the_right_blocks_and_ranges(llm):
    clips = generate_clips(llm, VOCAB, [1, 17, 42], 3, _options(), generator=torch.Generator().manual_seed(0))
    assert len(clips) == 3
    for clip in clips:
        assert 1 <= len(clip.keyframe) <= 5
        assert all(0 <= c < VOCAB.visual_codes for c in clip.keyframe)
        assert len(clip.motion) == 6
        assert all(0 <= c < VOCAB.motion_codes for c in clip.motion)


def test_deterministic_given_a_seed_and_greedy_is_seedless(llm):
    run = lambda seed, **kw: generate_clips(llm, VOCAB, [1, 5], 2, _options(**kw),  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed))
    assert run(3) == run(3)
    assert run(3) != run(4)
    assert run(0, temperature=0.0) == run(1, temperature=0.0)


def test_keyframe_temperature_applies_to_the_keyframe_block_only(llm):
    run = lambda seed, **kw: generate_clips(llm, VOCAB, [1, 5], 1, _options(**kw),  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed))[0]
    # Greedy keyframes, sampled motion: the keyframes agree across seeds, the motion does not.
    greedy_keyframe = [run(seed, temperature=1.0, keyframe_temperature=0.0) for seed in range(4)]
    assert all(clip.keyframe == greedy_keyframe[0].keyframe for clip in greedy_keyframe)
    assert len({tuple(clip.motion) for clip in greedy_keyframe}) > 1
    # The other way round: sampled keyframes, and the motion after each is the greedy one for that keyframe.
    sampled_keyframe = [run(seed, temperature=0.0, keyframe_temperature=1.0) for seed in range(4)]
    assert len({tuple(clip.keyframe) for clip in sampled_keyframe}) > 1
    for clip in sampled_keyframe:
        prompt = [1, 5, *image_token_ids(clip.keyframe, VOCAB), VOCAB.motion_start_id]
        again = generate_clips(llm, VOCAB, prompt, 1, _options(temperature=0.0))[0]
        assert again.motion == clip.motion


def test_guidance_scale_one_equals_the_unguided_path(llm):
    opts = _options(keyframe_guidance=1.0, motion_guidance=1.0, temperature=0.0)
    greedy = generate_clips(llm, VOCAB, [1, 9, 10], 1, opts)
    # The unguided result is the argmax of the plain constrained logits, computed here step by step.
    ids = [1, 9, 10, VOCAB.image_start_id]
    clip_codes = []
    while len(clip_codes) < len(greedy[0].keyframe):
        logits = llm(torch.tensor([ids])).logits[0, -1]
        token = int(logits[VOCAB.visual_range.start:VOCAB.visual_range.stop].argmax()) + VOCAB.visual_offset
        if len(clip_codes) >= 1 and logits[VOCAB.image_end_id] > logits[token]:
            break
        clip_codes.append(token - VOCAB.visual_offset)
        ids.append(token)
    assert clip_codes == greedy[0].keyframe
    guided = generate_clips(llm, VOCAB, [1, 9, 10], 1, _options(temperature=0.0, keyframe_guidance=50.0,
                                                               motion_guidance=50.0))
    assert guided != greedy  # a strong guidance scale changes the choice


def test_image_to_video_prompt_generates_motion_only(llm):
    prompt = [1, 7] + image_token_ids([3, 4, 5], VOCAB) + [VOCAB.motion_start_id]
    clips = generate_clips(llm, VOCAB, prompt, 2, _options(), generator=torch.Generator().manual_seed(0))
    assert clips[0].keyframe == [] and len(clips[0].motion) == 6
    assert len(clips[1].keyframe) >= 1 and len(clips[1].motion) == 6


def test_num_clips_must_be_positive(llm):
    with pytest.raises(ValueError, match="num_clips"):
        generate_clips(llm, VOCAB, [1], 0, _options())
