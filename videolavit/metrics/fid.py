"""Frame FID: the Fréchet distance between per-frame features of real and generated videos.

It measures per-frame appearance, independent of motion (which FVD covers). Two local feature
extractors are supported:

- a TorchScript file, e.g. StyleGAN's ``inception-2015-12-05.pt`` (2048-d pool features; resizes to
  299 internally). By default it receives uint8 frames [N, 3, H, W] in 0–255, as StyleGAN and clean-fid
  feed it; ``torchscript_input`` selects [0, 1] or [-1, 1] floats for detectors that expect those;
- a CLIP vision tower from a local ``save_pretrained`` directory (``CLIPModel`` or
  ``CLIPVisionModelWithProjection``): projected image embeddings after CLIP's own preprocessing, as
  "CLIP-FID" (Kynkäänniemi et al. 2023).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from videolavit.metrics.clip_similarity import clip_image_embeddings, load_clip
from videolavit.metrics.frechet import FrechetDistance
from videolavit.metrics.fvd import sample_frame_indices
from videolavit.metrics.weights import (
    FrozenNetwork,
    MissingWeightsError,
    is_torchscript_file,
    load_torchscript,
    script_argument_names,
)

ExtractorKind = Literal["auto", "torchscript", "clip"]
TorchScriptInput = Literal["uint8", "unit", "symmetric"]


def frame_features(network, kind: ExtractorKind, frames: Tensor, clip_preprocessing=None,  # noqa: ANN001
                   torchscript_input: TorchScriptInput = "uint8",
                   torchscript_resolution: int | None = None) -> Tensor:
    """Features [N, D] of frames [N, 3, H, W] in [-1, 1] by a CLIP vision tower or a TorchScript extractor."""
    frames = frames.float().clamp(-1.0, 1.0)
    with torch.no_grad(), torch.autocast(device_type=frames.device.type, enabled=False):
        if kind == "clip":
            return clip_image_embeddings(network, clip_preprocessing(frames)).float()
        if torchscript_resolution is not None:
            size = (torchscript_resolution,) * 2
            frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
        if torchscript_input == "uint8":
            frames = ((frames + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        elif torchscript_input == "unit":
            frames = (frames + 1.0) / 2.0
        kwargs = {"return_features": True} if "return_features" in script_argument_names(network) else {}
        return network(frames, **kwargs).float().flatten(1)


class FrameFID(FrechetDistance):
    """FID over video frames (or images); lower is better.

    ``update(inputs, real)`` takes videos [B, T, 3, H, W] or images [N, 3, H, W], RGB float in [-1, 1];
    every frame (or ``frames_per_video`` evenly spaced ones) counts as one sample.

    Args:
        feature_extractor_path: TorchScript feature extractor file, or CLIP directory.
        kind: "auto" (a directory is CLIP, a file TorchScript) | "torchscript" | "clip".
        frames_per_video: frames taken per video; None takes all.
        torchscript_input: value range handed to a TorchScript extractor: "uint8" (0–255 uint8),
            "unit" ([0, 1] float) or "symmetric" ([-1, 1] float).
        torchscript_resolution: resize frames to this square size before a TorchScript extractor
            (None: pass them as they are; Inception resizes internally).
        num_features: feature size; for TorchScript found by one dummy forward when None.
        real_statistics_path, reset_real_features: see :class:`FrechetDistance`.
    """

    def __init__(
        self,
        feature_extractor_path: str | Path | None = None,
        kind: ExtractorKind = "auto",
        frames_per_video: int | None = None,
        torchscript_input: TorchScriptInput = "uint8",
        torchscript_resolution: int | None = None,
        num_features: int | None = None,
        real_statistics_path: str | Path | None = None,
        reset_real_features: bool = True,
        **kwargs,
    ):
        argument = "feature_extractor_path"
        if feature_extractor_path is None or not Path(feature_extractor_path).expanduser().exists():
            where = ("is not set" if feature_extractor_path is None
                     else f"'{feature_extractor_path}' does not exist")
            raise MissingWeightsError(
                f"`{argument}` {where}: frame FID needs a local TorchScript feature extractor file or a CLIP "
                f"directory. Set `{argument}` (videolavit never downloads weights)."
            )
        if torchscript_input not in ("uint8", "unit", "symmetric"):
            raise ValueError(f"unknown torchscript_input '{torchscript_input}'")
        path = Path(feature_extractor_path).expanduser()
        if kind == "auto":
            kind = "clip" if path.is_dir() else "torchscript"
        clip_preprocessing = None
        if kind == "clip":
            network, _, clip_preprocessing = load_clip(path, argument=argument, with_text=False)
            num_features = num_features or int(network.config.projection_dim)
        elif kind == "torchscript":
            if not is_torchscript_file(path):
                raise ValueError(f"'{path}' (from `{argument}`) is not a TorchScript file")
            network = load_torchscript(path)
            if num_features is None:  # one dummy frame tells the feature size
                probe = torch.zeros(1, 3, torchscript_resolution or 299, torchscript_resolution or 299)
                num_features = int(frame_features(network, kind, probe, None, torchscript_input,
                                                  torchscript_resolution).shape[1])
        else:
            raise ValueError(f"unknown feature extractor kind '{kind}'")
        super().__init__(num_features, None, reset_real_features, **kwargs)
        self._protocol = (f"{kind}[{path.name}]:frames={frames_per_video}:{torchscript_input}:"
                          f"{torchscript_resolution}")
        self.kind, self.frames_per_video = kind, frames_per_video
        self.torchscript_input, self.torchscript_resolution = torchscript_input, torchscript_resolution
        self.clip_preprocessing = clip_preprocessing
        self.extractor = FrozenNetwork(network)
        if real_statistics_path is not None:
            self.load_real_statistics(real_statistics_path)

    def fingerprint(self) -> str:
        return f"FrameFID:{self._protocol}:D={self.num_features}"

    def frames(self, inputs: Tensor) -> Tensor:
        """Videos [B, T, 3, H, W] or images [N, 3, H, W] → frames [N', 3, H, W]."""
        if inputs.ndim == 5 and inputs.shape[2] == 3:
            if self.frames_per_video is not None:
                indices = sample_frame_indices(inputs.shape[1], self.frames_per_video, "uniform")
                inputs = inputs[:, indices.to(inputs.device)]
            return inputs.flatten(0, 1)
        if inputs.ndim == 4 and inputs.shape[1] == 3:
            return inputs
        raise ValueError(f"expected videos [B, T, 3, H, W] or images [N, 3, H, W], got {tuple(inputs.shape)}")

    def extract_features(self, inputs: Tensor) -> Tensor:
        frames = self.frames(inputs).to(self.extractor.device)
        return frame_features(self.extractor.network, self.kind, frames, self.clip_preprocessing,
                              self.torchscript_input, self.torchscript_resolution)
