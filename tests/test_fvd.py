"""I3D in the pytorch-i3d layout, loading by file content, and FVD on tiny random videos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

from videolavit.metrics.fvd import FrechetVideoDistance, resize_frames, sample_frame_indices
from videolavit.metrics.i3d import InceptionI3d, i3d_logits, load_i3d, same_padding
from videolavit.metrics.weights import MissingWeightsError

from tests.tiny_models import StyleGanVDetector

# 3 stem units + 9 Inception blocks × 6 units, each conv3d.weight + 5 BatchNorm tensors, + logits (w, b).
PYTORCH_I3D_TENSORS = (3 + 9 * 6) * 6 + 2


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory) -> tuple[InceptionI3d, str]:
    torch.manual_seed(0)
    network = InceptionI3d().eval()
    path = tmp_path_factory.mktemp("i3d") / "rgb_imagenet.pt"
    torch.save(network.state_dict(), path)
    return network, str(path)


def test_state_dict_has_pytorch_i3d_names_and_shapes():
    state = InceptionI3d().state_dict()
    assert len(state) == PYTORCH_I3D_TENSORS == 344
    expected_shapes = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.running_mean": (64,),
        "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
        "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
        "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
        "Mixed_4f.b2b.bn.running_var": (128,),
        "Mixed_5c.b3b.conv3d.weight": (128, 832, 1, 1, 1),
        "Mixed_5c.b1b.bn.weight": (384,),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }
    for name, shape in expected_shapes.items():
        assert tuple(state[name].shape) == shape, name
    assert not any(".b3a." in name for name in state)  # the pooling branch has no tensors
    assert not any(name.startswith("logits.bn") for name in state)


def test_state_dict_round_trips_strictly(i3d_file, tmp_path):
    network, path = i3d_file
    loaded = load_i3d(path)
    assert isinstance(loaded, InceptionI3d) and not loaded.training
    for name, tensor in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    # Files from PyTorch < 0.4.1 (like the published rgb_imagenet.pt) use the legacy, non-zip format
    # and lack BatchNorm's num_batches_tracked.
    old = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(old) == PYTORCH_I3D_TENSORS - 57
    torch.save(old, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    legacy = load_i3d(tmp_path / "old.pt")
    assert torch.equal(legacy.Mixed_5c.b2b.conv3d.weight, network.Mixed_5c.b2b.conv3d.weight)

    # Strictness: a missing tensor is an error, not a silently random layer.
    broken = dict(old)
    del broken["Mixed_4c.b1b.conv3d.weight"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="Mixed_4c.b1b.conv3d.weight"):
        load_i3d(tmp_path / "broken.pt")

    # A DataParallel checkpoint and a different class count (e.g. Charades, 157 classes) load too.
    charades = InceptionI3d(num_classes=157).state_dict()
    torch.save({"module." + k: v for k, v in charades.items()}, tmp_path / "charades.pt")
    assert load_i3d(tmp_path / "charades.pt").num_classes == 157


@pytest.mark.parametrize("size", range(1, 20))
@pytest.mark.parametrize("kernel,stride", [(7, 2), (3, 1), (3, 2), (1, 1), (2, 2)])
def test_same_padding_gives_tensorflow_output_size(size, kernel, stride):
    front, back = same_padding(size, kernel, stride)
    assert back - front in (0, 1)
    assert (size + front + back - kernel) // stride + 1 == math.ceil(size / stride)


def test_i3d_output_is_time_averaged_logits_for_16x224():
    # Shape bookkeeping of the protocol without running the full network: the last feature map of a
    # 16×224² clip is 2×7×7, which the 2×7×7 average pool reduces to a single position.
    network = InceptionI3d(num_classes=5)
    x = torch.zeros(1, 1024, 2, 7, 7)
    assert network.avg_pool(x).shape == (1, 1024, 1, 1, 1)


def test_torchscript_detector_is_recognised_by_content(tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(StyleGanVDetector())
    path = tmp_path / "detector.bin"  # the name says nothing; the content decides
    scripted.save(str(path))
    loaded = load_i3d(path)
    assert isinstance(loaded, torch.jit.ScriptModule)
    clips = torch.rand(2, 3, 16, 8, 8) * 2 - 1
    torch.testing.assert_close(i3d_logits(loaded, clips), scripted(clips, False, False, True))


def test_frame_sampling_and_resizing():
    spread = np.round(np.linspace(0, 23, 16)).astype(int).tolist()
    assert sample_frame_indices(24, 16, "uniform").tolist() == spread
    assert sample_frame_indices(24, 16, "first").tolist() == list(range(16))
    assert sample_frame_indices(24, 16, "center").tolist() == list(range(4, 20))
    assert sample_frame_indices(8, 16, "first").tolist() == [round(i * 7 / 15) for i in range(16)]
    frames = torch.rand(2, 3, 36, 64)
    assert resize_frames(frames, 224, "resize").shape == (2, 3, 224, 224)
    # Centre crop keeps the aspect ratio: a left/right split image stays split in the middle.
    halves = torch.cat([torch.zeros(1, 3, 20, 40), torch.ones(1, 3, 20, 40)], dim=3)  # 20×80
    cropped = resize_frames(halves, 10, "center_crop")
    assert cropped.shape == (1, 3, 10, 10)
    assert cropped[..., :4].max() < 0.5 < cropped[..., 6:].min()


def test_fvd_preprocessing_follows_the_protocol(i3d_file):
    _, path = i3d_file
    fvd = FrechetVideoDistance(path)
    videos = torch.rand(2, 24, 3, 36, 64) * 4 - 2  # out-of-range values are clamped
    clips = fvd.preprocess(videos)
    assert clips.shape == (2, 3, 16, 224, 224)
    assert clips.min() >= -1 and clips.max() <= 1
    # Frame k of the clip is video frame round(k·23/15), resized.
    k = 5
    source = videos[1, round(k * 23 / 15)].clamp(-1, 1)
    expected = torch.nn.functional.interpolate(source[None], size=(224, 224), mode="bilinear")[0]
    torch.testing.assert_close(clips[1, :, k], expected)


def test_fvd_with_i3d_of_videos_with_themselves_is_zero(i3d_file):
    _, path = i3d_file
    # A smaller clip (9 frames at 193², still a 1×1×1 map after the 2×7×7 pool) keeps the test fast.
    fvd = FrechetVideoDistance(path, num_frames=9, resolution=193)
    videos = torch.rand(2, 6, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fvd.update(videos, real=True)
    fvd.update(videos, real=False)
    same = float(fvd.compute())
    spread = float(fvd.real_statistics().sigma.trace())  # the scale FVD values live on here
    assert spread > 0
    assert abs(same) <= 1e-5 * spread  # sqrtm round-off; a real difference is of order spread


def test_fvd_matches_reference_on_detector_features(tmp_path):
    torch.manual_seed(1)
    scripted = torch.jit.script(StyleGanVDetector(num_features=2))  # n > D: well-conditioned reference
    scripted.save(str(tmp_path / "i3d_torchscript.pt"))
    fvd = FrechetVideoDistance(tmp_path / "i3d_torchscript.pt", num_features=2, reset_real_features=False)
    generator = torch.Generator().manual_seed(0)
    videos = torch.rand(5, 20, 3, 12, 16, generator=generator) * 2 - 1  # protocol: 16 frames at 224²
    others = (torch.rand(4, 20, 3, 12, 16, generator=generator) * 2 - 1) * 0.5 + 0.3
    fvd.update(videos[:3], real=True)
    fvd.update(videos[3:], real=True)
    fvd.update(videos, real=False)
    same = float(fvd.compute())
    fvd.reset()  # keeps the real side
    fvd.update(others, real=False)
    different = float(fvd.compute())

    def features(v: Tensor) -> np.ndarray:
        return scripted(fvd.preprocess(v), False, False, True).detach().double().numpy()

    x, y = features(videos), features(others)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert different > 0
    assert abs(same) <= 1e-6 * different
    assert different == pytest.approx(reference, rel=1e-6)


def test_missing_i3d_weights_name_the_argument(tmp_path):
    with pytest.raises(MissingWeightsError, match="i3d_path"):
        FrechetVideoDistance(tmp_path / "rgb_imagenet.pt")
    with pytest.raises(MissingWeightsError, match="i3d_path"):
        FrechetVideoDistance()


def test_detector_stays_frozen_float32_and_out_of_state_dicts(i3d_file):
    _, path = i3d_file
    fvd = FrechetVideoDistance(path)
    fvd.persistent(True)  # even with metric states saved, the I3D weights are not
    names = list(fvd.state_dict())
    assert names and not any("conv3d" in name or "detector" in name for name in names)
    assert list(fvd.parameters()) == []  # nothing for an optimiser to pick up
    fvd.train()
    fvd.half()
    network = fvd.detector.network
    assert not network.training
    assert network.Conv3d_1a_7x7.conv3d.weight.dtype == torch.float32
    assert fvd.real_sum.dtype == torch.float64  # summed states stay float64 too
