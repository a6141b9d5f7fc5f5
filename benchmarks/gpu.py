"""One prepared GPU measurement: step time, throughput, MFU (LLM) and peak memory per stage.

    python benchmarks/gpu.py                 # on one H100/H200: meant to finish within 8 minutes
    python benchmarks/gpu.py --tiny          # tiny sizes on CPU: checks the script runs (tests/test_gpu_benchmark.py)

Stages measured (their real training step code, random inputs so no data pipeline is measured):

* ``llm``: ``PretrainStage`` with Llama-2-7B-shaped layers (hidden 4096, intermediate 11008, 32 heads,
  the release vocabulary of 49412 rows), ``--llm-layers`` decoder layers (32 do not fit one GPU with
  AdamW), FSDP2 ``fully_shard`` on a 1-rank mesh with a bf16 ``MixedPrecisionPolicy``, activation
  checkpointing, ``--llm-batch`` rows of ``--seq-len`` tokens. MFU = tokens/s x training FLOPs per token
  (``videolavit.llm.flops``, for the layers built) / ``--peak-tflops``.
* ``motion_tokenizer``: ``MotionTokenizerStage`` at the release size (experiments/stage1_motion_tokenizer.yaml),
  bf16 autocast, ``--motion-batch`` clips per step.

* ``keyframe_unet`` (g_I): the keyframe detokenizer's U-Net at the sizes of
  experiments/stage1_keyframe_detokenizer.yaml (SDXL's, full width and depth), bf16 autocast, its
  activation checkpointing as configured, ``--unet-batch`` latents of ``--image-size`` / 8 with the
  feature decoder's 256 context tokens; an epsilon MSE step (the conditioning networks are not run).
* ``video_unet`` (g_V): ``VideoDetokenizer`` at the sizes of experiments/stage1_video_detokenizer.yaml
  (SVD-xt's U-Net and the motion-condition encoder, full width and depth), bf16 autocast, checkpointing,
  ``--unet-batch`` clips of 24 frames at ``--video-size`` / 8 latents; its own conditioning and EDM loss.

``--tiny`` takes the U-Net sizes from experiments/tiny/ instead.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.base import OptimizerConfig  # noqa: E402
from stages.motion_tokenizer import MotionTokenizerStage  # noqa: E402
from stages.pretrain import NEW_ROW_PARAMETERS, PretrainStage  # noqa: E402
from videolavit.llm.flops import training_flops_per_token  # noqa: E402
from videolavit.llm.text_tokenizer import build_tiny_tokenizer  # noqa: E402
from videolavit.llm.vocabulary import Vocabulary  # noqa: E402
from videolavit.models.motion_tokenizer import MotionTokenizerConfig  # noqa: E402

LLAMA2_7B_LAYER = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY_LAYER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=256, rms_norm_eps=1e-5)
H100_BF16_DENSE_TFLOPS = 989.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def _timed(step, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def bench_llm(args, device: torch.device, scratch: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    vocabulary = Vocabulary(text_size=300, visual_codes=16, motion_codes=32) if args.tiny else Vocabulary.release()
    tokenizer = scratch / "tokenizer"
    build_tiny_tokenizer(tokenizer, ["a red circle moves left", "a blue square"], vocab_size=vocabulary.text_size)
    config = {**(TINY_LAYER if args.tiny else LLAMA2_7B_LAYER), "num_hidden_layers": args.llm_layers}
    stage = PretrainStage(tokenizer_path=str(tokenizer), vocabulary=vocabulary, llm_config=config,
                          activation_checkpointing=True,
                          fsdp_param_dtype="bfloat16" if device.type == "cuda" else None,
                          optimizer=OptimizerConfig(lr=1e-5, warmup_steps=0, total_steps=1000,
                                                    extra_lr={name: 1e-5 for name in NEW_ROW_PARAMETERS}))
    stage._device_mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("data_parallel",))
    stage.configure_model()  # FSDP2 on the 1-rank mesh (moves the shards to the device)
    stage.train()
    optimizer = stage.configure_optimizers()["optimizer"]
    rows, length = args.llm_batch, args.seq_len
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocabulary.size, (rows, length), generator=generator).to(device)
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(length, device=device).expand(rows, -1),
             "modality": vocabulary.modality_of(ids.cpu()).to(device)}

    def step():
        ce, valid, _ = stage.token_losses(batch)
        (ce.sum() / valid.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = _timed(step, device, args.warmup, args.steps)
    tokens_per_s = rows * length / step_s
    flops = training_flops_per_token(stage.llm.config, length)
    mfu = tokens_per_s * flops / (args.peak_tflops * 1e12) if device.type == "cuda" else None
    return {"stage": "llm", "layers": args.llm_layers, "batch": rows, "seq_len": length, "step_s": step_s,
            "throughput": tokens_per_s, "unit": "tokens/s", "mfu": mfu, "peak_memory_gb": _peak_gb(device)}


def bench_motion_tokenizer(args, device: torch.device) -> dict:
    if args.tiny:
        config = MotionTokenizerConfig(num_frames=24, height=8, width=8, dim=32, num_heads=2,
                                       blocks_per_stage=(1, 1, 1, 1), num_codes=64, code_dim=8)
    else:
        config = MotionTokenizerConfig(num_frames=24, height=20, width=36, dim=512, num_heads=8,
                                       blocks_per_stage=(3, 3, 3, 3),
                                       stage_factors=((1, 2, 2), (2, 1, 1), (2, 1, 1), (2, 2, 2)),
                                       downsample="conv", conv_kernel_size=3, num_codes=1024, code_dim=32)
    stage = MotionTokenizerStage(tokenizer=config, optimizer=OptimizerConfig(warmup_steps=0, total_steps=1000))
    stage.to(device).train()
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    motion = torch.randn(args.motion_batch, 2, config.num_frames, config.height, config.width, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = stage.model(motion)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = _timed(step, device, args.warmup, args.steps)
    return {"stage": "motion_tokenizer", "batch": args.motion_batch, "step_s": step_s,
            "throughput": args.motion_batch / step_s, "unit": "clips/s", "mfu": None,
            "peak_memory_gb": _peak_gb(device)}


def _model_sizes(name: str, tiny: bool) -> dict:
    import yaml

    path = REPO / "experiments" / ("tiny/" + name.split("_", 1)[1] if tiny else name)
    return yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["init_args"]


def _train_loop(model: torch.nn.Module, loss_fn, device: torch.device, args) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = loss_fn()
        loss.float().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _timed(step, device, args.warmup, args.steps)


def bench_keyframe_unet(args, device: torch.device) -> dict:
    from videolavit.models.keyframe_unet import KeyframeUNet, KeyframeUNetConfig

    config = KeyframeUNetConfig(**_model_sizes("stage1_keyframe_detokenizer", args.tiny)["unet"])
    unet = KeyframeUNet(config).to(device).train()
    side = args.image_size // (1 if args.tiny else 8)  # the tiny config diffuses pixels
    b = args.unet_batch
    x = torch.randn(b, config.in_channels, side, side, device=device)
    context = torch.randn(b, 256 if not args.tiny else 16, config.context_dim, device=device)
    pooled = torch.randn(b, config.pooled_dim, device=device)
    time_ids = torch.tensor([[args.image_size, args.image_size, 0, 0, args.image_size, args.image_size]] * b,
                            dtype=torch.float32, device=device)
    c_noise = torch.rand(b, device=device) * 999

    def loss_fn():
        out = unet(x, c_noise, context=context, pooled=pooled, time_ids=time_ids)
        return (out.float() - x).pow(2).mean()

    step_s = _train_loop(unet, loss_fn, device, args)
    return {"stage": "keyframe_unet", "batch": b, "resolution": f"{args.image_size}x{args.image_size}",
            "checkpointing": config.gradient_checkpointing, "step_s": step_s, "throughput": b / step_s,
            "unit": "images/s", "mfu": None, "peak_memory_gb": _peak_gb(device)}


def bench_video_unet(args, device: torch.device) -> dict:
    from videolavit.models.video_detokenizer import VideoDetokenizer, VideoDetokenizerConfig

    sizes = _model_sizes("stage1_video_detokenizer", args.tiny)
    model = VideoDetokenizer(VideoDetokenizerConfig(**sizes["detokenizer"])).to(device).train()
    if sizes.get("gradient_checkpointing", not args.tiny):
        model.unet.enable_gradient_checkpointing()
    cfg = model.config
    down = 1 if args.tiny else 8
    h, w = (s // down for s in args.video_size)
    frames, b, channels = cfg.motion_encoder.num_frames, args.unet_batch, model.latent_channels
    x0 = torch.randn(b, frames, channels, h, w, device=device)
    keyframe = torch.randn(b, channels, h, w, device=device)
    motion = torch.randn(b, 2, frames, cfg.motion_encoder.height, cfg.motion_encoder.width, device=device)

    def loss_fn():
        return model.loss(x0, model.conditioning(keyframe, motion))

    step_s = _train_loop(model, loss_fn, device, args)
    return {"stage": "video_unet", "batch": b, "resolution": f"{args.video_size[0]}x{args.video_size[1]}x{frames}",
            "checkpointing": model.unet.is_gradient_checkpointing, "step_s": step_s, "throughput": b / step_s,
            "unit": "clips/s", "mfu": None, "peak_memory_gb": _peak_gb(device)}


STAGES = ("llm", "motion_tokenizer", "keyframe_unet", "video_unet")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (a check that the script runs)")
    parser.add_argument("--llm-layers", type=int, default=None, help="decoder layers (default 8; tiny 2)")
    parser.add_argument("--llm-batch", type=int, default=None, help="rows per step (default 4; tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048; tiny 32)")
    parser.add_argument("--motion-batch", type=int, default=None, help="clips per step (default 16; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help=f"the GPU's peak dense bf16 TFLOP/s for MFU (default {H100_BF16_DENSE_TFLOPS:g}: H100 SXM)")
    parser.add_argument("--unet-batch", type=int, default=None, help="images / clips per U-Net step (default 2; tiny 1)")
    parser.add_argument("--image-size", type=int, default=None, help="g_I pixels (default 1024; tiny 16)")
    parser.add_argument("--video-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="g_V pixels (default 384 384; tiny 16 16)")
    parser.add_argument("--only", choices=STAGES, default=None)
    args = parser.parse_args(argv)
    defaults = dict(llm_layers=(2, 8), llm_batch=(2, 4), seq_len=(32, 2048), motion_batch=(2, 16), warmup=(1, 3),
                    steps=(2, 10), unet_batch=(1, 2), image_size=(16, 1024), video_size=((16, 16), (384, 384)))
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU here: pass --tiny for the CPU check")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    results = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if args.only in (None, "llm"):
                results.append(bench_llm(args, device, Path(scratch)))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for name, bench in (("motion_tokenizer", bench_motion_tokenizer), ("keyframe_unet", bench_keyframe_unet),
                                ("video_unet", bench_video_unet)):
                if args.only in (None, name):
                    results.append(bench(args, device))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    finally:
        torch.distributed.destroy_process_group()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}")
    print(f"{'stage':<18} {'step s':>8} {'throughput':>14} {'unit':<9} {'MFU':>6} {'peak GB':>8}")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        peak = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        print(f"{r['stage']:<18} {r['step_s']:>8.3f} {r['throughput']:>14,.1f} {r['unit']:<9} {mfu:>6} {peak:>8}")
    print(json.dumps({"device": name, "tiny": args.tiny, "results": results}))
    return results


if __name__ == "__main__":
    main()
