"""The peak memory of one stage-1 training step at a config's micro-batch, on fake tensors.

Why: ``plan`` must say whether a stage-1 config fits before any GPU is used. Each stage's trainable
computation - the same methods its ``training_step`` calls, fed tensors of the view's shapes - runs
forward and backward under ``FakeTensorMode`` with ``PeakMemory`` counting live bytes, under bf16
autocast when the trainer's precision is bf16, once with the U-Nets' activation checkpointing on and once
off. Frozen encoders that run without gradient before the trainable part (the VAE, the keyframe
tokenizer's selection) are replaced by inputs of their output shapes: their transient memory is freed
before the trainable forward starts and is not counted. The keyframe tokenizer's selection keeps every
patch (its worst case); the plan says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from videolavit.planning.peak_memory import PeakMemory, fake_module


@dataclass
class StepMemory:
    """Bytes above the resident weights of one training step (gradients excluded from ``activations``)."""

    activations: int  # checkpointing as the config sets it off, i.e. every activation kept
    activations_checkpointed: int | None  # None: the stage has no activation checkpointing switch
    gradients: int
    notes: list[str] = field(default_factory=list)


def _checkpointable(stage: torch.nn.Module) -> list:
    from diffusers import ModelMixin

    return [m for m in stage.modules() if isinstance(m, ModelMixin) and getattr(m, "_supports_gradient_checkpointing",
                                                                                 False)]


def _set_checkpointing(modules: list, enabled: bool) -> None:
    for module in modules:
        module.enable_gradient_checkpointing() if enabled else module.disable_gradient_checkpointing()


def _motion_tokenizer_step(stage, micro_batch: int, view: dict):
    cfg = stage.model.config
    motion = torch.randn(micro_batch, cfg.in_channels, cfg.num_frames, cfg.height, cfg.width)
    return lambda: stage.training_step({"motion": motion}, 0)


def _keyframe_tokenizer_step(stage, micro_batch: int, view: dict):
    size = stage.model.config.vit.image_size
    images = torch.rand(micro_batch, 3, size, size)  # the stage turns the view's uint8 into float first
    return lambda: stage(images)[2]["loss"]


def _keyframe_detokenizer_step(stage, micro_batch: int, view: dict):
    detokenizer = stage.detokenizer
    ids = torch.zeros(micro_batch, detokenizer.config.decoder.max_codes, dtype=torch.long)  # every patch kept
    side = stage.latent_space.latent_size(stage.image_size, stage.image_size)
    x0 = torch.randn(micro_batch, stage.latent_space.channels, *side)
    return lambda: detokenizer.loss(x0, detokenizer.conditioning(ids))


def _video_detokenizer_step(stage, micro_batch: int, view: dict):
    from datamodules.views import CLIP_FRAMES

    height, width = view.get("frame_size", (384, 384))
    grid = view.get("grid", (16, 16))
    frames = int(view.get("clip_frames", CLIP_FRAMES))
    h, w = stage.latent_space.latent_size(int(height), int(width))
    channels = stage.latent_space.channels
    x0 = torch.randn(micro_batch, frames, channels, h, w)
    keyframe = torch.randn(micro_batch, channels, h, w)
    motion = torch.randn(micro_batch, 2, frames, *grid)
    return lambda: stage._loss(x0, keyframe, motion)


STEPS = {"stages.motion_tokenizer": _motion_tokenizer_step, "stages.keyframe_tokenizer": _keyframe_tokenizer_step,
         "stages.keyframe_detokenizer": _keyframe_detokenizer_step, "stages.video_detokenizer": _video_detokenizer_step}


def stage_step_memory(stage: torch.nn.Module, module_path: str, micro_batch: int, view: dict,
                      bf16: bool) -> StepMemory:
    """Peak bytes of forward + backward of ``stage`` (built on the meta device; turned into fake tensors
    here, in place) at ``micro_batch`` samples of the view's shapes (``view``: its ``init_args``)."""
    mode = FakeTensorMode()
    fake_module(stage, mode)
    stage.train()
    gradients = sum(p.numel() * p.element_size() for p in stage.parameters() if p.requires_grad)
    switch = _checkpointable(stage)
    notes = []
    results = {}
    for checkpointing in ([False, True] if switch else [False]):
        _set_checkpointing(switch, checkpointing)
        with mode:
            step = STEPS[module_path](stage, micro_batch, view)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with mode, PeakMemory() as peak:
            with autocast:
                loss = step()
            loss.backward()
            for param in stage.parameters():
                param.grad = None
        results[checkpointing] = peak.peak_bytes - gradients
        if peak.standins_used:
            used = ", ".join(sorted(peak.standins_used))
            note = f"data-dependent operations planned at their largest output ({used})"
            if note not in notes:
                notes.append(note)
    if not switch:
        notes.append("this stage has no activation checkpointing switch: activations_checkpointed is not available")
    return StepMemory(activations=results[False], activations_checkpointed=results.get(True), gradients=gradients,
                      notes=notes)


def sibling_config(config_path: str | Path, export_dir: str | None) -> Path | None:
    """The experiments/<stage>.yaml next to ``config_path`` that writes ``export_dir`` (runs/<stage>/export)."""
    if not export_dir:
        return None
    name = Path(export_dir).parent.name
    candidate = Path(config_path).parent / f"{name}.yaml"
    return candidate if candidate.is_file() else None
