"""The LLM export's tokenizer: named block markers at their vocabulary ids, and a chat template that renders
the conversation format the instruct stage trains on."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer, LlamaTokenizer

from stages.pretrain import PretrainStage
from videolavit.llm.conversation import LLAVA_V1, VIDEO_LAVIT_RELEASE, Message, encode_rendered
from videolavit.llm.text_tokenizer import (BLOCK_MARKERS, TokenizerMismatchError, build_tiny_tokenizer,
                                           load_text_tokenizer, with_block_markers)
from videolavit.llm.vocabulary import Vocabulary
from videolavit.synth.moving_shapes import plan_corpus

VOCAB = Vocabulary(text_size=300, visual_codes=16, motion_codes=32)
LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
CAPTIONS = [spec.caption for spec in plan_corpus(24, seed=0)]
TEXTS = CAPTIONS + ["What shape is moving? A circle. Which colour? Red [IMG] USER ASSISTANT"]
TURNS = [{"role": "user", "content": "What shape is moving?"}, {"role": "assistant", "content": "A red circle."},
         {"role": "user", "content": "Which way does it go?"}]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A pretrain export of a tiny stage (written by the stage's own export)."""
    root = tmp_path_factory.mktemp("export_tokenizer")
    build_tiny_tokenizer(root / "tok", TEXTS, vocab_size=VOCAB.text_size)
    stage = PretrainStage(tokenizer_path=str(root / "tok"), vocabulary=VOCAB, llm_config=LLM)
    stage.export(root / "export")
    return root / "export"


def ours(turns):
    return [Message(t["role"], t["content"]) for t in turns]


def test_exported_markers_are_named_special_tokens_at_the_vocabulary_ids(export_dir):
    tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    assert tokenizer.convert_tokens_to_ids(list(BLOCK_MARKERS)) == list(VOCAB.special_ids) == [300, 301, 318, 319]
    assert set(BLOCK_MARKERS) <= set(tokenizer.all_special_tokens)
    assert tokenizer.convert_ids_to_tokens(list(VOCAB.special_ids)) == list(BLOCK_MARKERS)
    # Text ids are unchanged: every id below text_size keeps its token, and no text id is at or above [IMG].
    source = AutoTokenizer.from_pretrained(export_dir.parent / "tok", local_files_only=True)
    text_vocab = {t: i for t, i in tokenizer.get_vocab().items() if t not in BLOCK_MARKERS}
    assert text_vocab == source.get_vocab() and max(text_vocab.values()) == VOCAB.text_size - 1
    for text in CAPTIONS[:8] + ["a literal [IMG] and [/MOV] typed by a user"]:
        assert (tokenizer(text, split_special_tokens=True).input_ids == source(text).input_ids)
    # Unsplit, a marker in text is its id; decoding skips it as a special token.
    ids = tokenizer("red [MOV] circle", add_special_tokens=False).input_ids
    assert VOCAB.motion_start_id in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(
        [i for i in ids if i != VOCAB.motion_start_id])
    # The project's own loader accepts the export's tokenizer (instruct and chat load it from there).
    assert load_text_tokenizer(export_dir, VOCAB).convert_tokens_to_ids("[MOV]") == VOCAB.motion_start_id


def test_chat_template_renders_the_conversation_format(export_dir):
    tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    rendered = tokenizer.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.bos_token + LLAVA_V1.render([*ours(TURNS), Message("assistant", None)])
    assert rendered.endswith("Which way does it go? ASSISTANT:")
    ids = tokenizer.apply_chat_template(TURNS, add_generation_prompt=True, return_dict=False)
    assert list(ids) == LLAVA_V1.generation_prompt(ours(TURNS), tokenizer)
    # A finished conversation (no generation prompt) is what training encodes, eos after each answer.
    done = TURNS[:2]
    ids = tokenizer.apply_chat_template(done, return_dict=False)
    assert list(ids) == LLAVA_V1.encode(ours(done), tokenizer).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    # A system message replaces the system prompt.
    system = [{"role": "system", "content": "Answer in one word."}, *TURNS[:1]]
    from dataclasses import replace
    assert tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        tokenizer.bos_token + replace(LLAVA_V1, system="Answer in one word.").render(
            [*ours(TURNS[:1]), Message("assistant", None)]))


def test_video_turns_keep_the_placeholder_and_take_the_clip_ids_in_its_place(export_dir):
    tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    clip = [VOCAB.image_start_id, *VOCAB.visual_id([3, 5]), VOCAB.image_end_id,
            VOCAB.motion_start_id, *VOCAB.motion_id([1, 2, 7]), VOCAB.motion_end_id]
    as_list = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What shape is moving?"}]}]
    as_text = [{"role": "user", "content": "<video>\nWhat shape is moving?"}]
    rendered = tokenizer.apply_chat_template(as_list, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(as_text, tokenize=False, add_generation_prompt=True)
    assert "USER: <video>\nWhat shape is moving? ASSISTANT:" in rendered
    assert encode_rendered(rendered, tokenizer, [clip]) == LLAVA_V1.generation_prompt(ours(as_text), tokenizer, [clip])
    with pytest.raises(ValueError, match="1 <image>/<video> placeholder"):
        encode_rendered(rendered, tokenizer, [])


def test_chat_template_refuses_turns_out_of_order(export_dir):
    tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([TURNS[1], TURNS[0]], tokenize=False)


def test_release_template_as_chat_template(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path, TEXTS, vocab_size=VOCAB.text_size)
    tokenizer.chat_template = VIDEO_LAVIT_RELEASE.chat_template()
    rendered = tokenizer.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.bos_token + VIDEO_LAVIT_RELEASE.render([*ours(TURNS), Message("assistant", None)])
    assert "A red circle. \\n </s>USER:" in rendered


def test_markers_are_idempotent_and_work_for_llama_class_tokenizers(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"\u2581w{i}": i + 3 for i in range(VOCAB.text_size - 3)}}
    LlamaTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path / "llama")
    llama = AutoTokenizer.from_pretrained(tmp_path / "llama", local_files_only=True)
    marked = with_block_markers(with_block_markers(llama, VOCAB), VOCAB)
    marked.save_pretrained(tmp_path / "marked")
    again = AutoTokenizer.from_pretrained(tmp_path / "marked", local_files_only=True)
    assert type(again).__name__ == "LlamaTokenizer"
    assert again.convert_tokens_to_ids(list(BLOCK_MARKERS)) == list(VOCAB.special_ids)
    assert again("w5 w7", add_special_tokens=False).input_ids == llama("w5 w7", add_special_tokens=False).input_ids


def test_old_exports_without_markers_still_load_and_bad_marker_ids_are_named(export_dir, tmp_path):
    old = tmp_path / "old"
    build_tiny_tokenizer(old, TEXTS, vocab_size=VOCAB.text_size)  # what exports held before the markers
    loaded = load_text_tokenizer(old, VOCAB)
    assert loaded.convert_tokens_to_ids("[MOV]") == loaded.unk_token_id  # no markers: the name is unknown
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    data = json.loads((bad / "tokenizer.json").read_text())
    data["model"]["vocab"]["[MOV]"] = 302
    for entry in data["added_tokens"]:
        if entry["content"] == "[MOV]":
            entry["id"] = 302
    (bad / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerMismatchError, match=r"\[MOV\] to 302 but the vocabulary puts it at 318"):
        load_text_tokenizer(bad, VOCAB)


def test_exported_tokenizer_config_names_classes_transformers_4_and_5_both_know(export_dir):
    config = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # not transformers 5's "TokenizersBackend"
    assert not isinstance(config.get("extra_special_tokens"), list)  # a list there breaks transformers 4.x
    assert {"[IMG]", "[/IMG]", "[MOV]", "[/MOV]"} <= set(config["additional_special_tokens"])
