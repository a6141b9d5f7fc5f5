"""The release's LLM directories ship a slow sentencepiece ``tokenizer.model`` (no ``tokenizer.json``): the import
converts it into a fast tokenizer giving the same ids, and names the missing package when it cannot."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from videolavit.llm.vocabulary import Vocabulary

LINES = ["a red circle moves left", "a blue square moves up", "the green triangle moves right and down",
         "What is the man doing in this video?", "A chat between a curious user and an assistant."]
TEXT_SIZE = 300


def sentencepiece_release_llm(directory: Path) -> bytes:
    """A release-layout LLM directory with a tiny sentencepiece BPE model (Llama-2's settings: byte fallback,
    no normalisation, digits split, unk 0, bos 1, eos 2, no pad) -> the model's bytes."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES * 10), model_writer=model, vocab_size=TEXT_SIZE,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    directory.mkdir(parents=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=TEXT_SIZE + 64 + 1024 + 4, tie_word_embeddings=False)
    config.save_pretrained(str(directory))
    torch.save(LlamaForCausalLM(config).state_dict(), directory / "pytorch_model.bin")
    return model.getvalue()


def test_a_slow_sentencepiece_tokenizer_is_imported_as_a_fast_one_with_the_same_ids(tmp_path):
    import sentencepiece as spm

    from videolavit.llm.text_tokenizer import load_text_tokenizer
    from videolavit.release.importer import import_llm

    proto = sentencepiece_release_llm(tmp_path / "language_model")
    vocabulary = Vocabulary(text_size=TEXT_SIZE, visual_codes=64, motion_codes=1024)
    import_llm(tmp_path / "language_model", tmp_path / "pretrain", vocabulary, None)
    assert (tmp_path / "pretrain" / "tokenizer.json").is_file()
    tokenizer = load_text_tokenizer(tmp_path / "pretrain", vocabulary)
    assert tokenizer.is_fast and len(tokenizer) == TEXT_SIZE
    reference = spm.SentencePieceProcessor(model_proto=proto)
    for text in ["a red circle moves left", "What moves up?\nthe square", "zebra 42"]:  # unseen pieces: bytes
        assert tokenizer(text).input_ids == [1] + reference.encode(text)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_without_sentencepiece_the_import_names_the_package(tmp_path, monkeypatch):
    from videolavit.release import importer

    sentencepiece_release_llm(tmp_path / "language_model")
    monkeypatch.setattr(importer, "sentencepiece_available", lambda: False)
    vocabulary = Vocabulary(text_size=TEXT_SIZE, visual_codes=64, motion_codes=1024)
    with pytest.raises(importer.SentencepieceMissingError, match=r"pip install 'videolavit\[release\]'"):
        importer.import_llm(tmp_path / "language_model", tmp_path / "pretrain", vocabulary, None)
