"""Fréchet Video Distance (Unterthiner et al. 2018) with a local I3D, as the paper's evaluation uses it.

Protocol (docs/design.md §9): each video becomes 16 frames at 224×224 in [-1, 1]; I3D (Kinetics-400) maps it to
400 class logits averaged over time; the Fréchet distance between the Gaussians fitted to real and
generated logits is reported. Statistics stream as float64 sums, so any number of videos and ranks works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from videolavit.metrics.frechet import FrechetDistance
from videolavit.metrics.i3d import InceptionI3d, i3d_logits, load_i3d
from videolavit.metrics.weights import FrozenNetwork

FrameSampling = Literal["uniform", "first", "center"]
SpatialMode = Literal["resize", "center_crop"]


def sample_frame_indices(num_available: int, num_frames: int, mode: FrameSampling = "uniform") -> Tensor:
    """Indices of ``num_frames`` frames out of ``num_available``.

    "uniform" spreads them evenly over the whole clip (nearest frame), "first"/"center" take a run of
    consecutive frames (StyleGAN-V takes the first ones). Shorter clips are stretched by repeating
    frames (nearest-frame resampling) in every mode, so any length yields exactly ``num_frames``.
    """
    if num_available < 1:
        raise ValueError("a video needs at least one frame")
    if mode == "uniform" or num_available < num_frames:
        return torch.linspace(0, num_available - 1, num_frames).round().long()
    start = 0 if mode == "first" else (num_available - num_frames) // 2
    if mode not in ("first", "center"):
        raise ValueError(f"unknown frame sampling '{mode}'")
    return torch.arange(start, start + num_frames)


def resize_frames(frames: Tensor, resolution: int, mode: SpatialMode = "resize") -> Tensor:
    """Frames [N, C, H, W] → [N, C, R, R] by bilinear resizing ("resize", as the original TF FVD) or
    by scaling the shorter side to R and cropping the centre ("center_crop", as StyleGAN-V)."""
    height, width = frames.shape[-2:]
    if mode == "resize":
        if (height, width) == (resolution, resolution):
            return frames
        return F.interpolate(frames, size=(resolution, resolution), mode="bilinear", align_corners=False)
    if mode != "center_crop":
        raise ValueError(f"unknown spatial mode '{mode}'")
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    if size != (height, width):
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return frames[..., top:top + resolution, left:left + resolution]


class FrechetVideoDistance(FrechetDistance):
    """FVD between real and generated videos; lower is better.

    ``update(videos, real)`` takes videos [B, T, 3, H, W] (any T, H, W), RGB float in [-1, 1] (values
    outside are clamped). They are resampled to ``num_frames`` frames (see :func:`sample_frame_indices`)
    and ``resolution``² pixels, then encoded by I3D into time-averaged logits.

    Args:
        i3d_path: local I3D weights: a pytorch-i3d ``InceptionI3d`` state dict (``rgb_imagenet.pt``) or a
            TorchScript detector (StyleGAN-V's ``i3d_torchscript.pt``).
        num_frames, resolution: the I3D input clip (16 frames at 224×224 for the standard protocol).
        frame_sampling: "uniform" | "first" | "center".
        spatial: "resize" (original FVD) | "center_crop" (keep aspect ratio, as StyleGAN-V).
        num_features: logit size of a TorchScript detector (read from the weights for state dicts).
        real_statistics_path, reset_real_features: see :class:`FrechetDistance`.
    """

    def __init__(
        self,
        i3d_path: str | Path | None = None,
        num_frames: int = 16,
        resolution: int = 224,
        frame_sampling: FrameSampling = "uniform",
        spatial: SpatialMode = "resize",
        num_features: int = 400,
        real_statistics_path: str | Path | None = None,
        reset_real_features: bool = True,
        **kwargs,
    ):
        network = load_i3d(i3d_path, argument="i3d_path")
        if isinstance(network, InceptionI3d):
            num_features = network.num_classes
        protocol = (
            f"{'pytorch-i3d' if isinstance(network, InceptionI3d) else 'torchscript'}"
            f"[{Path(i3d_path).stat().st_size}B]:frames={num_frames}/{frame_sampling}:{resolution}px/{spatial}"
        )
        super().__init__(num_features, None, reset_real_features, **kwargs)
        self._protocol = protocol
        self.num_frames, self.resolution = num_frames, resolution
        self.frame_sampling, self.spatial = frame_sampling, spatial
        self.detector = FrozenNetwork(network)
        if real_statistics_path is not None:
            self.load_real_statistics(real_statistics_path)

    def fingerprint(self) -> str:
        return f"FVD:{self._protocol}:D={self.num_features}"

    def preprocess(self, videos: Tensor) -> Tensor:
        """[B, T, 3, H, W] in [-1, 1] → I3D input [B, 3, num_frames, R, R] in [-1, 1] (float32)."""
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"expected videos [B, T, 3, H, W], got {tuple(videos.shape)}")
        batch = videos.shape[0]
        indices = sample_frame_indices(videos.shape[1], self.num_frames, self.frame_sampling)
        frames = videos[:, indices.to(videos.device)].float().clamp(-1.0, 1.0).flatten(0, 1)  # [B*F, 3, H, W]
        frames = resize_frames(frames, self.resolution, self.spatial)
        frames = frames.reshape(batch, self.num_frames, 3, self.resolution, self.resolution)
        return frames.permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def extract_features(self, videos: Tensor) -> Tensor:
        clips = self.preprocess(videos).to(self.detector.device)
        with torch.autocast(device_type=clips.device.type, enabled=False):
            return i3d_logits(self.detector.network, clips).float()
