"""``python -m videolavit plan --config experiments/<stage>.yaml``: will this config fit, and how long will it take.

Per rank: bytes of parameters, gradients, AdamW state, FSDP2 gathered buffers and activations (with and
without activation checkpointing) at the config's micro-batch (global ``data.batch_size`` over ranks and
``accumulate_grad_batches``) and sequence length, against the GPU's memory; for the LLM stages also FLOPs
per optimizer step (``videolavit.llm.flops``), the step time and wall days at 40% and 50% MFU, and the
tokens per second the data loader must deliver per GPU. ``--nodes`` / ``--gpus-per-node`` keep the global
batch and the micro-batch and change the gradient accumulation. The last line is one JSON object.
LLM stages are planned as FSDP2 (``plan_llm``), stage-1 stages as DDP with activations run on fake tensors
(``plan_ddp``); their docstrings say where each number comes from. ``--all`` plans every
experiments/stage*.yaml and ends with a table and one JSON line.
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
    parser.add_argument("--config", default=None, help="a full training config (experiments/<stage>.yaml)")
    parser.add_argument("--all", nargs="?", const="experiments", default=None, metavar="DIR",
                        help="plan every stage*.yaml in DIR (default experiments) and end with a table")
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
    tokens = _init_args(_init_args(config.get("data")).get("view")).get("tokens") or {}
    if "seq_len" not in tokens:
        raise PlanError("data.init_args.view.init_args.tokens.seq_len is not set (the LLM's row length)")
    return int(tokens["seq_len"])


def plan_llm(config: dict, layout: dict, args: argparse.Namespace) -> dict:
    """Plan of an LLM stage (FSDP2).

    The architecture comes from ``llm_path``'s config.json when that directory exists, else from ``llm_config``,
    else (labelled) Llama-2-7B's shape with the config's vocabulary.
    """
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


def _build_on_meta(model_section: dict):
    """A stage (or any ``class_path`` section) built on the meta device from its YAML."""
    import lightning.pytorch as pl
    import torch
    from jsonargparse import ArgumentParser

    from videolavit.models.latent_space import LATENT_SPACES
    from videolavit.planning.latent_stand_in import ShapeOnlyLatentSpace

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    # Configs may only name registered latent spaces; the stand-in is registered for this build alone.
    stand_in = f"{ShapeOnlyLatentSpace.__module__}.{ShapeOnlyLatentSpace.__qualname__}"
    LATENT_SPACES[stand_in] = ShapeOnlyLatentSpace
    try:
        with torch.device("meta"):
            return parser.instantiate_classes(parser.parse_object({"model": model_section})).model
    except Exception as error:  # jsonargparse wraps the stage's own errors
        raise PlanError(f"cannot build {model_section.get('class_path')} from the config: "
                        f"{str(error).splitlines()[0]}") from None
    finally:
        LATENT_SPACES.pop(stand_in, None)


def _export_config(config_path: str, export_dir: str | None, name: str, what: str) -> tuple[dict, str]:
    """The ``config`` recorded in ``export_dir``'s ``name``.json, else the ``model.init_args`` of the sibling
    experiments config that writes that export (this machine has no exports of full runs)."""
    from videolavit.commands.stage_step_memory import sibling_config

    record = Path(export_dir or "", f"{name}.json")
    if export_dir and record.is_file():
        return json.loads(record.read_text())["config"], f"{what} from {record}"
    sibling = sibling_config(config_path, export_dir)
    if sibling is None:
        raise PlanError(f"{what}: {export_dir} is not on this machine and no experiments config writes it; "
                        "point init_from at an export directory or at runs/<stage>/export of a config beside this one")
    return _init_args(_read_config(str(sibling))["model"]), f"{what} sized from {sibling}"


def _meta_stage(model_section: dict, config_path: str):
    """The stage built on the meta device from its YAML (file-backed parts replaced by their shapes)."""
    import torch

    from videolavit.planning.latent_stand_in import ShapeOnlyLatentSpace

    section = json.loads(json.dumps(model_section))
    init = section.setdefault("init_args", {})
    class_path = str(section.get("class_path", ""))
    notes = []
    if init.get("backbone_weights"):
        init["backbone_weights"] = None
        notes.append("keyframe ViT built from its config (its weight file is read in the real run)")
    latent = init.get("latent_space")
    if isinstance(latent, dict) and str(latent.get("class_path", "")).endswith("VaeLatentSpace"):
        init["latent_space"] = {"class_path": f"{ShapeOnlyLatentSpace.__module__}.ShapeOnlyLatentSpace",
                                "init_args": {"channels": 4, "downsample": 8}}
        notes.append("the frozen VAE is not counted (its directory is read in the real run)")
    init_from = init.pop("init_from", None) if class_path.rpartition(".")[0] in (
        "stages.keyframe_detokenizer", "stages.video_detokenizer") else None
    for key in ("unet_weights", "unet_init", "weights_from"):  # read in setup, not needed for shapes
        if init.get(key):
            init[key] = None
    stage = _build_on_meta(section)
    if class_path == "stages.keyframe_detokenizer.KeyframeDetokenizerStage":
        from videolavit.models.keyframe_detokenizer import KeyframeDetokenizer, KeyframeDetokenizerConfig
        from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
        from videolavit.models.keyframe_tokenizer import KeyframeTokenizer, KeyframeTokenizerConfig

        sizes, source = _export_config(config_path, init_from, "keyframe_tokenizer", "frozen keyframe tokenizer")
        tokenizer_config = KeyframeTokenizerConfig(**sizes["tokenizer"]) if "tokenizer" in sizes else \
            KeyframeTokenizerConfig(**sizes)
        if "decoder" in sizes:
            decoder = KeyframeFeatureDecoderConfig(**sizes["decoder"])
        else:
            decoder_sizes, _ = _export_config(config_path, init_from, "keyframe_feature_decoder", "feature decoder")
            decoder = KeyframeFeatureDecoderConfig(**decoder_sizes)
        with torch.device("meta"):
            stage.tokenizer = KeyframeTokenizer(tokenizer_config).requires_grad_(False).eval()
            stage.detokenizer = KeyframeDetokenizer(KeyframeDetokenizerConfig(
                unet=stage.unet_config, decoder=decoder, diffusion=stage.diffusion_config,
                num_codes=tokenizer_config.num_codes, code_dim=tokenizer_config.code_dim,
                image_size=stage.image_size, latent_downsample=stage.latent_space.downsample))
        stage.detokenizer.codebook.requires_grad_(False)
        notes.append(source)
    elif class_path == "stages.video_detokenizer.VideoDetokenizerStage" and stage.motion_source == "tokenizer":
        from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig

        sizes, source = _export_config(config_path, init_from, "motion_tokenizer", "frozen motion tokenizer")
        with torch.device("meta"):
            stage.motion_tokenizer = MotionTokenizer(MotionTokenizerConfig(**sizes.get("tokenizer", sizes)))
        stage.motion_tokenizer.requires_grad_(False).eval()
        notes.append(source)
    return stage, notes


def plan_ddp(config: dict, layout: dict, args: argparse.Namespace) -> dict:
    """Plan of a stage-1 stage (DDP).

    Each rank holds the whole model, its gradients, DDP's gradient buckets and the optimizer state; the networks are
    built on the meta device from the YAML to count them exactly (frozen parts whose files are absent here are sized
    from the experiments config that writes them, or not counted, and the output says so). Their activations are the
    peak of one training step's forward and backward at the micro-batch, run on fake tensors
    (``stage_step_memory``), with the U-Nets' activation checkpointing on and off.
    """
    from videolavit.commands.stage_step_memory import stage_step_memory

    class_path = str(config["model"].get("class_path", ""))
    stage, notes = _meta_stage(config["model"], args.config)
    trainable = frozen = 0
    frozen_prefixes = tuple(stage.frozen_prefixes())
    for name, param in stage.named_parameters():
        if param.requires_grad and not name.startswith(frozen_prefixes):
            trainable += param.numel()
        else:
            param.requires_grad_(False)
            frozen += param.numel()
    view = _init_args(_init_args(config.get("data")).get("view"))
    checkpointing = _configured_checkpointing(config)
    step = stage_step_memory(stage, class_path.rpartition(".")[0], layout["micro_batch"], view,
                             bf16="bf16" in layout["precision"])
    master = 4  # Lightning's mixed precision keeps fp32 weights
    terms = {"parameters": (trainable + frozen) * master, "gradients": trainable * master,
             "ddp_buckets": trainable * master, "optimizer": 2 * trainable * master,
             "activations": step.activations, "activations_checkpointed": step.activations_checkpointed,
             "reserve": int(args.reserve_gb * GIB)}
    if step.activations_checkpointed is None:
        checkpointing = False
    used = "activations_checkpointed" if checkpointing else "activations"
    total = sum(v for k, v in terms.items() if v is not None and not k.startswith("activations")) + terms[used]
    notes += step.notes
    return {"kind": "ddp", "model_source": class_path, "activation_checkpointing": checkpointing,
            "parameters_b": (trainable + frozen) / 1e9, "trainable_parameters_b": trainable / 1e9,
            "terms": terms, "total": total, "activations_estimated": True,
            "flops_per_step": None, "work_per_gpu_step": (layout["micro_batch"] * layout["accumulate_grad_batches"],
                                                          "samples"), "notes": notes}


def _configured_checkpointing(config: dict) -> bool:
    """Whether the stage-1 config switches the U-Net's activation checkpointing on."""
    init = _init_args(config["model"])
    unet = init.get("unet") or {}
    return bool(init.get("gradient_checkpointing") or (isinstance(unet, dict) and unet.get("gradient_checkpointing")))


def plan_config(path: str, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(config, layout, plan) of one config file; PlanError when it cannot be planned."""
    config = _read_config(path)
    class_path = str(config["model"].get("class_path", ""))
    known = {"stages.motion_tokenizer", "stages.keyframe_tokenizer", "stages.keyframe_detokenizer",
             "stages.video_detokenizer"}
    if class_path not in LLM_STAGES and class_path.rpartition(".")[0] not in known:
        raise PlanError(f"plan does not know the stage {class_path!r} (model.class_path)")
    layout = _layout(config, args)
    if class_path in LLM_STAGES:
        return config, layout, plan_llm(config, layout, args)
    strategy = (config.get("trainer") or {}).get("strategy")
    if strategy not in ("ddp", None):
        raise PlanError(f"{class_path} with strategy {strategy!r}: plan knows FSDP2 for the LLM stages and "
                        "DDP for the others")
    return config, layout, plan_ddp(config, layout, args)


def run(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.all is None):
        print("error: pass --config experiments/<stage>.yaml or --all [experiments]", file=sys.stderr)
        return 2
    paths = [args.config] if args.config else sorted(str(p) for p in Path(args.all).glob("stage*.yaml"))
    if not paths:
        print(f"error: --all {args.all}: no stage*.yaml configs there", file=sys.stderr)
        return 2
    summaries = []
    for path in paths:
        try:
            args.config = path
            config, layout, plan = plan_config(path, args)
        except PlanError as error:
            print(f"error: {path}: {error}" if len(paths) > 1 else f"error: {error}", file=sys.stderr)
            return 2
        summaries.append(_print(args, config, layout, plan))
        if len(paths) > 1:
            print()
    if len(paths) > 1:
        _print_all(summaries)
    return 0


def _print_all(summaries: list[dict]) -> None:
    """One row per config, then one JSON line for all of them."""
    def gb(value):
        return f"{value:8.2f}" if value is not None else f"{'n/a':>8}"

    print(f"{'config':<46} {'ranks':>5} {'micro':>5} {'params+grads+opt GB':>20} {'acts GB':>8} "
          f"{'acts ckpt GB':>12} {'ckpt':>5} {'per rank GB':>11} fits")
    for s in summaries:
        terms = s["terms_gb"]
        fixed = sum(v for k, v in terms.items() if v is not None and not k.startswith("activations")
                    and k != "reserve")
        print(f"{Path(s['config']).name:<46} {s['world']:>5} {s['micro_batch']:>5} {fixed:>20.2f} "
              f"{gb(terms['activations'])} {gb(terms['activations_checkpointed']):>12} "
              f"{'on' if s['activation_checkpointing'] else 'off':>5} {s['per_rank_gb']:>11.2f} "
              f"{'yes' if s['fits'] else 'NO'}")
    print(json.dumps({"configs": summaries, "per_rank_gb": max(s["per_rank_gb"] for s in summaries),
                      "fits": all(s["fits"] for s in summaries)}))


def _print(args: argparse.Namespace, config: dict, layout: dict, plan: dict) -> dict:
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
        shown = f"{value / GIB:10.2f}" if value is not None else f"{'n/a':>10}"
        print(f"  {name:<26} {shown}{mark}")
    fits = plan["total"] <= gpu_bytes
    print(f"  {'total':<26} {plan['total'] / GIB:10.2f} of {args.gpu_memory_gb:g} -> "
          f"{'fits' if fits else 'DOES NOT FIT'}")
    summary = {"config": args.config, "stage": config["model"]["class_path"], "world": world,
               "micro_batch": layout["micro_batch"], "accumulate_grad_batches": layout["accumulate_grad_batches"],
               "per_rank_gb": round(plan["total"] / GIB, 3), "gpu_memory_gb": args.gpu_memory_gb, "fits": fits,
               "activations_estimated": plan["activations_estimated"],
               "activation_checkpointing": plan["activation_checkpointing"],
               "terms_gb": {k: (round(v / GIB, 3) if v is not None else None) for k, v in terms.items()}}
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
    return summary
