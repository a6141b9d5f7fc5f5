"""Text decoding through transformers' ``generate``: greedy ids equal the hand-written loop it replaced."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from videolavit.inference.video_chat import generate_text
from videolavit.llm.constrained_decoding import TextOnlyConstraint
from videolavit.llm.vocabulary import Vocabulary

VOCAB = Vocabulary(text_size=300, visual_codes=16, motion_codes=32)
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1, 30, VOCAB.image_start_id, 40, VOCAB.image_end_id, 33]]


@torch.inference_mode()
def reference_loop(model, prompts, vocabulary, eos_id, pad_id, max_new_tokens):
    """The greedy loop ``generate_text`` ran before it used ``generate`` (kept as the reference)."""
    constraint = TextOnlyConstraint(vocabulary)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    history = ids
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    produced = [[] for _ in prompts]
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        token = constraint(history, logits.float()).argmax(-1)
        for row, value in enumerate(token.tolist()):
            if not finished[row]:
                if value == eos_id:
                    finished[row] = True
                else:
                    produced[row].append(value)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        history = torch.cat([history, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                    past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        next_position = next_position + 1
    return produced


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB.size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    llm = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make the non-text rows the likeliest, so the constraint has work to do
        llm.lm_head.weight[VOCAB.text_size:] *= 4
    return llm


def test_greedy_ids_equal_the_old_loop(model):
    theirs = reference_loop(model, PROMPTS, VOCAB, eos_id=2, pad_id=0, max_new_tokens=12)
    ours = generate_text(model, PROMPTS, vocabulary=VOCAB, eos_id=2, pad_id=0, max_new_tokens=12)
    assert ours == theirs and all(len(row) == 12 for row in ours)
    assert all(0 <= i < VOCAB.text_size for row in ours for i in row)
    with torch.no_grad():  # without the constraint the model would pick a non-text id
        assert int(model(torch.tensor([PROMPTS[0]])).logits[0, -1].argmax()) >= VOCAB.text_size


def test_rows_stop_at_eos_as_in_the_old_loop(model):
    free = generate_text(model, PROMPTS, vocabulary=VOCAB, eos_id=2, pad_id=0, max_new_tokens=8)
    eos = free[1][2]  # the third token of row 1 becomes eos: row 1 stops there, the others may too
    theirs = reference_loop(model, PROMPTS, VOCAB, eos_id=eos, pad_id=0, max_new_tokens=8)
    ours = generate_text(model, PROMPTS, vocabulary=VOCAB, eos_id=eos, pad_id=0, max_new_tokens=8)
    assert ours == theirs
    assert ours[1] == free[1][:2] and all(eos not in row for row in ours)


def test_split_vocabulary_rows_of_the_stage_generate_the_same(model):
    from copy import deepcopy

    from stages.pretrain import split_vocabulary_rows

    split = deepcopy(model)
    split_vocabulary_rows(split, VOCAB.text_size)
    assert (generate_text(split, PROMPTS, vocabulary=VOCAB, eos_id=2, pad_id=0, max_new_tokens=6)
            == generate_text(model, PROMPTS, vocabulary=VOCAB, eos_id=2, pad_id=0, max_new_tokens=6))


def test_sampling_is_seeded_text_only_and_top_p_near_zero_is_greedy(model):
    kwargs = dict(vocabulary=VOCAB, eos_id=2, pad_id=0, max_new_tokens=10, do_sample=True, temperature=1.5)
    first = generate_text(model, PROMPTS, seed=3, **kwargs)
    assert first == generate_text(model, PROMPTS, seed=3, **kwargs)
    assert first != generate_text(model, PROMPTS, seed=4, **kwargs)
    assert all(0 <= i < VOCAB.text_size for row in first for i in row)
    greedy = generate_text(model, PROMPTS, vocabulary=VOCAB, eos_id=2, pad_id=0, max_new_tokens=10)
    assert generate_text(model, PROMPTS, seed=3, **{**kwargs, "top_p": 1e-6}) == greedy
    with pytest.raises(ValueError, match="temperature"):
        generate_text(model, PROMPTS, seed=3, **{**kwargs, "temperature": 0.0})
