"""Video Inception Score: its mathematics with given predictions, and the C3D classifier protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from videolavit.metrics.c3d import SPORTS1M_MEAN_BGR, C3D, C3DClassifier, load_c3d
from videolavit.metrics.inception_score import VideoInceptionScore
from videolavit.metrics.weights import MissingWeightsError


def score_of(probabilities: torch.Tensor, splits: int, batch: int = 7) -> tuple[float, float]:
    """IS with an identity 'classifier': the update inputs are the predictions themselves."""
    metric = VideoInceptionScore(classifier=nn.Identity(), num_classes=probabilities.shape[1], splits=splits)
    for chunk in probabilities.split(batch):
        metric.update(chunk)
    mean, std = metric.compute()
    return float(mean), float(std)


def numpy_reference(p: np.ndarray, splits: int) -> tuple[float, float]:
    """IS per split as in the improved-GAN / TGAN code, with split s = samples g ≡ s (mod splits)."""
    scores = []
    for s in range(splits):
        part = p[s::splits]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("splits", [1, 3])
def test_uniform_predictions_score_one(splits):
    mean, std = score_of(torch.full((30, 101), 1 / 101), splits)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_confident_distinct_predictions_score_the_number_of_classes(splits):
    classes = 10
    # Sample g predicts class (g // splits) mod C: every split sees every class equally often.
    labels = (torch.arange(classes * splits * 3) // splits) % classes
    mean, std = score_of(nn.functional.one_hot(labels, classes).double(), splits)
    assert mean == pytest.approx(classes, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_random_predictions_match_numpy_reference_for_any_batching():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(12, 0.3), size=53)
    expected = numpy_reference(p, splits=4)
    for batch in (1, 5, 53):
        mean, std = score_of(torch.from_numpy(p), splits=4, batch=batch)
        assert mean == pytest.approx(expected[0], rel=1e-10)
        assert std == pytest.approx(expected[1], rel=1e-8)
    assert expected[1] > 0  # the splits really differ, so the std check means something


def test_too_few_samples_for_the_splits_is_an_error():
    metric = VideoInceptionScore(classifier=nn.Identity(), num_classes=3, splits=4)
    metric.update(torch.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="every one of the 4 splits"):
        metric.compute()


def test_c3d_layout_and_pool5_variants():
    network = C3D()
    state = network.state_dict()
    assert len(state) == 22
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 3, 3)
    assert tuple(state["conv3b.weight"].shape) == (256, 256, 3, 3, 3)
    assert tuple(state["fc6.weight"].shape) == (4096, 8192)
    assert tuple(state["fc8.weight"].shape) == (101, 4096)
    x = torch.randn(1, 512, 2, 7, 7)
    padded, ceiled = C3D(num_classes=2, pool5="pad").pool5(x), C3D(num_classes=2, pool5="ceil").pool5(x)
    assert padded.shape == ceiled.shape == (1, 512, 1, 4, 4)  # 8192 inputs to fc6 either way
    # "ceil" pools rows {0,1},{2,3},{4,5},{6}; "pad" pools {-1,0},{1,2},{3,4},{5,6}.
    torch.testing.assert_close(ceiled[0, :, 0, 3, 3], x[0, :, :, 6, 6].amax(dim=1))
    torch.testing.assert_close(padded[0, :, 0, 0, 0], x[0, :, :, 0, 0].amax(dim=1))


def test_c3d_preprocessing_is_the_tganv2_protocol():
    classifier = C3DClassifier(nn.Identity())
    # Frame t of a 24-frame video is filled with a value encoding t; colour channels differ.
    t = torch.arange(24, dtype=torch.float32)
    videos = (t.view(1, 24, 1, 1, 1) / 24 - 0.5).expand(2, 24, 3, 50, 60).clone()
    videos[:, :, 0] += 0.25  # red brighter
    clips = classifier.preprocess(videos)
    assert clips.shape == (2, 3, 16, 112, 112)
    centre = torch.arange(4, 20, dtype=torch.float32)  # central 16 of 24
    base = centre / 24 - 0.5
    mean = torch.tensor(SPORTS1M_MEAN_BGR)
    expected_b = 128 * base + 128 - mean[0]
    expected_r = 128 * (base + 0.25) + 128 - mean[2]  # red is the last channel after RGB → BGR
    torch.testing.assert_close(clips[0, 0, :, 5, 7], expected_b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(clips[1, 2, :, 100, 3], expected_r, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def c3d_file(tmp_path_factory):
    torch.manual_seed(0)
    network = C3D().eval()
    # Caffe/Chainer names for the first two convolutions must load as well.
    state = {k.replace("conv1.", "conv1a.").replace("conv2.", "conv2a."): v
             for k, v in network.state_dict().items()}
    path = tmp_path_factory.mktemp("c3d") / "c3d_ucf101.pt"
    torch.save(state, path)
    return network, path


def test_c3d_round_trip_and_inception_score_from_weights(c3d_file):
    network, path = c3d_file
    loaded = load_c3d(path)
    for name, tensor in network.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    metric = VideoInceptionScore(c3d_path=path, splits=1)
    assert metric.num_classes == 101
    videos = torch.rand(2, 20, 3, 24, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    metric.update(videos)
    mean, _ = metric.compute()
    with torch.no_grad():  # the protocol by hand: softmax of C3D on the preprocessed central clip
        probabilities = network(C3DClassifier(network).preprocess(videos)).softmax(dim=1)
    expected, _ = numpy_reference(probabilities.double().numpy(), splits=1)
    assert float(mean) == pytest.approx(expected, rel=1e-6)
    assert 1.0 <= float(mean) <= 2.0  # two samples can never score above 2


def test_missing_c3d_weights_name_the_argument(tmp_path):
    with pytest.raises(MissingWeightsError, match="c3d_path"):
        VideoInceptionScore(c3d_path=tmp_path / "c3d_ucf101.pt")
    with pytest.raises(MissingWeightsError, match="c3d_path"):
        VideoInceptionScore()
