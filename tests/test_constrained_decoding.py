"""Constrained decoding: sampled ids stay in their code range, motion blocks have the fixed length and
are closed, CFG matches its formula, and the processors plug into transformers' generate."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from videolavit.llm.constrained_decoding import (
    KEYFRAME_GUIDANCE_SCALE,
    MOTION_GUIDANCE_SCALE,
    MOTION_LENGTH,
    TextOnlyConstraint,
    VisualBlockConstraint,
    classifier_free_guidance,
)
from videolavit.llm.vocabulary import Modality, Vocabulary

# [IMG]=10 [/IMG]=11 keyframe 12..19 [MOV]=20 [/MOV]=21 motion 22..27
TINY = Vocabulary(text_size=10, visual_codes=8, motion_codes=6)


def _sample(constraint, prompt, steps, generator, vocab_size=TINY.size + 3):
    """Sample with random logits (scaled up so that unconstrained ids would be drawn often)."""
    ids = prompt.clone()
    for _ in range(steps):
        logits = torch.randn(ids.shape[0], vocab_size, generator=generator) * 5
        logits[:, :TINY.text_size] += 3  # tempt the sampler towards text ids
        probs = torch.softmax(constraint(ids, logits), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


def test_sampled_ids_never_leave_their_range_and_motion_has_fixed_length():
    g = torch.Generator().manual_seed(0)
    constraint = VisualBlockConstraint(TINY, motion_length=5, keyframe_min_length=2, keyframe_max_length=7)
    prompt = torch.tensor([[1, 4, 5, TINY.image_start_id]] * 64)
    # at most 7 keyframe codes + [/IMG] + [MOV] + 5 motion codes + [/MOV] = 15 tokens: every row completes
    out = _sample(constraint, prompt, steps=15, generator=g)[:, 4:].tolist()
    lengths = set()
    for row in out:
        close = row.index(TINY.image_end_id)
        keyframe, after = row[:close], row[close + 1:]
        assert 2 <= len(keyframe) <= 7 and all(TINY.is_visual(keyframe)), row
        assert after[0] == TINY.motion_start_id, row
        assert all(TINY.is_motion(after[1:6])) and after[6] == TINY.motion_end_id, row
        lengths.add(len(keyframe))
    assert len(lengths) > 1  # the keyframe length is the model's choice within the bounds


def test_many_random_steps_keep_every_block_well_formed():
    g = torch.Generator().manual_seed(1)
    constraint = VisualBlockConstraint(TINY, motion_length=4, keyframe_max_length=6)
    out = _sample(constraint, torch.tensor([[TINY.image_start_id]] * 32), steps=80, generator=g)
    modality = TINY.modality_of(out.clamp(max=TINY.size - 1))
    for row, kinds in zip(out.tolist(), modality.tolist()):
        i = 0
        while i < len(row):
            if row[i] == TINY.image_start_id:
                j = row.index(TINY.image_end_id, i) if TINY.image_end_id in row[i:] else len(row)
                assert all(k == Modality.KEYFRAME for k in kinds[i + 1:j]) and j - i - 1 <= 6
                if j + 1 < len(row):
                    assert row[j + 1] == TINY.motion_start_id
                i = j + 1
            elif row[i] == TINY.motion_start_id:
                body = row[i + 1:i + 5]
                assert all(TINY.is_motion(body))
                if i + 5 < len(row):
                    assert row[i + 5] == TINY.motion_end_id
                i += 6
            else:
                i += 1  # outside blocks anything may follow, including ids beyond the vocabulary


def test_motion_block_is_forced_closed_at_exactly_the_fixed_length():
    v = Vocabulary.release()
    constraint = VisualBlockConstraint(v)
    assert constraint.motion_length == MOTION_LENGTH == 135
    prefix = [v.image_start_id, v.visual_id(3), v.image_end_id, v.motion_start_id]
    scores = torch.zeros(1, v.size)
    for n, expect in [(0, "codes"), (134, "codes"), (135, "close")]:
        ids = torch.tensor([prefix + [v.motion_id(0)] * n])
        allowed = torch.isfinite(constraint(ids, scores))[0]
        if expect == "codes":
            assert allowed.nonzero().flatten().tolist() == list(v.motion_range)
        else:
            assert allowed.nonzero().flatten().tolist() == [v.motion_end_id]
    after_keyframe = torch.isfinite(constraint(torch.tensor([prefix[:3]]), scores))[0]
    assert after_keyframe.nonzero().flatten().tolist() == [v.motion_start_id]
    inside_keyframe = torch.isfinite(constraint(torch.tensor([prefix[:2]]), scores))[0]
    assert inside_keyframe.nonzero().flatten().tolist() == [v.image_end_id] + list(v.visual_range)


def test_rows_in_different_states_are_constrained_independently():
    constraint = VisualBlockConstraint(TINY, motion_length=2, keyframe_min_length=1, keyframe_max_length=None)
    ids = torch.tensor([[3, 3, 3, 3, 10],        # just opened a keyframe: codes only
                        [10, 12, 11, 20, 22],    # one motion code of two: motion only
                        [10, 12, 11, 20, 22, 22][1:],  # two motion codes: close
                        [20, 22, 22, 21, 4]])    # after a closed block: free
    allowed = torch.isfinite(constraint(ids, torch.zeros(4, TINY.size)))
    assert allowed[0].nonzero().flatten().tolist() == list(TINY.visual_range)
    assert allowed[1].nonzero().flatten().tolist() == list(TINY.motion_range)
    assert allowed[2].nonzero().flatten().tolist() == [TINY.motion_end_id]
    assert bool(allowed[3].all())


def test_text_only_constraint():
    scores = TextOnlyConstraint(TINY)(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, TINY.size + 2))
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == list(range(TINY.text_size))


def test_classifier_free_guidance_formula():
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(3, 11, generator=g), torch.randn(3, 11, generator=g)
    raw = classifier_free_guidance(cond, uncond, 4.0, log_softmax_first=False)
    torch.testing.assert_close(raw, uncond + 4.0 * (cond - uncond))
    normalised = classifier_free_guidance(cond, uncond, 7.0)
    lc, lu = torch.log_softmax(cond, -1), torch.log_softmax(uncond, -1)
    torch.testing.assert_close(normalised, lu + 7.0 * (lc - lu))
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), lc)
    assert (KEYFRAME_GUIDANCE_SCALE, MOTION_GUIDANCE_SCALE) == (4.0, 7.0)
    with pytest.raises(ValueError):
        classifier_free_guidance(cond, uncond[:, :5], 2.0)


def test_processor_plugs_into_transformers_generate():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY.size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    constraint = VisualBlockConstraint(TINY, motion_length=3, keyframe_min_length=2, keyframe_max_length=2)
    prompt = torch.tensor([[1, 5, 6, TINY.image_start_id]])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=8,
                         logits_processor=LogitsProcessorList([constraint]), eos_token_id=TINY.motion_end_id,
                         pad_token_id=0)
    generated = out[0, prompt.shape[1]:].tolist()
    assert len(generated) == 8
    assert all(TINY.is_visual(generated[:2]))
    assert generated[2:4] == [TINY.image_end_id, TINY.motion_start_id]
    assert all(TINY.is_motion(generated[4:7])) and generated[7] == TINY.motion_end_id
