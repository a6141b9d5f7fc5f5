"""Non-finite losses and gradients: a bad step is skipped (weights, Adam moments and the EMA codebook stay as
they were) and counted; a run of them stops ``fit`` with a named error and no export; non-finite weights are
never exported, and a refused export leaves the previous one in place."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from tests.ddp_fit import fit_two_processes, rank_state_callback
from tests.tensorboard_scalars import scalars
from tests.test_pretrain import cli_inputs  # noqa: F401  (a fixture)
from tests.test_pretrain import write_config as pretrain_config
from tests.test_stage_motion_tokenizer import write_config

from stages.base import OptimizerConfig, StageModule
from stages.motion_tokenizer import EXPORT_NAME, MotionTokenizerStage
from stages.nonfinite_guard import NonFiniteExportError, NonFiniteTrainingError
from stages.pretrain import PretrainStage
from videolavit.__main__ import main
from videolavit.cli import checkpoint_problem
from videolavit.llm.text_tokenizer import build_tiny_tokenizer
from videolavit.llm.vocabulary import Vocabulary
from videolavit.models.export import load_export
from videolavit.models.motion_tokenizer import MotionTokenizerConfig

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = dict(num_frames=24, height=8, width=8, dim=16, num_heads=2, mlp_ratio=2.0, blocks_per_stage=[1, 1, 1, 1],
                 stage_factors=[[1, 2, 2], [2, 1, 1], [3, 1, 1], [1, 1, 1]], downsample="conv", num_codes=32,
                 code_dim=8, ema_decay=0.9, dead_code_interval=0)


def motion_stage(**kwargs) -> MotionTokenizerStage:
    torch.manual_seed(0)
    return MotionTokenizerStage(tokenizer=MotionTokenizerConfig(**TOKENIZER),
                                optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0), **kwargs)


def motion_batches(count: int, nan_at: tuple[int, ...] = ()) -> list[dict]:
    """``count`` batches of 2 random motion fields; the batches in ``nan_at`` hold one NaN."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for index in range(count):
        motion = torch.randn(2, 2, 24, 8, 8, generator=generator)
        if index in nan_at:
            motion[1, 0, 5, 3, 3] = float("nan")
        batches.append({"motion": motion})
    return batches


class StepRecorder(Callback):
    """After every training batch: the module's full state, the counter as logged, and Adam's step counts."""

    def __init__(self):
        self.states, self.skipped, self.adam_steps = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.skipped.append(float(trainer.callback_metrics["train/nonfinite_skipped"]))
        state = trainer.optimizers[0].state
        self.adam_steps.append(sorted({int(s["step"]) for s in state.values()}))


def fit(stage: pl.LightningModule, batches: list[dict], **trainer) -> StepRecorder:
    recorder = StepRecorder()
    options = dict(accelerator="cpu", max_steps=len(batches), logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    pl.Trainer(callbacks=[recorder], **{**options, **trainer}).fit(
        stage, train_dataloaders=DataLoader(batches, batch_size=None))
    return recorder


def same(a: dict, b: dict) -> list[str]:
    return [name for name in a if not torch.equal(a[name], b[name])]


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_nan_batch_is_skipped_and_counted_and_training_goes_on():
    run = fit(motion_stage(), motion_batches(3, nan_at=(1,)))
    assert same(run.states[0], run.states[1]) == []  # weights and EMA codebook (and its step count) untouched
    assert same(run.states[1], run.states[2])  # the next good batch trains
    assert all(all_finite(state) for state in run.states)
    assert int(run.states[2]["model.quantize.num_updates"]) == 2  # the EMA took only the two good steps
    assert run.skipped == [0.0, 1.0, 1.0]
    assert run.adam_steps == [[1], [1], [2]]  # Adam's moments and step count skipped the bad step too


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped():
    stage = motion_stage()
    calls = []

    def poison_second_backward(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * math.inf if len(calls) == 2 else grad

    next(stage.model.parameters()).register_hook(poison_second_backward)
    run = fit(stage, motion_batches(3))
    assert same(run.states[0], run.states[1]) == [] and same(run.states[1], run.states[2])
    assert run.skipped == [0.0, 1.0, 1.0] and all(all_finite(state) for state in run.states)


def test_skipping_works_with_manual_optimization():
    class ManualStage(StageModule):
        def __init__(self):
            super().__init__(optimizer=OptimizerConfig(lr=1e-2, warmup_steps=0))
            self.automatic_optimization = False
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            loss = self.layer(batch["x"]).pow(2).mean()
            self.manual_backward(loss)
            optimizer.step()

    x = torch.ones(3, 4)
    run = fit(ManualStage(), [{"x": x}, {"x": x * math.nan}, {"x": x}], gradient_clip_val=None)
    assert same(run.states[0], run.states[1]) == [] and same(run.states[1], run.states[2])
    assert run.skipped == [0.0, 1.0, 1.0] and all(all_finite(state) for state in run.states)


def test_max_nonfinite_steps_in_a_row_stop_fit_and_leave_the_export_alone(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    previous = {f"{EXPORT_NAME}.safetensors": b"previous weights", f"{EXPORT_NAME}.json": b"{}", "other.txt": b"x"}
    for name, data in previous.items():
        (export / name).write_bytes(data)
    stage = motion_stage(export_dir=str(export), max_nonfinite_steps=3)
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row .* max_nonfinite_steps=3"):
        fit(stage, motion_batches(6, nan_at=(1, 2, 3)))
    assert {p.name: p.read_bytes() for p in export.iterdir()} == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no scratch directory left behind
    assert all(torch.isfinite(p).all() for p in stage.parameters())


def test_the_count_in_a_row_restarts_after_a_good_step():
    run = fit(motion_stage(max_nonfinite_steps=3), motion_batches(6, nan_at=(0, 1, 3, 4)))
    assert run.skipped == [1.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    assert int(run.states[-1]["model.quantize.num_updates"]) == 2


def test_max_nonfinite_steps_must_be_positive():
    with pytest.raises(ValueError, match="max_nonfinite_steps must be at least 1"):
        motion_stage(max_nonfinite_steps=0)


def test_a_finished_fit_exports_through_a_scratch_directory(tmp_path):
    export = tmp_path / "exports"
    export.mkdir()
    (export / "keyframe_tokenizer.json").write_text("another stage's export")
    (export / f"{EXPORT_NAME}.safetensors").write_bytes(b"an older run")
    stage = motion_stage(export_dir=str(export))
    fit(stage, motion_batches(2))
    exported = load_export(export, EXPORT_NAME)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, stage.model.state_dict()[name]), name
    assert (export / "keyframe_tokenizer.json").read_text() == "another stage's export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"]


def test_non_finite_weights_are_never_exported(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / f"{EXPORT_NAME}.safetensors").write_bytes(b"previous weights")
    stage = motion_stage(export_dir=str(export))
    with torch.no_grad():
        stage.model.quantize.embedding.weight[3, 1] = math.inf
    with pytest.raises(NonFiniteExportError, match="model.quantize.embedding.weight"):
        stage.on_fit_end()
    assert [p.name for p in export.iterdir()] == [f"{EXPORT_NAME}.safetensors"]
    assert (export / f"{EXPORT_NAME}.safetensors").read_bytes() == b"previous weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ------------------------------------------------------------------------------------------- the LLM stages
VOCAB = Vocabulary(text_size=300, visual_codes=16, motion_codes=32)
LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=64)


@pytest.fixture(scope="module")
def llm_stage_args(tmp_path_factory) -> dict:
    tokenizer = tmp_path_factory.mktemp("text_tokenizer")
    build_tiny_tokenizer(tokenizer, [f"a {c} {s} moving" for c in ("red", "blue") for s in ("circle", "star")] * 8,
                         vocab_size=VOCAB.text_size)
    return dict(tokenizer_path=str(tokenizer), vocabulary=VOCAB, llm_config=LLM,
                optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0))


def text_batches(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB.text_size, (count, 2, 16), generator=generator)
    return [{"input_ids": row, "labels": row.clone(), "position_ids": torch.arange(16).expand(2, 16).clone()}
            for row in ids]


def test_the_llm_stage_skips_a_step_whose_gradient_is_nan(llm_stage_args):
    torch.manual_seed(0)
    stage = PretrainStage(**llm_stage_args)
    calls = []

    def poison_second_backward(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * math.nan if len(calls) == 2 else grad

    stage.llm.model.layers[0].mlp.up_proj.weight.register_hook(poison_second_backward)
    run = fit(stage, text_batches(3))
    assert same(run.states[0], run.states[1]) == [] and same(run.states[1], run.states[2])
    assert run.skipped == [0.0, 1.0, 1.0] and all(all_finite(state) for state in run.states)


def test_the_llm_export_refuses_non_finite_weights_and_keeps_the_previous_directory(llm_stage_args, tmp_path):
    torch.manual_seed(0)
    stage = PretrainStage(**llm_stage_args, export_dir=str(tmp_path / "export"))
    stage.export(tmp_path / "export")
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    assert "model.safetensors" in before and "config.json" in before
    with torch.no_grad():
        stage.llm.model.layers[0].self_attn.q_proj.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteExportError, match="q_proj"):
        stage.on_fit_end()
    with pytest.raises(NonFiniteExportError, match="q_proj"):
        stage.export(tmp_path / "export")
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_export_dtype_that_overflows_is_refused(llm_stage_args, tmp_path):
    torch.manual_seed(0)
    stage = PretrainStage(**llm_stage_args, export_dtype="float16", export_dir=str(tmp_path / "export"))
    with torch.no_grad():
        stage.llm.lm_head.new[0, 0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(NonFiniteExportError, match="lm_head.new"):
        stage.on_fit_end()
    assert not (tmp_path / "export").exists()


# ------------------------------------------------------------------------------------------- through the CLI
def poison(steps: list[int], rank: int | None = None) -> dict:
    return {"class_path": "tests.fault_injection.PoisonBatches", "init_args": {"steps": steps, "rank": rank}}


def test_the_cli_stops_a_run_of_nan_steps_with_one_line_and_writes_no_export(prepared_shards, tmp_path, capsys):
    config = write_config(tmp_path, prepared_shards, callbacks=[poison([1, 2, 3, 4])])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--model.init_args.max_nonfinite_steps", "3"])
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "3 optimizer steps in a row" in errors[0]
    assert not (tmp_path / "export").exists()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["nonfinite_steps"] == {"skipped": 2, "in_a_row": 2}  # saved after step 3 (1 good, 2 skipped)
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())


@pytest.mark.slow
def test_two_ddp_ranks_skip_together_when_one_sees_a_nan(prepared_shards, tmp_path):
    config = write_config(tmp_path, prepared_shards, callbacks=[rank_state_callback(tmp_path), poison([2], rank=1)])
    ranks = fit_two_processes(config, tmp_path)  # also checks that both ranks hold the same state
    assert int(ranks[0]["model.quantize.num_updates"]) == 5  # 6 steps, the poisoned one skipped on both ranks
    assert all(torch.isfinite(t).all() for t in ranks[0].values() if t.is_floating_point())
    assert max(value for _, value in scalars(tmp_path / "logs")["train/nonfinite_skipped"]) == 1


@pytest.mark.slow
def test_fsdp2_ranks_skip_together_when_one_shard_of_a_gradient_is_nan(prepared_shards, cli_inputs, tmp_path):
    config = pretrain_config(tmp_path, cli_inputs["tokens"], cli_inputs, devices=2, limit_val_batches=1,
                             strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                                       "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "videolavit", "fit", "--config", str(config),
                           "--trainer.callbacks+=tests.fault_injection.PoisonGradient",
                           "--trainer.callbacks.step=1", "--trainer.callbacks.rank=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # rank 0 logs: its own gradient shards were finite, so it counts the step only because rank 1 said so
    assert [value for _, value in sorted(scalars(tmp_path / "logs")["train/nonfinite_skipped"])] == [0, 1, 1, 1]
    assert checkpoint_problem(tmp_path / "checkpoints" / "last.ckpt") is None  # a sharded (directory) checkpoint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
