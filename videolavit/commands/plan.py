"""``python -m videolavit plan --config experiments/<stage>.yaml``: will this config fit, and how long will it take.

Per rank: bytes of parameters, gradients, AdamW state, FSDP2 gathered buffers and activations (with and
without activation checkpointing) at the config's micro-batch (global ``data.batch_size`` over ranks and
``accumulate_grad_batches``) and sequence length, against the GPU's memory; for the LLM stages also FLOPs
per optimizer step (``videolavit.llm.flops``), the step time and wall days at 40% and 50% MFU, and the
tokens per second the data loader must deliver per GPU. ``--nodes`` / ``--gpus-per-node`` keep the global
batch and the micro-batch and change the gradient accumulation. The last line is one JSON object.

LLM stages (FSDP2): the architecture comes from ``llm_path``'s config.json when that directory exists,
else from ``llm_config``, else (labelled) Llama-2-7B's shape with the config's vocabulary. Stage-1 stages
(DDP): each rank holds the whole model, its gradients, DDP's gradient buckets and the optimizer state;
the trainable networks are built on the meta device from the YAML to count them exactly (frozen parts
whose files are absent here are not counted and the output says so). Their activations are not
estimated (their forwards take data-dependent branches that need real tensors), so ``fits`` for them
covers the parameter-sized terms only and is labelled ``activations_estimated: false``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "per-rank memory, FLOPs and wall time of a training config before running it"
GIB = 1024**3
LLM_STAGES = ("stages.pretrain.PretrainStage", "stages.instruct.InstructStage")
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores (NVIDIA datasheet)


class PlanError(ValueError):
    """A config the plan cannot read; the message says what to set."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a full training config (experiments/<stage>.yaml)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: trainer.num_nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: trainer.devices)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help=f"peak bf16 TFLOP/s per GPU (default {H100_BF16_DENSE_TFLOPS:g}: H100 SXM dense)")
    parser.add_argument("--reserve-gb", type=float, default=4.0,
                        help="per-GPU memory set aside for the CUDA context, NCCL and fragmentation (default 4)")


def _init_args(section: dict | None) -> dict:
    return dict((section or {}).get("init_args") or {})


def _read_config(path: str) -> dict:
    from videolavit.config_files import ConfigBaseError, read_config

    file = Path(path)
    if not file.is_file():
        raise PlanError(f"config {path} does not exist: pass --config experiments/<stage>.yaml")
    try:
        config = read_config(file)
    except ConfigBaseError as error:  # not YAML, or a missing, unreadable or cyclic `base:`
        raise PlanError(f"config {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise PlanError(f"config {path} has no model section (model.class_path / model.init_args)")
    return config


def _layout(config: dict, args: argparse.Namespace) -> dict:
    trainer = config.get("trainer") or {}
    nodes = args.nodes or int(trainer.get("num_nodes") or 1)
    gpus = args.gpus_per_node or int(trainer.get("devices") or 1)
    world = nodes * gpus
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    data = _init_args(config.get("data"))
    if "batch_size" not in data:
        raise PlanError("data.init_args.batch_size (the global batch) is not set")
    global_batch = int(data["batch_size"])
    configured_world = int(trainer.get("num_nodes") or 1) * int(trainer.get("devices") or 1)
    if global_batch % (configured_world * accumulate):
        raise PlanError(f"data.batch_size={global_batch} is not a multiple of {configured_world} ranks x "
                        f"accumulate_grad_batches={accumulate}")
    micro = global_batch // (configured_world * accumulate)
    if global_batch % (world * micro):
        raise PlanError(f"{world} GPUs with micro-batch {micro} cannot make the global batch {global_batch}: "
                        "choose --nodes/--gpus-per-node that divide it")
    return {"nodes": nodes, "gpus_per_node": gpus, "world": world, "global_batch": global_batch,
            "micro_batch": micro, "accumulate_grad_batches": global_batch // (world * micro),
            "max_steps": int(trainer.get("max_steps") or 0), "precision": str(trainer.get("precision", "32"))}


def _vocabulary(init: dict):
    from videolavit.llm.vocabulary import Vocabulary

    sizes = init.get("vocabulary")
    if isinstance(sizes, dict):
        return Vocabulary(**{k: int(v) for k, v in sizes.items()})
    return None


def _llm_shape(init: dict) -> tuple:
    """The LLM's shape and where it came from."""
    from videolavit.planning.llm_memory import LLAMA2_7B, LlamaShape

    vocabulary = _vocabulary(init)
    path = init.get("llm_path") or init.get("init_from")
    if path and Path(path, "config.json").is_file():
        from transformers import LlamaConfig

        config = LlamaConfig.from_pretrained(path, local_files_only=True)
        if vocabulary is None:
            from videolavit.inference.video_chat import read_llm_vocabulary

            vocabulary = read_llm_vocabulary(path)
        config.vocab_size = vocabulary.size
        return LlamaShape.from_config(config), f"{path}/config.json"
    if init.get("llm_config"):
        from transformers import LlamaConfig

        sizes = dict(init["llm_config"])
        sizes["vocab_size"] = vocabulary.size if vocabulary is not None else sizes.get("vocab_size", 32000)
        return LlamaShape.from_config(LlamaConfig(**sizes)), "model.llm_config"
    size = vocabulary.size if vocabulary is not None else 49412
    shape = LlamaShape(**{**LLAMA2_7B.__dict__, "vocab_size": size})
    return shape, f"ASSUMED Llama-2-7B shape ({path or 'no llm_path'} not on this machine), vocabulary {size}"


def _seq_len(config: dict) -> int:
    view = _init_args(_init_args(config.get("data")).get("view"))
    if "seq_len" not in view:
        raise PlanError("data.init_args.view.init_args.seq_len is not set (the LLM's row length)")
    return int(view["seq_len"])


def plan_llm(config: dict, layout: dict, args: argparse.Namespace) -> dict:
    import torch

    from videolavit.llm.flops import training_flops_per_token
    from videolavit.planning.llm_memory import llama_fsdp_memory

    init = _init_args(config["model"])
    shape, source = _llm_shape(init)
    seq_len = _seq_len(config)
    bf16 = "bf16" in layout["precision"] or init.get("fsdp_param_dtype") == "bfloat16"
    master = getattr(torch, str(init.get("load_dtype") or "float32"))
    memory = llama_fsdp_memory(shape, layout["micro_batch"], seq_len, shards=layout["world"],
                               activation_checkpointing=bool(init.get("activation_checkpointing", False)),
                               master_dtype=master, compute_dtype=torch.bfloat16 if bf16 else torch.float32,
                               reserve_bytes=int(args.reserve_gb * GIB))
    flops_per_step = training_flops_per_token(shape.config(), seq_len) * layout["global_batch"] * seq_len
    terms = {"parameters": memory.parameters, "gradients": memory.gradients, "optimizer": memory.optimizer,
             "fsdp_buffers": memory.fsdp_buffers, "activations": memory.activations,
             "activations_checkpointed": memory.activations_checkpointed, "reserve": memory.reserve}
    tokens_per_gpu_step = layout["micro_batch"] * layout["accumulate_grad_batches"] * seq_len
    return {"kind": "llm_fsdp2", "model_source": source, "parameters_b": shape.parameters / 1e9,
            "seq_len": seq_len, "activation_checkpointing": memory.activation_checkpointing,
            "terms": terms, "total": memory.total, "activations_estimated": True,
            "flops_per_step": flops_per_step, "work_per_gpu_step": (tokens_per_gpu_step, "tokens"), "notes": []}


def _meta_stage(model_section: dict):
    """The stage built on the meta device from its YAML (file-backed latent spaces replaced by shapes)."""
    import lightning.pytorch as pl
    import torch
    from jsonargparse import ArgumentParser

    from videolavit.models.latent_space import LATENT_SPACES
    from videolavit.planning.latent_stand_in import ShapeOnlyLatentSpace

    section = json.loads(json.dumps(model_section))
    init = section.setdefault("init_args", {})
    notes = []
    if "backbone_weights" in init and init["backbone_weights"]:
        init["backbone_weights"] = None
        notes.append("keyframe ViT built from its config (its weight file is read in the real run)")
    latent = init.get("latent_space")
    if isinstance(latent, dict) and str(latent.get("class_path", "")).endswith("VaeLatentSpace"):
        init["latent_space"] = {"class_path": f"{ShapeOnlyLatentSpace.__module__}.ShapeOnlyLatentSpace",
                                "init_args": {"channels": 4, "downsample": 8}}
        notes.append("the frozen VAE is not counted (its directory is read in the real run)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    # Configs may only name registered latent spaces; the stand-in is registered for this build alone.
    stand_in = f"{ShapeOnlyLatentSpace.__module__}.{ShapeOnlyLatentSpace.__qualname__}"
    LATENT_SPACES[stand_in] = ShapeOnlyLatentSpace
    try:
        with torch.device("meta"):
            stage = parser.instantiate_classes(parser.parse_object({"model": section})).model
    except Exception as error:  # jsonargparse wraps the stage's own errors
        raise PlanError(f"cannot build {model_section.get('class_path')} from the config: "
                        f"{str(error).splitlines()[0]}") from None
    finally:
        LATENT_SPACES.pop(stand_in, None)
    return stage, notes


def plan_ddp(config: dict, layout: dict, args: argparse.Namespace) -> dict:
    stage, notes = _meta_stage(config["model"])
    trainable = frozen = 0
    frozen_prefixes = tuple(stage.frozen_prefixes())
    for name, param in stage.named_parameters():
        if param.requires_grad and not name.startswith(frozen_prefixes):
            trainable += param.numel()
        else:
            frozen += param.numel()
    master = 4  # Lightning's mixed precision keeps fp32 weights
    terms = {"parameters": (trainable + frozen) * master, "gradients": trainable * master,
             "ddp_buckets": trainable * master, "optimizer": 2 * trainable * master,
             "reserve": int(args.reserve_gb * GIB)}
    notes.append("activations not estimated for DDP stages: fits covers parameters, gradients, buckets, optimizer")
    return {"kind": "ddp", "model_source": config["model"].get("class_path"),
            "parameters_b": (trainable + frozen) / 1e9, "trainable_parameters_b": trainable / 1e9,
            "terms": terms, "total": sum(terms.values()), "activations_estimated": False,
            "flops_per_step": None, "work_per_gpu_step": (layout["micro_batch"] * layout["accumulate_grad_batches"],
                                                          "samples"), "notes": notes}


def run(args: argparse.Namespace) -> int:
    try:
        config = _read_config(args.config)
        class_path = str(config["model"].get("class_path", ""))
        known = {"stages.motion_tokenizer", "stages.keyframe_tokenizer", "stages.keyframe_detokenizer",
                 "stages.video_detokenizer"}
        if class_path not in LLM_STAGES and class_path.rpartition(".")[0] not in known:
            raise PlanError(f"plan does not know the stage {class_path!r} (model.class_path)")
        layout = _layout(config, args)
        if class_path in LLM_STAGES:
            plan = plan_llm(config, layout, args)
        elif class_path.startswith("stages."):
            strategy = (config.get("trainer") or {}).get("strategy")
            if strategy not in ("ddp", None):
                raise PlanError(f"{class_path} with strategy {strategy!r}: plan knows FSDP2 for the LLM stages and "
                                "DDP for the others")
            if class_path.rpartition(".")[0] not in {"stages.motion_tokenizer", "stages.keyframe_tokenizer",
                                                     "stages.keyframe_detokenizer", "stages.video_detokenizer"}:
                raise PlanError(f"plan does not know the stage {class_path}")
            plan = plan_ddp(config, layout, args)
        else:
            raise PlanError(f"plan does not know the stage {class_path!r}: model.class_path must be a stages.* class")
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print(args, config, layout, plan)
    return 0


def _print(args: argparse.Namespace, config: dict, layout: dict, plan: dict) -> None:
    world, gpu_bytes = layout["world"], args.gpu_memory_gb * GIB
    print(f"config: {args.config} ({config['model']['class_path']}, {plan['kind']}, {world} ranks = "
          f"{layout['nodes']} nodes x {layout['gpus_per_node']} GPUs)")
    print(f"model: {plan['parameters_b']:.3f} B parameters from {plan['model_source']}")
    extra = f" x {plan['seq_len']} tokens" if "seq_len" in plan else ""
    print(f"batch: global {layout['global_batch']}{extra} = micro {layout['micro_batch']} x accumulate "
          f"{layout['accumulate_grad_batches']} x {world} ranks")
    print("per rank (GiB):")
    terms = plan["terms"]
    for name, value in terms.items():
        mark = ""
        if name.startswith("activations"):
            used = plan["activation_checkpointing"] == (name == "activations_checkpointed")
            mark = "  <- configured" if used else ""
        print(f"  {name:<26} {value / GIB:10.2f}{mark}")
    fits = plan["total"] <= gpu_bytes
    print(f"  {'total':<26} {plan['total'] / GIB:10.2f} of {args.gpu_memory_gb:g} -> "
          f"{'fits' if fits else 'DOES NOT FIT'}")
    summary = {"config": args.config, "stage": config["model"]["class_path"], "world": world,
               "micro_batch": layout["micro_batch"], "accumulate_grad_batches": layout["accumulate_grad_batches"],
               "per_rank_gb": round(plan["total"] / GIB, 3), "gpu_memory_gb": args.gpu_memory_gb, "fits": fits,
               "activations_estimated": plan["activations_estimated"],
               "terms_gb": {k: round(v / GIB, 3) for k, v in terms.items()}}
    flops = plan["flops_per_step"]
    if flops:
        peak = args.peak_tflops * 1e12 * world
        count, unit = plan["work_per_gpu_step"]
        summary["flops_per_step"] = flops
        print(f"FLOPs per optimizer step: {flops:.3e} (peak {args.peak_tflops:g} TFLOP/s per GPU)")
        for mfu in (0.4, 0.5):
            step_s = flops / (mfu * peak)
            days = step_s * layout["max_steps"] / 86400
            rate = count / step_s
            print(f"  at {mfu:.0%} MFU: {step_s:.2f} s per step, {days:.2f} days for {layout['max_steps']} steps, "
                  f"loader {rate:,.0f} {unit}/s per GPU")
            tag = int(mfu * 100)
            summary[f"step_s_at_{tag}_mfu"] = step_s
            summary[f"days_at_{tag}_mfu"] = days
            summary[f"loader_{unit}_per_s_per_gpu_at_{tag}_mfu"] = rate
    else:
        summary["flops_per_step"] = None
    for note in plan["notes"]:
        print(f"note: {note}")
    print(json.dumps(summary))
