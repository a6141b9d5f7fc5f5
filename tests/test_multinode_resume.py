"""Multi-node and elastic resume, rehearsed on CPU with gloo: stage 1a (DDP) and stage 2 (FSDP2 through
ModelParallelStrategy, distributed checkpoints) trained on two torchrun "nodes", saved, and resumed on 1 and on
3 processes. The step count, the optimizer state and the data position continue, and the loss ends where a
single-process run on the same data ends. A resumed DataModule continues with new passes of its stream."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.video_datamodule import VideoDataModule
from tests.multinode_fit import fit_on_one_node, fit_on_two_nodes
from tests.tensorboard_scalars import scalars
from tests.test_pretrain import cli_inputs  # noqa: F401  (a fixture)
from tests.test_pretrain import write_config as write_pretrain_config
from videolavit.config_files import read_config

REPO = Path(__file__).resolve().parents[1]
SAVED_AT, RESUMED_TO = 6, 10
GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 ranks


# ------------------------------------------------------------------------------------------- data position
def _first_batches(dm: VideoDataModule, passes: int) -> list[torch.Tensor]:
    dm.setup("fit")
    loader = dm.train_dataloader()
    return [next(iter(loader))["motion"].clone() for _ in range(passes)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restored_datamodule_continues_with_new_passes_instead_of_replaying(prepared_shards, workers):
    def module() -> VideoDataModule:
        return VideoDataModule(train_shards=str(prepared_shards), view="motion", batch_size=2, samples_per_epoch=4,
                               shuffle_buffer=4, num_workers=workers, seed=3)

    uninterrupted = module()
    first_three = _first_batches(uninterrupted, 3)
    assert uninterrupted.state_dict() == {"train_passes": 3}
    assert not torch.equal(first_three[0], first_three[1])  # each pass draws anew

    resumed = module()
    resumed.load_state_dict({"train_passes": 2})  # as Lightning does from the checkpoint, before the loaders
    (third,) = _first_batches(resumed, 1)
    torch.testing.assert_close(third, first_three[2])  # the pass after the saved ones, not pass 0 again
    assert resumed.state_dict() == {"train_passes": 3}

    fresh = module()
    with pytest.raises(ValueError, match="train_passes"):
        fresh.load_state_dict({"train_passes": -1})
    fresh.load_state_dict({})  # a checkpoint from before the counter: starts at pass 0
    torch.testing.assert_close(_first_batches(fresh, 1)[0], first_three[0])


# ------------------------------------------------------------------------------------------- helpers
def _checkpoint_meta(path: Path) -> dict:
    """The trainer state of a checkpoint: a file (DDP) or a distributed checkpoint's meta.pt (FSDP2)."""
    return torch.load(path / "meta.pt" if path.is_dir() else path, map_location="cpu", weights_only=False)


def _adam_steps(path: Path) -> set[int]:
    """Adam's per-parameter step counts stored in a checkpoint (file or distributed checkpoint)."""
    if not path.is_dir():
        states = _checkpoint_meta(path)["optimizer_states"][0]["state"].values()
        return {int(state["step"]) for state in states}
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    import torch.distributed.checkpoint as dcp

    metadata = FileSystemReader(str(path)).read_metadata()
    keys = [k for k, v in metadata.state_dict_metadata.items()
            if k.startswith("optimizer") and k.endswith(".step") and not isinstance(v, BytesStorageMetadata)]
    assert keys, sorted(metadata.state_dict_metadata)[:20]
    state = {k: torch.zeros(metadata.state_dict_metadata[k].size) for k in keys}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {int(v.item()) for v in state.values()}


def _losses(log_dir: Path) -> dict[int, float]:
    return dict(scalars(log_dir)["train/loss"])


def _rounded(losses: dict[int, float]) -> dict[int, float]:
    return {step: round(loss, 4) for step, loss in sorted(losses.items())}


def _phase(base: dict, root: Path, name: str, checkpoints: Path, stop_at: int | None = None) -> Path:
    """``base`` (to RESUMED_TO steps) with its own log directory and checkpoint directory, optionally stopped
    after step ``stop_at`` (its schedule still that of RESUMED_TO steps)."""
    config = yaml.safe_load(yaml.safe_dump(base))
    config["trainer"]["max_steps"] = RESUMED_TO
    if stop_at is not None:
        config["trainer"]["callbacks"].append({"class_path": "tests.fault_injection.StopAtStep",
                                               "init_args": {"step": stop_at}})
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "logs" / name)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(checkpoints)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _rehearse(base: dict, root: Path, strategy_for, learns: bool, tolerance: float) -> dict[int, dict[int, float]]:
    """Reference on 1 process; 2 nodes -> save at SAVED_AT -> resume on 1 and on 3 processes to RESUMED_TO."""
    resumed: dict[int, dict[int, float]] = {}
    fit_on_one_node(_phase(base, root, "reference", root / "reference_ckpt"), root, 1, *strategy_for(1))
    two_nodes = root / "two_nodes_ckpt"
    fit_on_two_nodes(_phase(base, root, "two_nodes", two_nodes, stop_at=SAVED_AT), root, *strategy_for(2))
    saved = two_nodes / "last.ckpt"
    meta = _checkpoint_meta(saved)
    assert meta["global_step"] == SAVED_AT
    saved_passes = meta["VideoDataModule"]["train_passes"]
    assert saved_passes >= 2  # the stream went through several passes before the checkpoint
    assert _adam_steps(saved) == {SAVED_AT}
    before = _losses(root / "logs" / "two_nodes")
    assert sorted(before) == list(range(SAVED_AT))

    reference = _losses(root / "logs" / "reference")
    assert sorted(reference) == list(range(RESUMED_TO))
    for processes in (1, 3):
        checkpoints = root / f"resumed{processes}_ckpt"
        shutil.copytree(two_nodes, checkpoints)
        config = _phase(base, root, f"resumed{processes}", checkpoints)
        fit_on_one_node(config, root, processes, "--ckpt_path", str(checkpoints / "last.ckpt"),
                        *strategy_for(processes))
        last = checkpoints / "last.ckpt"
        meta = _checkpoint_meta(last)
        assert meta["global_step"] == RESUMED_TO, processes
        assert _adam_steps(last) == {RESUMED_TO}, processes  # Adam's moments went on, not restarted
        assert meta["VideoDataModule"]["train_passes"] > saved_passes, processes  # new passes, no replay
        after = _losses(root / "logs" / f"resumed{processes}")
        assert sorted(after) == list(range(SAVED_AT, RESUMED_TO)), processes  # the step count continued
        logged, reference_logged = scalars(root / "logs" / f"resumed{processes}"), scalars(root / "logs" / "reference")
        rates = [tag for tag in logged if tag.startswith("lr-")]
        assert rates, sorted(logged)
        for tag in rates:  # the schedule went on from the saved step
            reference_lr = dict(reference_logged[tag])
            assert [step for step, _ in logged[tag]] == list(range(SAVED_AT, RESUMED_TO)), (processes, tag)
            for step, lr in logged[tag]:
                assert lr == pytest.approx(reference_lr[step], rel=1e-6), (processes, tag, step)
        if learns:  # the weights came back: the resumed loss starts well below the untrained one
            assert after[SAVED_AT] < before[0] - 0.5 * (before[0] - before[SAVED_AT - 1]), (processes, before, after)
        # Same data, other ranks' draws: the resumed steps' mean loss is the single-process run's.
        resumed_mean = sum(after.values()) / len(after)
        reference_mean = sum(reference[s] for s in after) / len(after)
        print(f"rehearsal {root.name}: 1 process {_rounded(reference)}; 2 nodes {_rounded(before)}; "
              f"resumed on {processes} {_rounded(after)}")  # shown with -s
        assert abs(resumed_mean - reference_mean) <= tolerance * reference_mean, (processes, reference, before, after)
        resumed[processes] = after
    return resumed  # processes resumed on -> their per-step losses


# ------------------------------------------------------------------------------------------- stage 1a, DDP
def _motion_tokenizer_config(root: Path, shards: Path) -> dict:
    """experiments/tiny/motion_tokenizer.yaml with only sizes (and paths) overridden."""
    config = read_config(REPO / "experiments" / "tiny" / "motion_tokenizer.yaml")
    trainer = config["trainer"]
    trainer.update(limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1, enable_progress_bar=False)
    trainer["callbacks"][0]["init_args"].update(every_n_train_steps=SAVED_AT, enable_version_counter=False)
    config["model"]["init_args"]["optimizer"]["warmup_steps"] = 2
    config["model"]["init_args"]["export_dir"] = str(root / "export")
    config["data"]["init_args"].update(train_shards=str(shards), val_shards=str(shards), batch_size=GLOBAL_BATCH,
                                       samples_per_epoch=2 * GLOBAL_BATCH, shuffle_buffer=8, num_workers=0)
    return config


@pytest.mark.slow
def test_stage1a_ddp_on_two_nodes_resumes_on_one_and_on_three_processes(prepared_shards, tmp_path):
    # The tiny motion tokenizer's loss hardly moves in 10 steps and varies from batch to batch by ~15%, so only
    # the LLM stage checks that it drops, and this tolerance is wide.
    resumed = _rehearse(_motion_tokenizer_config(tmp_path, prepared_shards), tmp_path,
                        lambda processes: ["--trainer.strategy", "ddp"], learns=False, tolerance=0.2)
    assert sorted(resumed) == [1, 3] and all(len(losses) > 0 for losses in resumed.values())


# ------------------------------------------------------------------------------------------- stage 2, FSDP2
def _model_parallel(processes: int) -> list[str]:
    return ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
            "--trainer.strategy.data_parallel_size", str(processes),
            "--trainer.strategy.tensor_parallel_size", "1"]


@pytest.mark.slow
def test_stage2_fsdp2_on_two_nodes_resumes_its_distributed_checkpoint_on_one_and_on_three_processes(
        cli_inputs, tmp_path):  # noqa: F811
    path = write_pretrain_config(tmp_path, cli_inputs["tokens"], cli_inputs, limit_val_batches=0)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=SAVED_AT,
                                                          enable_version_counter=False)
    config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                                           "init_args": {"logging_interval": "step"}})
    config["data"]["init_args"].update(batch_size=GLOBAL_BATCH, samples_per_epoch=2 * GLOBAL_BATCH)
    _rehearse(config, tmp_path, _model_parallel, learns=True, tolerance=0.03)
