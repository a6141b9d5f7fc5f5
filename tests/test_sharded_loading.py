"""The LLM stages' weights: meta-device construction, per-shard safetensors loading, streaming export."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from stages.pretrain import PretrainStage, mean_resized_rows
from videolavit.llm.sharded_weights import INDEX_FILE, SafetensorsDirectory, WeightsError
from videolavit.llm.text_tokenizer import build_tiny_tokenizer
from videolavit.llm.vocabulary import Vocabulary
from videolavit.synth.moving_shapes import plan_corpus

VOCAB = Vocabulary(text_size=300, visual_codes=16, motion_codes=32)  # 352 ids
LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text_tokenizer")
    build_tiny_tokenizer(out, [spec.caption for spec in plan_corpus(64, seed=0)], vocab_size=VOCAB.text_size)
    return out


@pytest.fixture(scope="module")
def text_only_llm(tmp_path_factory) -> Path:
    """A HF directory with the text vocabulary only (like Llama-2 before the visual rows are added)."""
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("llm")
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB.text_size, tie_word_embeddings=False, **LLM)).save_pretrained(out)
    return out


def stage_from(tokenizer_dir: Path, llm_path: Path, **kwargs) -> PretrainStage:
    return PretrainStage(tokenizer_path=str(tokenizer_dir), vocabulary=VOCAB, llm_path=str(llm_path),
                         attn_implementation="eager", **kwargs)


def test_the_llm_is_built_on_the_meta_device_and_loaded_in_configure_model(tokenizer_dir, text_only_llm):
    stage = stage_from(tokenizer_dir, text_only_llm)
    assert all(p.device.type == "meta" for p in stage.llm.parameters())
    stage.configure_model()
    source = AutoModelForCausalLM.from_pretrained(text_only_llm, local_files_only=True)
    assert torch.equal(stage.llm.model.embed_tokens.base, source.model.embed_tokens.weight)
    assert torch.equal(stage.llm.model.layers[1].self_attn.k_proj.weight, source.model.layers[1].self_attn.k_proj.weight)
    expected = mean_resized_rows(source.lm_head.weight.detach(), VOCAB.size - VOCAB.text_size)
    assert torch.equal(stage.llm.lm_head.new, expected)
    torch.testing.assert_close(stage.llm.model.rotary_emb.inv_freq, source.model.rotary_emb.inv_freq)
    ids = torch.randint(0, VOCAB.text_size, (1, 12))
    with torch.no_grad():  # text ids: the same logits over the text rows as the source model
        ours = stage(ids, torch.arange(12)[None])[..., :VOCAB.text_size]
        theirs = source(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)


def test_new_rows_are_drawn_around_the_mean_of_the_old_ones():
    old = torch.randn(500, 16) + 3.0
    rows = mean_resized_rows(old, 40)
    assert rows.shape == (40, 16)
    torch.testing.assert_close(rows.mean(0), old.mean(0), atol=1e-3, rtol=0)
    assert torch.equal(rows, mean_resized_rows(old, 40))  # the same on every rank
    assert not torch.equal(rows[0], rows[1])


def test_export_in_several_files_round_trips_through_transformers_and_the_stage(tokenizer_dir, tmp_path):
    torch.manual_seed(3)
    stage = PretrainStage(tokenizer_path=str(tokenizer_dir), vocabulary=VOCAB, llm_config=LLM, export_dtype="bfloat16")
    stage.export(tmp_path / "export", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "export" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, stage.llm.lm_head.weight.detach().bfloat16())

    again = stage_from(tokenizer_dir, tmp_path / "export", load_dtype="float32")
    again.configure_model()
    for name, tensor in stage.llm.state_dict().items():
        assert torch.equal(again.llm.state_dict()[name], tensor.bfloat16().float()), name
    stage.export(tmp_path / "export")  # one file now: the previous run's shards must not linger
    assert sorted(p.name for p in (tmp_path / "export").glob("model*")) == ["model.safetensors"]


def test_unreadable_or_mismatched_weights_are_named(tokenizer_dir, text_only_llm, tmp_path):
    (tmp_path / "empty").mkdir()
    LlamaConfig(vocab_size=VOCAB.text_size, **LLM).save_pretrained(tmp_path / "empty")
    with pytest.raises(WeightsError, match="no model.safetensors"):
        stage_from(tokenizer_dir, tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    LlamaConfig(vocab_size=VOCAB.text_size, tie_word_embeddings=False, **LLM).save_pretrained(broken)
    reader = SafetensorsDirectory(text_only_llm)
    tensors = {key: reader.full(key) for key in reader.keys()}
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 16)
    save_file(tensors, str(broken / "model.safetensors"))
    stage = stage_from(tokenizer_dir, broken)
    with pytest.raises(WeightsError, match="up_proj.weight has shape"):
        stage.configure_model()
    with pytest.raises(ValueError, match="300 vocabulary rows"):
        stage_from(tokenizer_dir, text_only_llm).load_init_from(str(text_only_llm))  # init_from: full layout only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, world: int, port: int, tokenizer_dir: str, llm: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stage = stage_from(Path(tokenizer_dir), Path(llm))
        stage._device_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
        stage.configure_model()
        local = {n: p.to_local().clone() for n, p in stage.llm.named_parameters() if isinstance(p, DTensor)}
        assert local, "no parameter was sharded"
        state = stage.full_state_dict()
        stage.export(Path(out) / "export", max_shard_bytes=30_000)
        torch.save({"local": local, "state": state}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_two_ranks_load_their_own_rows_and_export_the_whole_model(tokenizer_dir, text_only_llm, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, _free_port(), str(tokenizer_dir), str(text_only_llm), str(tmp_path)),
             nprocs=2, join=True)
    reference = stage_from(tokenizer_dir, text_only_llm)
    reference.configure_model()
    full = {k: v.detach() for k, v in reference.llm.state_dict().items()}
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, tensor in full.items():
        shards = [ranks[r]["local"][name] for r in range(2)]
        assert torch.equal(torch.cat(shards), tensor), name  # rank r holds rows [r*ceil(n/2), ...)
        assert shards[0].shape[0] == -(-tensor.shape[0] // 2)
        assert torch.equal(ranks[0]["state"][name], tensor), name
    assert ranks[1]["state"] == {}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    assert torch.equal(exported.lm_head.weight, torch.cat([full["lm_head.base"], full["lm_head.new"]]))
    assert torch.equal(exported.model.layers[0].mlp.gate_proj.weight, full["model.layers.0.mlp.gate_proj.weight"])
