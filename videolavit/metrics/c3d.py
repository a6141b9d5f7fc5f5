"""C3D (Tran et al. 2015) fine-tuned on UCF-101, the classifier behind the video Inception Score.

Layout: the PyTorch ports' names (``conv1``, ``conv2``, ``conv3a`` … ``conv5b``, ``fc6``–``fc8``; 22
tensors), so their state dicts load strictly; Caffe/Chainer-style ``conv1a``/``conv2a`` names are mapped.
Eight 3×3×3 convolutions with ReLU, max-pooling 1×2×2 then 2×2×2, two 4096-d layers and a 101-way
classifier over a 16×112×112 clip.

Pool5 turns the 2×7×7 map into 1×4×4 (the 8192 inputs of fc6) in one of two ways: the PyTorch ports pad
it by one pixel ("pad", their default), Caffe/Chainer round the output size up ("ceil"). Use the one the
weights were trained or converted with.

Standard preprocessing, as TGANv2's ``C3DVersion1UCF101`` (the reference for UCF-101 video IS, also
reproduced by StyleGAN-V's ``c3d_ucf101.pt``): the central 16 frames, each resized to 112×112
(bilinear), RGB → BGR, scaled as 128·x + 128 from [-1, 1], minus the Sports-1M mean clip (per-channel
BGR means 90.25, 97.66, 101.41 by default, or the clip itself from an ``.npy``/``.npz`` file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from videolavit.metrics.fvd import sample_frame_indices
from videolavit.metrics.weights import (
    is_torchscript_file,
    load_state_dict_file,
    load_torchscript,
    require_file,
)

Pool5Mode = Literal["pad", "ceil"]
SPORTS1M_MEAN_BGR = (90.25164795, 97.65701294, 101.4083252)
_CAFFE_NAMES = {"conv1a.": "conv1.", "conv2a.": "conv2."}


class C3D(nn.Module):
    """C3D classifier: clips [B, 3, 16, 112, 112] (already preprocessed) → logits [B, num_classes]."""

    def __init__(self, num_classes: int = 101, pool5: Pool5Mode = "pad"):
        super().__init__()
        if pool5 not in ("pad", "ceil"):
            raise ValueError(f"pool5 must be 'pad' or 'ceil', got '{pool5}'")
        self.num_classes = num_classes
        widths = {"conv1": (3, 64), "conv2": (64, 128), "conv3a": (128, 256), "conv3b": (256, 256),
                  "conv4a": (256, 512), "conv4b": (512, 512), "conv5a": (512, 512), "conv5b": (512, 512)}
        for name, (cin, cout) in widths.items():
            self.add_module(name, nn.Conv3d(cin, cout, kernel_size=3, padding=1))
        self.pool1 = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
        self.pool = nn.MaxPool3d(2, 2)
        self.pool5 = (nn.MaxPool3d(2, 2, padding=(0, 1, 1)) if pool5 == "pad"
                      else nn.MaxPool3d(2, 2, ceil_mode=True))
        self.fc6 = nn.Linear(8192, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.pool(F.relu(self.conv3b(F.relu(self.conv3a(x)))))
        x = self.pool(F.relu(self.conv4b(F.relu(self.conv4a(x)))))
        x = self.pool5(F.relu(self.conv5b(F.relu(self.conv5a(x)))))  # [B, 512, 1, 4, 4]
        x = self.dropout(F.relu(self.fc6(x.flatten(1))))
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)


def load_c3d(path: str | Path | None, argument: str = "c3d_path", pool5: Pool5Mode = "pad") -> nn.Module:
    """An eval-mode C3D from a local file: a TorchScript detector, or a state dict in the layout above."""
    path = require_file(path, argument, "C3D")
    if is_torchscript_file(path):
        return load_torchscript(path)
    state = load_state_dict_file(path)
    for old, new in _CAFFE_NAMES.items():
        state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    if "fc8.weight" not in state:
        raise ValueError(
            f"'{path}' (from `{argument}`) is neither TorchScript nor a C3D state dict (no 'fc8.weight')"
        )
    network = C3D(num_classes=state["fc8.weight"].shape[0], pool5=pool5)
    network.load_state_dict(state, strict=True)
    return network.eval()


def load_mean_clip(path: str | Path, resolution: int = 112, argument: str = "mean_clip_path") -> Tensor:
    """A BGR mean clip [3, T, H, W] from .npy or .npz (key ``mean``), centre-cropped to ``resolution``."""
    path = require_file(path, argument, "C3D mean clip")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            mean = np.array(data["mean"] if "mean" in data.files else data[data.files[0]], dtype=np.float32)
    else:
        mean = np.load(path, allow_pickle=False).astype(np.float32)
    mean = torch.from_numpy(mean)
    while mean.ndim > 4:  # e.g. [1, 3, 16, 128, 171]
        mean = mean[0]
    if mean.ndim != 4 or mean.shape[0] != 3:
        raise ValueError(f"mean clip in '{path}' must be [3, T, H, W], got {tuple(mean.shape)}")
    height, width = mean.shape[-2:]
    if min(height, width) < resolution:
        raise ValueError(f"mean clip in '{path}' is smaller than {resolution}×{resolution}")
    top, left = (height - resolution) // 2, (width - resolution) // 2
    return mean[..., top:top + resolution, left:left + resolution].contiguous()


def _as_probabilities(output: Tensor) -> Tensor:
    """Detectors either end in softmax (StyleGAN-V's) or give logits; rows that already are
    distributions are kept, anything else is softmaxed."""
    output = output.float()
    looks_normalised = bool((output >= 0).all()) and torch.allclose(
        output.sum(dim=1), torch.ones_like(output[:, 0]), atol=1e-3
    )
    return output if looks_normalised else output.softmax(dim=1)


class C3DClassifier(nn.Module):
    """Videos [B, T, 3, H, W] RGB in [-1, 1] → UCF-101 class probabilities [B, C] by the standard protocol.

    Args:
        network: from :func:`load_c3d`.
        num_frames, resolution: the clip C3D sees (the central 16 frames at 112×112).
        mean_bgr: per-channel BGR mean on the 0–255 scale, used when no mean clip is given.
        mean_clip: optional mean clip [3, num_frames, R, R] (BGR), see :func:`load_mean_clip`.

    TorchScript detectors get the central frames as uint8 [B, 3, T, H, W] at their native size, as
    StyleGAN-V feeds ``c3d_ucf101.pt`` (which resizes and normalises internally).
    """

    def __init__(self, network: nn.Module, num_frames: int = 16, resolution: int = 112,
                 mean_bgr: Sequence[float] = SPORTS1M_MEAN_BGR, mean_clip: Tensor | None = None):
        super().__init__()
        self.network = network
        self.num_frames, self.resolution = num_frames, resolution
        if mean_clip is None:
            mean_clip = torch.tensor(mean_bgr, dtype=torch.float32).view(3, 1, 1, 1)
        elif mean_clip.shape[1] != num_frames:
            raise ValueError(f"mean clip has {mean_clip.shape[1]} frames, expected {num_frames}")
        self.register_buffer("mean_clip", mean_clip.float(), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.network.num_classes if isinstance(self.network, C3D) else -1

    def central_frames(self, videos: Tensor) -> Tensor:
        """[B, T, 3, H, W] → [B, 3, num_frames, H, W] (shorter videos are stretched by repeating frames)."""
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"expected videos [B, T, 3, H, W], got {tuple(videos.shape)}")
        indices = sample_frame_indices(videos.shape[1], self.num_frames, "center").to(videos.device)
        return videos[:, indices].float().clamp(-1.0, 1.0).permute(0, 2, 1, 3, 4)

    def preprocess(self, videos: Tensor) -> Tensor:
        """Videos → C3D input [B, 3 (BGR), F, R, R] on the mean-subtracted 0–255 scale."""
        clips = self.central_frames(videos)  # [B, 3, F, H, W]
        batch, _, frames, height, width = clips.shape
        if (height, width) != (self.resolution, self.resolution):
            flat = clips.permute(0, 2, 1, 3, 4).flatten(0, 1)
            flat = F.interpolate(flat, size=(self.resolution,) * 2, mode="bilinear", align_corners=True)
            clips = flat.view(batch, frames, 3, self.resolution, self.resolution).permute(0, 2, 1, 3, 4)
        clips = clips.flip(1) * 128.0 + 128.0  # RGB → BGR; TGANv2 scales by 128, not 127.5
        return clips - self.mean_clip.to(clips.device)

    def forward(self, videos: Tensor) -> Tensor:
        if isinstance(self.network, C3D):
            return self.network(self.preprocess(videos)).softmax(dim=1)
        uint8 = ((self.central_frames(videos) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return _as_probabilities(self.network(uint8))
