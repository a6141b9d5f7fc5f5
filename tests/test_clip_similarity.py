"""CLIPSIM against a hand-computed cosine with a tiny random CLIP (built locally, no downloads), and
frame FID with a CLIP vision tower."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from transformers import CLIPVisionModelWithProjection

from videolavit.metrics.clip_similarity import CLIP_MEAN, CLIP_STD, CLIPSimilarity, ClipImagePreprocessing
from videolavit.metrics.fid import FrameFID
from videolavit.metrics.weights import MissingWeightsError

from tests.tiny_models import CLIP_IMAGE_SIZE, build_tiny_clip

IMAGE_SIZE = CLIP_IMAGE_SIZE


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def hand_image_embeddings(model, frames: torch.Tensor) -> torch.Tensor:
    """Frames [N, 3, 32, 32] in [-1, 1] → projected embeddings [N, D], straight from the vision tower."""
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=((frames + 1) / 2 - mean) / std).pooler_output
        return model.visual_projection(pooled)


def hand_embeddings(model, tokenizer, frames: torch.Tensor, caption: str):
    """Frames [T, 3, 32, 32] in [-1, 1] and a caption → normalised embeddings, straight from the towers."""
    image = hand_image_embeddings(model, frames)
    with torch.no_grad():
        ids = torch.tensor([tokenizer(caption)["input_ids"]])
        assert ids[0, 0] == 0 and ids[0, -1] == 1 and len(ids[0]) > 3  # <start> letters… <end>
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return F.normalize(image.double(), dim=-1), F.normalize(text.double(), dim=-1)[0]


def test_clipsim_equals_hand_computed_cosine(tiny_clip):
    model, tokenizer, directory = tiny_clip
    metric = CLIPSimilarity(directory)
    generator = torch.Generator().manual_seed(0)
    videos = torch.rand(3, 4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
    captions = ["a red circle moves left", "blue square", "green triangle going up"]

    per_video = []
    for video, caption in zip(videos, captions):
        image, text = hand_embeddings(model, tokenizer, video, caption)
        per_video.append(float((image @ text).mean()))  # mean over frames of the cosine
    assert max(per_video) - min(per_video) > 1e-4  # distinct videos: averaging order matters

    metric.update(videos[:1], captions[:1])  # uneven batches: average over videos, not batches
    metric.update(videos[1:], captions[1:])
    assert float(metric.compute()) == pytest.approx(float(np.mean(per_video)), abs=1e-6)
    torch.testing.assert_close(metric.video_scores(videos, captions),
                               torch.tensor(per_video, dtype=torch.float64), atol=1e-6, rtol=0)


def test_clip_preprocessing_resizes_crops_and_normalises():
    prep = ClipImagePreprocessing(size=IMAGE_SIZE, crop=IMAGE_SIZE)
    # A wide frame: left half black, right half white, with a constant-colour band in the middle.
    frames = -torch.ones(1, 3, 40, 100)
    frames[..., 50:] = 1.0
    out = prep(frames)
    assert out.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)  # shorter side to 32 (80 wide), centre crop
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 0], (0 - mean) / std, atol=1e-5, rtol=0)  # still black
    torch.testing.assert_close(out[0, :, 5, -1], (1 - mean) / std, atol=1e-5, rtol=0)  # still white


def test_frame_fid_with_clip_vision_tower(tiny_clip):
    model, tokenizer, directory = tiny_clip
    fid = FrameFID(directory, frames_per_video=2)
    assert fid.kind == "clip" and fid.num_features == 16
    generator = torch.Generator().manual_seed(1)
    videos = torch.rand(12, 6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1  # 24 frames > 16 dims
    others = torch.rand(12, 6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1

    # Features are the projected image embeddings of frames 0 and 5 of each video (uniform choice).
    chosen = videos[:, [0, 5]].flatten(0, 1)
    expected = hand_image_embeddings(model, chosen)
    torch.testing.assert_close(fid.extract_features(videos), expected, atol=1e-5, rtol=1e-5)

    fid.update(videos, real=True)
    fid.update(videos, real=False)
    assert abs(float(fid.compute())) < 1e-6 * float(fid.real_statistics().sigma.trace())
    fid.reset()
    fid.update(videos, real=True)
    fid.update(others, real=False)
    x, y = (fid.extract_features(v).double().numpy() for v in (videos, others))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    reference = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert float(fid.compute()) == pytest.approx(reference, rel=1e-6)


def test_frame_fid_accepts_a_vision_only_directory(tiny_clip, tmp_path):
    model, _, _ = tiny_clip
    vision_config = copy.deepcopy(model.config.vision_config)
    vision_config.projection_dim = model.config.projection_dim
    vision = CLIPVisionModelWithProjection(vision_config).eval()
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    vision.save_pretrained(tmp_path / "vision")
    frames = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = hand_image_embeddings(model, frames)
    fid = FrameFID(tmp_path / "vision")
    torch.testing.assert_close(fid.extract_features(frames), expected, atol=1e-5, rtol=1e-5)


def test_missing_clip_directory_names_the_argument(tmp_path):
    with pytest.raises(MissingWeightsError, match="clip_path"):
        CLIPSimilarity(tmp_path / "clip-vit-base-patch16")
    with pytest.raises(MissingWeightsError, match="clip_path"):
        CLIPSimilarity()
