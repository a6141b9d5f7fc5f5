"""Pre-training sequences: golden ids for video-text pairs, packing, the block-causal mask, and the
packing contract with transformers' LlamaForCausalLM (a document's logits do not change when packed)."""

import itertools
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from videolavit.llm.sequences import (
    IGNORE_INDEX,
    PAD_DOCUMENT_ID,
    PackingStats,
    SourceMixer,
    TokenSequence,
    additive_attention_mask,
    block_causal_mask,
    collate_packed_rows,
    image_token_ids,
    multimodal_pair,
    pack_documents,
    split_document,
    text_document,
    video_token_ids,
)
from videolavit.llm.vocabulary import Vocabulary, VocabularyError

X = IGNORE_INDEX
# [IMG]=10 [/IMG]=11 keyframe codes 12..16 [MOV]=17 [/MOV]=18 motion codes 19..21
TINY = Vocabulary(text_size=10, visual_codes=5, motion_codes=3)
BOS, EOS = 1, 2


def _video():
    return video_token_ids([[0, 3], [4]], [[1, 2], [0, 0]], TINY)


def test_video_token_ids_golden():
    assert _video() == [10, 12, 15, 11, 17, 20, 21, 18, 10, 16, 11, 17, 19, 19, 18]
    assert image_token_ids(torch.tensor([2, 2]), TINY) == [10, 14, 14, 11]


def test_release_video_token_ids():
    ids = video_token_ids([[0, 16383]], [[0] * 134 + [1023]], Vocabulary.release(), motion_length=135)
    assert ids[:4] == [32000, 32002, 48385, 32001]
    assert ids[4:6] == [48386, 48388] and ids[-2:] == [49411, 48387] and len(ids) == 4 + 137


@pytest.mark.parametrize("kwargs", [
    dict(keyframe_codes=[[0]], motion_codes=[[0], [1]]),
    dict(keyframe_codes=[], motion_codes=[]),
    dict(keyframe_codes=[[]], motion_codes=[[0]]),
    dict(keyframe_codes=[[5]], motion_codes=[[0]]),
    dict(keyframe_codes=[[0]], motion_codes=[[3]]),
    dict(keyframe_codes=[[0]], motion_codes=[[0, 1]], motion_length=3),
])
def test_video_token_ids_refuses_bad_input(kwargs):
    with pytest.raises(ValueError):
        video_token_ids(vocab=TINY, **kwargs)


def test_pair_video_text_golden():
    seq = multimodal_pair(_video(), [5, 6, 7], TINY, order="visual_text", bos_id=BOS, eos_id=EOS)
    assert seq.input_ids == [1, 10, 12, 15, 11, 17, 20, 21, 18, 10, 16, 11, 17, 19, 19, 18, 5, 6, 7, 2]
    assert seq.labels == [X, 10, 12, 15, 11, 17, 20, 21, 18, 10, 16, 11, 17, 19, 19, 18, 5, 6, 7, 2]


def test_pair_text_video_golden():
    seq = multimodal_pair(_video(), [5, 6, 7], TINY, order="text_visual", bos_id=BOS, eos_id=EOS)
    assert seq.input_ids == [1, 5, 6, 7, 10, 12, 15, 11, 17, 20, 21, 18, 10, 16, 11, 17, 19, 19, 18, 2]
    assert seq.labels == [X, 5, 6, 7, 10, 12, 15, 11, 17, 20, 21, 18, 10, 16, 11, 17, 19, 19, 18, 2]


def test_pair_target_only_supervision_golden():
    understand = multimodal_pair(_video(), [5, 6, 7], TINY, order="visual_text", bos_id=BOS, eos_id=EOS,
                                 supervise="target")
    assert understand.labels == [X] * 16 + [5, 6, 7, 2]
    generate = multimodal_pair(_video(), [5, 6, 7], TINY, order="text_visual", bos_id=BOS, eos_id=EOS,
                               supervise="target")
    assert generate.labels == [X, X, X, X, 10, 12, 15, 11, 17, 20, 21, 18, 10, 16, 11, 17, 19, 19, 18, 2]


def test_release_generation_prompt_form_without_bos():
    seq = multimodal_pair(image_token_ids([0], TINY), [5], TINY, order="text_visual", bos_id=None, eos_id=None)
    assert seq.input_ids == [5, 10, 12, 11] and seq.labels == [X, 10, 12, 11]


def test_pair_refuses_swapped_or_bad_inputs():
    with pytest.raises(VocabularyError):
        multimodal_pair([5, 6], _video(), TINY, order="visual_text", bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError):
        multimodal_pair(_video(), [5], TINY, order="video_first", bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError):
        multimodal_pair(_video(), [5], TINY, order="visual_text", bos_id=BOS, eos_id=EOS, supervise="text")


def test_text_document_golden():
    doc = text_document([3, 4, 5], TINY, bos_id=BOS, eos_id=EOS)
    assert (doc.input_ids, doc.labels) == ([1, 3, 4, 5, 2], [X, 3, 4, 5, 2])


# ------------------------------------------------------------------------------------------ packing
A = TokenSequence([1, 3, 4, 2], [X, 3, 4, 2])
B = TokenSequence([1, 5, 2], [X, 5, 2])
C = TokenSequence([1, 6, 7, 8, 9, 2], [X, 6, 7, 8, 9, 2])


def test_pack_golden_row():
    rows = list(pack_documents([A, B, C], seq_len=8, pad_id=0))
    assert len(rows) == 2
    r = rows[0]
    assert r.input_ids.tolist() == [1, 3, 4, 2, 1, 5, 2, 0]
    assert r.labels.tolist() == [X, 3, 4, 2, X, 5, 2, X]
    assert r.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert r.document_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, PAD_DOCUMENT_ID]
    assert r.cu_seqlens.tolist() == [0, 4, 7, 8] and r.cu_seqlens.dtype == torch.int32
    assert r.num_documents == 2
    assert rows[1].input_ids.tolist() == [1, 6, 7, 8, 9, 2, 0, 0]
    assert rows[1].position_ids.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]


def test_labels_never_predict_across_a_boundary():
    # A document whose first label is set (no bos) must still not be predicted from the previous one.
    no_bos = TokenSequence([7, 8], [7, 8])
    row = next(pack_documents([A, no_bos], seq_len=8))
    assert row.labels.tolist() == [X, 3, 4, 2, X, 8, X, X]
    starts = (row.position_ids == 0).nonzero().flatten().tolist()
    assert all(row.labels[s] == X for s in starts)


def test_first_fit_window_pads_less_than_next_fit():
    next_fit = list(pack_documents([A, C, B], seq_len=8, open_rows=1))
    first_fit = list(pack_documents([A, C, B], seq_len=8, open_rows=2))
    assert [r.input_ids.tolist() for r in next_fit] == [
        [1, 3, 4, 2, 0, 0, 0, 0], [1, 6, 7, 8, 9, 2, 0, 0], [1, 5, 2, 0, 0, 0, 0, 0]]
    assert [r.input_ids.tolist() for r in first_fit] == [[1, 3, 4, 2, 1, 5, 2, 0], [1, 6, 7, 8, 9, 2, 0, 0]]


def test_long_document_is_split_with_one_token_overlap_and_nothing_dropped():
    doc = TokenSequence(list(range(100, 111)), [X] + list(range(101, 111)))
    segments = split_document(doc, 5)
    assert [s.input_ids for s in segments] == [[100, 101, 102, 103, 104], [104, 105, 106, 107, 108], [108, 109, 110]]
    assert [s.labels for s in segments] == [[X, 101, 102, 103, 104], [X, 105, 106, 107, 108], [X, 109, 110]]
    stats = PackingStats()
    rows = list(pack_documents([doc, A], seq_len=5, stats=stats))
    targets = [t for r in rows for t in r.labels.tolist() if t != X]
    assert targets == list(range(101, 111)) + [3, 4, 2]
    assert stats.split_documents == 1 and stats.segments == 4 and stats.targets_in == stats.targets_out == 13
    assert all(r.input_ids.numel() == 5 for r in rows)


def test_block_causal_mask_blocks_cross_document_attention():
    mask = block_causal_mask(torch.tensor([0, 0, 1, 1, 1, -1]))
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    additive = additive_attention_mask(mask, torch.bfloat16)
    assert additive.shape == (1, 1, 6, 6) and additive.dtype == torch.bfloat16
    assert additive[0, 0, 3, 2] == 0 and additive[0, 0, 3, 1] == torch.finfo(torch.bfloat16).min
    assert block_causal_mask(torch.tensor([[0, 1], [0, 0]])).shape == (2, 2, 2)


def test_collate_flattens_cu_seqlens_over_the_batch():
    rows = list(pack_documents([A, B, C], seq_len=8))
    batch = collate_packed_rows(rows, attention="additive")
    assert batch["input_ids"].shape == (2, 8)
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 8, 14, 16]
    assert batch["max_seqlen"] == 6
    assert batch["attention_mask"].shape == (2, 1, 8, 8)


# ------------------------------------------------------------------ packing contract with LlamaForCausalLM
def _tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    return model


def _random_doc(generator, n):
    ids = torch.randint(3, 64, (n,), generator=generator).tolist()
    return TokenSequence([1, *ids], [X, *ids])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_document_logits_equal_document_alone(attn):
    model = _tiny_llama(attn)
    g = torch.Generator().manual_seed(1)
    first, target, last = _random_doc(g, 6), _random_doc(g, 9), _random_doc(g, 4)
    row = next(pack_documents([first, target, last], seq_len=24, pad_id=0))
    assert row.num_documents == 3
    where = slice(7, 17)  # the target document sits after the 7-token first document
    assert row.input_ids[where].tolist() == target.input_ids
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([target.input_ids])).logits[0]
        batch = collate_packed_rows([row], attention="additive")
        explicit = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=batch["attention_mask"]).logits[0, where]
        batch = collate_packed_rows([row], attention="position_ids")
        detected = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).logits[0, where]
        # The pitfalls: a 2-D mask of ones, or a KV cache (use_cache defaults to True), switches off
        # transformers' packing detection, and documents leak into each other.
        leaky_mask = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           attention_mask=torch.ones_like(batch["input_ids"])).logits[0, where]
        leaky_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, where]
    torch.testing.assert_close(explicit, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(detected, alone, atol=1e-5, rtol=1e-5)
    assert (leaky_mask - alone).abs().max() > 1e-3
    assert (leaky_cache - alone).abs().max() > 1e-3


def test_packed_loss_equals_loss_of_documents_alone():
    model = _tiny_llama("sdpa")
    g = torch.Generator().manual_seed(2)
    docs = [_random_doc(g, n) for n in (5, 11, 3, 7)]
    rows = list(pack_documents(docs, seq_len=16, open_rows=2))
    batch = collate_packed_rows(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       labels=batch["labels"], use_cache=False).loss
        total, count = 0.0, 0
        for d in docs:
            out = model(input_ids=torch.tensor([d.input_ids]), labels=torch.tensor([d.labels]))
            n = sum(1 for t in d.labels[1:] if t != X)
            total, count = total + out.loss * n, count + n
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ mixing
def test_source_mixer_is_seeded_and_follows_weights():
    sources = {"video": itertools.repeat("v"), "image": itertools.repeat("i"), "text": itertools.repeat("t")}
    weights = {"video": 0.6, "image": 0.3, "text": 0.1}

    def draw(seed, n):
        return [name for name, _ in itertools.islice(SourceMixer(sources, weights, seed=seed), n)]

    assert draw(0, 200) == draw(0, 200)
    assert draw(0, 200) != draw(1, 200)
    counts = Counter(draw(3, 20000))
    assert abs(counts["video"] / 20000 - 0.6) < 0.02
    assert abs(counts["image"] / 20000 - 0.3) < 0.02
    assert abs(counts["text"] / 20000 - 0.1) < 0.02


def test_source_mixer_exhaustion_policies():
    sources = {"a": range(3), "b": range(100, 110), "never": range(5)}
    weights = {"a": 1.0, "b": 1.0, "never": 0.0}
    dropped = list(SourceMixer(sources, weights, seed=0, on_exhausted="drop"))
    assert sorted(item for _, item in dropped) == list(range(3)) + list(range(100, 110))
    assert all(name != "never" for name, _ in dropped)
    stopped = list(SourceMixer(sources, weights, seed=0, on_exhausted="stop"))
    assert len(stopped) < 13 and stopped == dropped[:len(stopped)]
    with pytest.raises(ValueError):
        SourceMixer(sources, {"a": 1.0}, seed=0)
    with pytest.raises(ValueError):
        SourceMixer(sources, {"a": -1.0, "b": 1.0, "never": 0.0})
