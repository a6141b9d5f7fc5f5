"""The stage-1 plan's step memory (fake tensors) against the peak of a real CPU training step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from videolavit.commands.plan import _meta_stage
from videolavit.commands.stage_step_memory import STEPS, stage_step_memory
from videolavit.planning.peak_memory import PeakMemory, fake_module

REPO = Path(__file__).resolve().parents[1]


def profiled_peak_bytes(step) -> int:
    """Peak of live CPU allocations during ``step()`` (torch's profiler, allocation and free events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def real_step_peak(stage, module_path: str, micro_batch: int, view: dict, checkpointing: bool) -> int:
    from videolavit.commands.stage_step_memory import _checkpointable, _set_checkpointing

    torch.manual_seed(0)
    _set_checkpointing(_checkpointable(stage), checkpointing)
    stage.train()
    step = STEPS[module_path](stage, micro_batch, view)

    def forward_backward():
        step().backward()

    return profiled_peak_bytes(forward_backward)


def tiny_section(name: str) -> tuple[dict, dict]:
    config = yaml.safe_load((REPO / "experiments" / "tiny" / f"{name}.yaml").read_text())
    view = config["data"]["init_args"]["view"].get("init_args", {})
    return config["model"], view


def test_peak_memory_counts_a_linear_stack_exactly():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def net():
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))

    real, x = net(), torch.randn(128, 64)
    measured = profiled_peak_bytes(lambda: real(x).pow(2).sum().backward())
    mode = FakeTensorMode()
    fake = fake_module(net(), mode)
    with mode:
        fx = torch.randn(128, 64)
    with mode, PeakMemory() as peak:
        fake(fx).pow(2).sum().backward()
    assert peak.peak_bytes == measured
    assert peak.live_bytes == sum(p.numel() * 4 for p in fake.parameters())  # the gradients stay


def test_motion_tokenizer_step_memory_matches_a_real_cpu_step():
    section, view = tiny_section("motion_tokenizer")
    micro = 4
    stage, _ = _meta_stage(copy.deepcopy(section), str(REPO / "experiments" / "tiny" / "motion_tokenizer.yaml"))
    planned = stage_step_memory(stage, "stages.motion_tokenizer", micro, view, bf16=False)
    from jsonargparse import ArgumentParser
    import lightning.pytorch as pl

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    real = parser.instantiate_classes(parser.parse_object({"model": section})).model
    measured = real_step_peak(real, "stages.motion_tokenizer", micro, view, checkpointing=False)
    assert planned.activations_checkpointed is None
    assert planned.activations + planned.gradients == pytest.approx(measured, rel=0.10)


def test_video_detokenizer_step_memory_matches_a_real_cpu_step_with_and_without_checkpointing():
    section, view = tiny_section("video_detokenizer")
    section = copy.deepcopy(section)
    section["init_args"].update(motion_source="raw", init_from=None)
    micro = 2
    stage, _ = _meta_stage(copy.deepcopy(section), str(REPO / "experiments" / "tiny" / "video_detokenizer.yaml"))
    planned = stage_step_memory(stage, "stages.video_detokenizer", micro, view, bf16=False)
    from jsonargparse import ArgumentParser
    import lightning.pytorch as pl

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    real = parser.instantiate_classes(parser.parse_object({"model": section})).model
    full = real_step_peak(real, "stages.video_detokenizer", micro, view, checkpointing=False)
    checkpointed = real_step_peak(real, "stages.video_detokenizer", micro, view, checkpointing=True)
    assert planned.activations + planned.gradients == pytest.approx(full, rel=0.10)
    assert planned.activations_checkpointed + planned.gradients == pytest.approx(checkpointed, rel=0.10)
    assert planned.activations_checkpointed < planned.activations
