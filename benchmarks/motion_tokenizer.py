"""Motion-tokenizer encode throughput (clips/s) and single-clip latency, CPU and (when present) CUDA.

    python benchmarks/motion_tokenizer.py [--iterations 3] [--full-cpu-iterations 2] [--train-steps 10]
                                          [--threads N]

Sizes come from the stage configs themselves: ``tiny`` = experiments/tiny/motion_tokenizer.yaml,
``release`` = experiments/stage1_motion_tokenizer.yaml (24x20x36 -> 135 tokens), and on CUDA also the
paper variants (24x16x16 -> 256 / 64 tokens). Encoding runs under ``torch.inference_mode()``, on CUDA
with bf16 autocast (the task head and code lookup stay fp32 by design). On CUDA a training step
(forward, backward, AdamW) at the full configs' per-GPU batch is timed too, with its peak memory, to
size a run: 100k steps at global batch 512 on 64 GPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from videolavit.config_files import read_config  # noqa: E402
from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig  # noqa: E402

CONFIGS = {
    "tiny": "experiments/tiny/motion_tokenizer.yaml",
    "release": "experiments/stage1_motion_tokenizer.yaml",
    "paper256": "experiments/stage1_motion_tokenizer_paper256.yaml",
    "paper64": "experiments/stage1_motion_tokenizer_paper64.yaml",
}


def load_config(name: str) -> tuple[MotionTokenizerConfig, int]:
    """The tokenizer of a stage config and its per-GPU training batch."""
    config = read_config(REPO / CONFIGS[name])
    trainer, data = config["trainer"], config["data"]["init_args"]
    devices = int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1))
    return MotionTokenizerConfig(**config["model"]["init_args"]["tokenizer"]), data["batch_size"] // devices


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def time_encode(model: MotionTokenizer, batch: int, iterations: int, device: torch.device,
                warmup: bool = True) -> tuple[float, float]:
    """Best (wall, process CPU) seconds per ``encode`` call of ``batch`` random clips, after one warm-up
    call if ``warmup``. CPU time shows what the work costs when the machine is shared."""
    c = model.config
    motion = torch.randn(batch, c.in_channels, c.num_frames, c.height, c.width, device=device)
    best, best_cpu = float("inf"), float("inf")
    with torch.inference_mode(), _autocast(device):
        if warmup:
            model.encode(motion)
            _sync(device)
        for _ in range(iterations):
            start, start_cpu = time.perf_counter(), time.process_time()
            ids = model.encode(motion)
            _sync(device)
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - start_cpu)
    assert ids.shape == (batch, model.num_tokens)
    return best, best_cpu


def bench_encode(name: str, device: torch.device, batch: int, iterations: int, warmup: bool = True) -> None:
    config, _ = load_config(name)
    model = MotionTokenizer(config).to(device).eval()
    encoder = sum(p.numel() for m in (model.encoder, model.encode_task_layer) for p in m.parameters()) / 1e6
    latency, _ = time_encode(model, 1, iterations, device, warmup)
    per_batch, per_batch_cpu = time_encode(model, batch, iterations, device, warmup)
    grid = "x".join(map(str, (config.num_frames, config.height, config.width)))
    cpu = f"  CPU time {per_batch_cpu / batch * 1e3:9.2f} ms/clip" if device.type == "cpu" else ""
    print(f"  {name:<9} {grid:>9} -> {model.num_tokens:3d} tokens  encoder {encoder:5.1f}M params  "
          f"batch {batch:3d}: {batch / per_batch:9.3g} clips/s ({per_batch / batch * 1e3:9.2f} ms/clip)  "
          f"batch 1 latency: {latency * 1e3:9.2f} ms{cpu}", flush=True)


def bench_train_step(name: str, device: torch.device, steps: int) -> None:
    """Forward + backward + AdamW at the config's per-GPU batch, bf16 autocast, as ``fit`` runs it."""
    config, batch = load_config(name)
    model = MotionTokenizer(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-6, fused=True)
    motion = torch.randn(batch, 2, config.num_frames, config.height, config.width, device=device)

    def step():
        with _autocast(device):
            loss = model(motion)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    hours = 100_000 * seconds / 3600
    print(f"  {name:<9} train step, batch {batch}/GPU: {seconds * 1e3:7.1f} ms/step  {batch / seconds:7.1f} clips/s/GPU  "
          f"peak {peak:5.1f} GiB  -> 100k steps ~{hours:5.1f} h (compute only, no DDP/data overhead)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed calls per measurement (best is kept)")
    parser.add_argument("--full-cpu-iterations", type=int, default=2,
                        help="timed calls for the release size on CPU (~10-25 s per clip; no warm-up call)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps on CUDA (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"CPU ({torch.get_num_threads()} threads), fp32, inference_mode:")
    bench_encode("tiny", torch.device("cpu"), batch=16, iterations=args.iterations)
    bench_encode("release", torch.device("cpu"), batch=2, iterations=args.full_cpu_iterations, warmup=False)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"CUDA ({torch.cuda.get_device_name(device)}), bf16 autocast, inference_mode:")
        for name, batch in (("tiny", 256), ("release", 64), ("paper256", 64), ("paper64", 64)):
            bench_encode(name, device, batch=batch, iterations=max(args.iterations, 10))
        if args.train_steps:
            print("CUDA training step:")
            for name in ("release", "paper256"):
                bench_train_step(name, device, args.train_steps)
    else:
        print("CUDA: not available")


if __name__ == "__main__":
    main()
