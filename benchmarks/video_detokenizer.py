"""Video detokenizer (g_V) speed: one training step (forward, backward, AdamW) and one sampler step per clip.

    python benchmarks/video_detokenizer.py [--config tiny|full|both] [--batch N] [--iterations 3]

``tiny`` = experiments/tiny/video_detokenizer.yaml (pixel space, 32x32, CPU-sized U-Net); ``full`` =
experiments/stage1_video_detokenizer.yaml's model (SVD-xt U-Net + release motion encoder) on random
latents of its frame size (no VAE needed), only where CUDA is present (bf16 autocast, activation
checkpointing as configured). A sampler step is one guided denoiser call (the [uncond, cond] pair).
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
from videolavit.diffusion.guidance import GuidedDenoiser, LinearFrameGuidance  # noqa: E402
from videolavit.models.video_detokenizer import VideoDetokenizer, VideoDetokenizerConfig  # noqa: E402

CONFIGS = {"tiny": "experiments/tiny/video_detokenizer.yaml", "full": "experiments/stage1_video_detokenizer.yaml"}


def load(name: str) -> tuple[VideoDetokenizerConfig, dict, int, bool]:
    """The detokenizer of a stage config, its video view, per-device training batch and checkpointing."""
    config = read_config(REPO / CONFIGS[name])
    init, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    devices = int(trainer.get("devices", 1)) * int(trainer.get("num_nodes", 1))
    return (VideoDetokenizerConfig(**init["detokenizer"]), data["view"]["init_args"],
            max(1, data["batch_size"] // devices), bool(init.get("gradient_checkpointing", False)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iterations: int) -> tuple[float, float]:
    """Best (wall, process CPU) seconds of ``fn``; CPU time shows the cost when the machine is shared."""
    best = (float("inf"), float("inf"))
    for _ in range(iterations):
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def bench(name: str, device: torch.device, batch: int | None, iterations: int) -> None:
    config, view, per_device, checkpointing = load(name)
    batch = batch or per_device
    torch.manual_seed(0)
    model = VideoDetokenizer(config).to(device)
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    downsample = 1 if config.unet.latent_channels == 3 else 8
    h, w = (s // downsample for s in view["frame_size"])
    frames, (gh, gw) = 24, view["grid"]
    x0 = torch.randn(batch, frames, config.unet.latent_channels, h, w, device=device) * 0.5
    keyframe, motion = x0[:, 0].clone(), torch.randn(batch, 2, frames, gh, gw, device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step() -> None:
        with autocast:
            loss = model.loss(x0, model.conditioning(keyframe, motion))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    train_step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, cpu = timed(train_step, device, iterations)
    memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"{name} on {device.type}: train step {step:.3f} s wall / {cpu:.3f} s CPU for {batch} clips "
          f"({step / batch:.3f} s/clip){memory}")

    model.eval()
    with torch.no_grad(), autocast:
        cond, _ = model.split_residual_base(model.conditioning(keyframe, motion))  # the residual base is no U-Net input
        denoise = GuidedDenoiser(model.denoiser, LinearFrameGuidance(1.0, 4.0), cond, model.unconditional(cond))
        denoise(x0, 1.0)
        step, cpu = timed(lambda: denoise(x0, 1.0), device, iterations)
    print(f"{name} on {device.type}: guided sampler step {step:.3f} s wall / {cpu:.3f} s CPU for {batch} clips "
          f"({step / batch:.3f} s/clip; 25 steps: {25 * step / batch:.1f} s/clip)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "full", "both"], default="both")
    parser.add_argument("--batch", type=int, default=None, help="clips per step (default: the config's per device)")
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    names = ["tiny", "full"] if args.config == "both" else [args.config]
    for name in names:
        if name == "full" and not torch.cuda.is_available():
            print("full: skipped (needs CUDA)")
            continue
        bench(name, torch.device("cuda" if name == "full" else "cpu"), args.batch, args.iterations)


if __name__ == "__main__":
    main()
