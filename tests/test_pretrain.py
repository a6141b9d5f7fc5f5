"""Stage 2 (pre-training): the LLM and its vocabulary rows, learning rates, the loss, learning on held-out
captions, the Hugging Face export, a tiny fit through the CLI, and FSDP2 (2 CPU processes, gloo) = 1 process."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from datamodules.tokenize_shards import TokenizeConfig, run_tokenize
from stages.base import OptimizerConfig
from stages.pretrain import NEW_ROW_PARAMETERS, PretrainStage, TokenizerBuild, default_optimizer
from videolavit.__main__ import main
from videolavit.llm.flops import training_flops_per_token
from videolavit.llm.sequences import IGNORE_INDEX, collate_packed_rows, multimodal_pair, pack_documents
from videolavit.llm.text_tokenizer import build_tiny_tokenizer
from videolavit.llm.vocabulary import VOCABULARY_FILE, Vocabulary
from videolavit.synth.moving_shapes import plan_corpus
from tests.stage_configs import stage_conf, write_stage_config
from tests.tensorboard_scalars import scalars
from tests.tiny_tokenizers import build_tokenizer_exports

REPO = Path(__file__).resolve().parents[1]
VOCAB = Vocabulary(text_size=300, visual_codes=16, motion_codes=32)  # 352 ids
LLM = stage_conf("pretrain")["model"]["init_args"]["llm_config"]  # tests/conf/pretrain.yaml
TRAIN_CAPTIONS = [spec.caption for spec in plan_corpus(64, seed=0)]
HELD_OUT_CAPTIONS = [spec.caption for spec in plan_corpus(16, seed=1)]




@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text_tokenizer")
    build_tiny_tokenizer(out, TRAIN_CAPTIONS, vocab_size=VOCAB.text_size)
    return out


def make_stage(tokenizer_dir, seed: int = 0, **kwargs) -> PretrainStage:
    torch.manual_seed(seed)
    args = dict(tokenizer_path=str(tokenizer_dir), vocabulary=VOCAB, llm_config=LLM)
    return PretrainStage(**{**args, **kwargs})


def pair_batch(stage: PretrainStage, captions: list[str], seed: int, seq_len: int = 128,
               order: str | None = None) -> dict:
    """Packed rows of caption-video pairs with random codes (2 clips of 3 keyframe + 4 motion codes)."""
    rng = random.Random(seed)
    tok, docs = stage.tokenizer, []
    for caption in captions:
        video = []
        for _ in range(2):
            video += [VOCAB.image_start_id, *VOCAB.visual_id([rng.randrange(16) for _ in range(3)]), VOCAB.image_end_id,
                      VOCAB.motion_start_id, *VOCAB.motion_id([rng.randrange(32) for _ in range(4)]),
                      VOCAB.motion_end_id]
        text = tok(caption, add_special_tokens=False)["input_ids"]
        docs.append(multimodal_pair(video, text, VOCAB, order=order or rng.choice(["visual_text", "text_visual"]),
                                    bos_id=tok.bos_token_id, eos_id=tok.eos_token_id))
    batch = collate_packed_rows(list(pack_documents(docs, seq_len=seq_len, pad_id=tok.pad_token_id, open_rows=4)))
    batch["modality"] = VOCAB.modality_of(batch["input_ids"])
    return batch


def text_loss(stage: PretrainStage, batch: dict) -> float:
    """Mean loss over the caption (text) targets."""
    stage.eval()
    with torch.no_grad():
        ce, valid, modality = stage.token_losses(batch)
    mask = valid & (modality == 0)
    return float(ce[mask].mean())


# ------------------------------------------------------------------------------------------- the model
def test_vocabulary_rows_are_split_and_the_new_rows_get_their_own_learning_rate(tokenizer_dir):
    stage = make_stage(tokenizer_dir)
    params = dict(stage.named_parameters())
    assert params["llm.model.embed_tokens.base"].shape == (VOCAB.text_size, 32)
    assert params["llm.model.embed_tokens.new"].shape == (VOCAB.size - VOCAB.text_size, 32)
    assert params["llm.lm_head.new"].shape == (VOCAB.size - VOCAB.text_size, 32)
    assert stage.llm.config.use_cache is False and stage.llm.config.vocab_size == VOCAB.size == 352

    stage.optimizer_config = default_optimizer()
    stage.optimizer_config.total_steps = 100
    optimizer = stage.configure_optimizers()["optimizer"]
    lr_of = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    wd_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in params.items():
        assert lr_of[id(param)] == (5e-5 if name in NEW_ROW_PARAMETERS else 2e-5), name
    assert wd_of[id(params["llm.model.layers.0.self_attn.q_proj.weight"])] == 0.1
    assert wd_of[id(params["llm.model.norm.weight"])] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-6

    stage.optimizer_config = OptimizerConfig(lr=2e-5, total_steps=100)  # a YAML that forgot extra_lr
    with pytest.warns(UserWarning, match="new vocabulary rows train at the LLM's lr"):
        stage.configure_optimizers()


def test_a_text_only_llm_is_resized_with_its_rows_kept(tokenizer_dir, tmp_path):
    torch.manual_seed(1)
    source = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB.text_size, tie_word_embeddings=False, **LLM))
    source.save_pretrained(tmp_path / "llm")
    stage = make_stage(tokenizer_dir, llm_config=None, llm_path=str(tmp_path / "llm"))
    stage.configure_model()  # what the trainer does: the meta-device model gets its weights
    embed, head = stage.llm.model.embed_tokens, stage.llm.lm_head
    assert torch.equal(embed.base, source.model.embed_tokens.weight)
    assert torch.equal(head.base, source.lm_head.weight)
    assert embed.weight.shape == head.weight.shape == (VOCAB.size, 32)
    # new rows start near the mean of the old ones (transformers' mean resizing)
    assert torch.allclose(embed.new.mean(0), source.model.embed_tokens.weight.mean(0), atol=0.02)
    assert torch.equal(stage.llm.model.layers[1].mlp.up_proj.weight, source.model.layers[1].mlp.up_proj.weight)


@pytest.mark.parametrize("kwargs, message", [
    (dict(llm_config={**LLM, "tie_word_embeddings": True}), "tied"),
    (dict(llm_config={**LLM, "vocab_size": 1000}), "vocab_size=1000"),
    (dict(llm_path="/nonexistent"), "exactly one of"),
    (dict(llm_config=None), "exactly one of"),
])
def test_bad_llm_settings_are_refused(tokenizer_dir, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make_stage(tokenizer_dir, **kwargs)


def test_the_loss_is_next_token_cross_entropy_over_packed_documents(tokenizer_dir):
    stage = make_stage(tokenizer_dir).eval()
    batch = pair_batch(stage, TRAIN_CAPTIONS[:6], seed=0)
    assert batch["input_ids"].shape[0] >= 2 and (batch["document_ids"].amax(1) >= 1).any()  # packed
    with torch.no_grad():
        ce, valid, _ = stage.token_losses(batch)
        reference = stage.llm(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              labels=batch["labels"], use_cache=False).loss
        # each document alone gives the same per-token losses: nothing leaks between packed documents
        row, doc = 0, 1
        where = batch["document_ids"][row] == doc
        alone = stage.llm(input_ids=batch["input_ids"][row, where][None]).logits[0, :-1]
        targets = batch["labels"][row, where][1:]
    torch.testing.assert_close(ce.sum() / valid.sum(), reference, rtol=1e-5, atol=1e-6)
    start = int(where.nonzero()[0])
    expected = torch.nn.functional.cross_entropy(alone, targets, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(ce[row, start:start + len(targets)], expected, rtol=1e-4, atol=1e-5)


def test_held_out_caption_loss_drops_with_training(tokenizer_dir):
    stage = make_stage(tokenizer_dir, optimizer=OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                                                                warmup_steps=5, total_steps=60))
    held_out = pair_batch(stage, HELD_OUT_CAPTIONS, seed=99, order="text_visual")
    before = text_loss(stage, held_out)
    optimizer = stage.configure_optimizers()["optimizer"]
    stage.train()
    for step in range(60):
        batch = pair_batch(stage, random.Random(step).sample(TRAIN_CAPTIONS, 12), seed=step)
        ce, valid, _ = stage.token_losses(batch)
        (ce.sum() / valid.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = text_loss(stage, held_out)
    assert before > 5.0  # about ln(352): an untrained model
    assert after < 0.6 * before, (before, after)


# ------------------------------------------------------------------------------------------- export
def test_export_in_bfloat16(tokenizer_dir, tmp_path):
    stage = make_stage(tokenizer_dir, export_dtype="bfloat16")
    stage.export(tmp_path)
    # dtype="auto": the stored dtype (transformers 5's default; 4.x upcasts to float32 without it)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, stage.llm.lm_head.weight.detach().to(torch.bfloat16))


def test_export_loads_with_transformers_and_generates(tokenizer_dir, tmp_path):
    stage = make_stage(tokenizer_dir, seed=3).eval()
    stage.export(tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export", local_files_only=True)
    assert model.config.vocab_size == VOCAB.size and model.config.use_cache
    assert len(tokenizer) == VOCAB.text_size + 4  # the text ids and the four named block markers
    assert tokenizer.convert_tokens_to_ids(["[IMG]", "[/IMG]", "[MOV]", "[/MOV]"]) == list(VOCAB.special_ids)
    layout = json.loads((tmp_path / "export" / VOCABULARY_FILE).read_text())
    assert layout["image_start_id"] == VOCAB.image_start_id and layout["size"] == VOCAB.size

    batch = pair_batch(stage, TRAIN_CAPTIONS[:2], seed=1)
    with torch.no_grad():
        ours = stage(batch["input_ids"], batch["position_ids"])
        theirs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    torch.testing.assert_close(theirs, ours)
    prompt = tokenizer("a red circle", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 6) and int(out.max()) < VOCAB.size

    other = make_stage(tokenizer_dir, seed=4, init_from=str(tmp_path / "export"))
    other.load_init_from(str(tmp_path / "export"))  # what setup() does at the start of a new run
    for name, tensor in stage.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name


def test_a_missing_tiny_tokenizer_is_built_from_the_shards_captions(prepared_shards, tmp_path):
    path = tmp_path / "tok"
    stage = PretrainStage(tokenizer_path=str(path), vocabulary=VOCAB, llm_config=LLM,
                          build_tokenizer_if_missing=TokenizerBuild(shards=str(prepared_shards)))
    assert len(stage.tokenizer) == VOCAB.text_size and (path / "tokenizer.json").is_file()
    first = (path / "tokenizer.json").read_text()
    PretrainStage(tokenizer_path=str(path), vocabulary=VOCAB, llm_config=LLM,
                  build_tokenizer_if_missing=TokenizerBuild(shards=str(prepared_shards)))
    assert (path / "tokenizer.json").read_text() == first  # built once, then loaded
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # no scratch directory left behind


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_inputs(prepared_shards, tmp_path_factory) -> dict:
    """Frozen (random) tiny stage-1 exports, the prepared corpus tokenised with them, and a text corpus."""
    root = tmp_path_factory.mktemp("pretrain_inputs")
    exports = build_tokenizer_exports(root / "exports")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_tokenize(TokenizeConfig(shards=str(prepared_shards), exports=str(exports), out=str(root / "tokens"),
                                    progress=False))
    (root / "text.txt").write_text("".join(f"{caption}.\n" for caption in TRAIN_CAPTIONS[:20]))
    return {"exports": exports, "tokens": root / "tokens", "text": root / "text.txt"}


def write_config(root: Path, shards: Path, inputs: dict, **trainer) -> Path:
    tokenizer = str(root / "text_tokenizer")
    view = {"tokens": {"tokenizer_path": tokenizer, "tokenizer_exports": str(inputs["exports"])},
            "text_corpus": str(inputs["text"]), "val_text_corpus": str(inputs["text"])}
    return write_stage_config("pretrain", root, shards, {
        "model": {"init_args": {"tokenizer_path": tokenizer, "build_tokenizer_if_missing": {"shards": str(shards)}}},
        "data": {"init_args": {"view": {"init_args": view}}}}, trainer=trainer)


def test_tiny_fit_through_the_cli_logs_per_modality_losses_exports_and_resumes(cli_inputs, tmp_path):
    config = str(write_config(tmp_path, cli_inputs["tokens"], cli_inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["fit", "--config", config]) == 0
    logged = scalars(tmp_path / "logs")
    expected = {"train/loss", "train/loss_text", "train/loss_keyframe", "train/loss_motion", "train/loss_special",
                "train/device/items_per_sec", "train/device/flops_per_sec", "train/padding_fraction", "val/loss",
                "val/loss_text",
                "val/loss_keyframe", "val/loss_motion"}
    assert expected <= set(logged), sorted(logged)
    assert sorted(step for step, _ in logged["val/loss"]) == [1, 3]
    assert all(0 < value < 10 for _, value in logged["train/loss"])
    # ThroughputMonitor's FLOP/s come from the stage's flops_per_batch: FLOPs per token times tokens per second.
    rows, seq_len = 4, 128  # the view's batch_size and seq_len
    per_batch = rows * seq_len * training_flops_per_token(LlamaConfig(**{**LLM, "vocab_size": VOCAB.size}), seq_len)
    batches = dict(logged["train/device/batches_per_sec"])
    assert logged["train/device/flops_per_sec"] and all(
        flops == pytest.approx(batches[step] * per_batch, rel=1e-4) for step, flops in logged["train/device/flops_per_sec"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    assert model.config.vocab_size == VOCAB.size

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps", "6"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert max(step for step, _ in scalars(tmp_path / "logs")["train/loss"]) == 5


# ------------------------------------------------------------------------------------------- FSDP2
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_batch(rows: int = 4, length: int = 48) -> dict:
    """Rows of two fully supervised documents each (equal target counts, so rank means average exactly)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB.size, (rows, length), generator=g)
    half = length // 2
    position_ids = torch.cat([torch.arange(half), torch.arange(length - half)]).repeat(rows, 1)
    labels = ids.clone()
    labels[:, 0] = labels[:, half] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids, "modality": VOCAB.modality_of(ids)}


def _train_two_steps(stage: PretrainStage, batch: dict, world: int = 1) -> list[float]:
    optimizer = stage.configure_optimizers()["optimizer"]
    stage.train()
    losses = []
    for _ in range(2):
        ce, valid, _ = stage.token_losses(batch)
        loss = ce.sum() / valid.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    return losses


def _stage_for_fsdp(tokenizer_dir, **kwargs) -> PretrainStage:
    return make_stage(tokenizer_dir, seed=5, attn_implementation="eager", **kwargs,
                      optimizer=OptimizerConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=0,
                                                total_steps=10,
                                                extra_lr={name: 3e-2 for name in NEW_ROW_PARAMETERS}))


def _fsdp_worker(rank: int, world: int, port: int, tokenizer_dir: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        stage = _stage_for_fsdp(tokenizer_dir, activation_checkpointing=True)
        stage._device_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        stage.configure_model()
        assert isinstance(stage.llm, FSDPModule) and isinstance(stage.llm.model.layers[0], FSDPModule)
        batch = {k: v.chunk(world)[rank] for k, v in _fsdp_batch().items()}
        losses = _train_two_steps(stage, batch, world)
        state = stage.full_state_dict()
        stage.export(Path(out) / "export")
        if rank == 0:
            torch.save({"losses": losses, "state": state}, Path(out) / "fsdp.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # 17-35 s: two spawned processes
def test_fsdp2_on_two_processes_matches_one_process(tokenizer_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tokenizer_dir), str(tmp_path)), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    stage = _stage_for_fsdp(tokenizer_dir)
    losses = _train_two_steps(stage, _fsdp_batch())
    assert losses[1] < losses[0]
    assert sharded["losses"] == pytest.approx(losses, rel=1e-4)  # same loss before and after an update
    reference = stage.full_state_dict()
    assert sharded["state"].keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(sharded["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    torch.testing.assert_close(exported.lm_head.weight, stage.llm.lm_head.weight.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_model_parallel_strategy_fit_on_two_cpu_processes(cli_inputs, tmp_path):
    """Lightning's ModelParallelStrategy (FSDP2 + activation checkpointing) through the CLI, gloo on CPU."""
    config = write_config(tmp_path, cli_inputs["tokens"], cli_inputs, devices=2, limit_val_batches=1,
                          strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                                    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "videolavit", "fit", "--config", str(config),
                           "--model.init_args.activation_checkpointing", "true"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = scalars(tmp_path / "logs")
    assert {"train/loss", "train/loss_motion", "val/loss", "val/loss_keyframe"} <= set(logged)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # a sharded (directory) checkpoint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_attention_that_would_leak_packed_documents_is_refused(tokenizer_dir, name):
    from stages.pretrain import AttentionImplementationError

    with pytest.raises(AttentionImplementationError, match=r"set model.attn_implementation to one of \['sdpa', 'eager'\]"):
        make_stage(tokenizer_dir, attn_implementation=name)


def test_flash_attention_refusal_says_why(tokenizer_dir):
    from stages.pretrain import AttentionImplementationError

    with pytest.raises(AttentionImplementationError, match="batch size 1"):
        make_stage(tokenizer_dir, attn_implementation="flash_attention_2")
    assert make_stage(tokenizer_dir, attn_implementation="eager").llm.config._attn_implementation == "eager"
