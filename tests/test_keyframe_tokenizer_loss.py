"""The keyframe tokenizer's objective: the paper's terms by default, and the optional small-object terms
(deviation-weighted reconstruction, selector prior, similarity preservation) with their numbers, errors,
logging, and effect on a short fit."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.keyframe_tokenizer import KeyframeTokenizerStage
from videolavit.config_files import read_config
from videolavit.models.eva_vit import EvaViTConfig
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_tokenizer import KeyframeEncoding, KeyframeTokenizerConfig, _pack_kept
from videolavit.models.keyframe_tokenizer_loss import (
    KeyframeTokenizerLossConfig,
    deviation_weights,
    feature_reconstruction_loss,
    keep_ratio_loss,
    keyframe_tokenizer_loss,
    selector_deviation_loss,
    similarity_preservation_loss,
)

REPO = Path(__file__).resolve().parents[1]
B, N, C = 3, 16, 8


def plain_images_with_one_odd_patch(batch: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT-like features [B, N, C]: a shared component plus small noise, and one patch per image (returned)
    that is far from the rest, as an object on a plain background."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(C, generator=g)
    features = shared + 0.1 * torch.randn(batch, N, C, generator=g)
    odd = torch.randint(0, N, (batch,), generator=g)
    features[torch.arange(batch), odd] += 3.0 * torch.randn(batch, C, generator=g)
    return features, odd


def encoding_of(features: torch.Tensor, keep: torch.Tensor, latents_per_patch: torch.Tensor | None = None,
                keep_log_probs: torch.Tensor | None = None) -> KeyframeEncoding:
    """A KeyframeEncoding packed like the tokenizer's, with given per-patch latents [B, N, D]."""
    positions, mask = _pack_kept(keep)
    b = features.shape[0]
    if latents_per_patch is None:
        latents_per_patch = torch.randn(b, features.shape[1], 4)
    d = latents_per_patch.shape[-1]
    latents = torch.gather(latents_per_patch, 1, positions.clamp(min=0)[..., None].expand(-1, -1, d))
    latents = F.normalize(latents, dim=-1) * mask[..., None]
    if keep_log_probs is None:
        keep_log_probs = torch.log_softmax(torch.zeros(b, features.shape[1], 2), dim=-1)
    return KeyframeEncoding(
        ids=torch.where(mask, 0, -1), codes=latents.clone(), latents=latents, mask=mask, lengths=mask.sum(1),
        positions=positions, keep=keep.float(), keep_log_probs=keep_log_probs, vit_features=features,
        commitment_loss=torch.tensor(0.125), usage=torch.tensor(0.5), perplexity=torch.tensor(2.0))


# ---- the paper's objective stays the default -------------------------------------------------------

def test_default_config_is_the_papers_objective():
    features, _ = plain_images_with_one_odd_patch()
    keep = (torch.rand(B, N, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    keep[:, 0] = 1
    enc = encoding_of(features, keep)
    pred = torch.randn(B, N, C)
    terms = keyframe_tokenizer_loss(pred, enc, KeyframeTokenizerLossConfig(keep_ratio_weight=2.0))
    assert set(terms) == {"reconstruction", "keep_ratio", "commitment", "loss"}
    expected = feature_reconstruction_loss(pred, features) + 2.0 * keep_ratio_loss(keep, 1 / 3) + 0.125
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_full_scale_config_uses_the_papers_objective_and_the_tiny_config_the_small_object_terms():
    def loss_config(path: str) -> KeyframeTokenizerLossConfig:
        config = read_config(REPO / path)
        return KeyframeTokenizerLossConfig(**config["model"]["init_args"]["loss"])

    full = loss_config("experiments/stage1_keyframe_tokenizer.yaml")
    assert (full.patch_weighting, full.selector_weight, full.similarity_weight) == ("none", 0.0, 0.0)
    tiny = loss_config("experiments/tiny/keyframe_tokenizer.yaml")
    assert tiny.selector_weight > 0 and tiny.similarity_weight > 0


# ---- deviation weighting ---------------------------------------------------------------------------

def test_weighted_reconstruction_is_the_weighted_mean_of_one_minus_cosine():
    pred, target = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    weights = torch.rand(2, 5) + 0.1
    distance = 1 - F.cosine_similarity(pred, target, dim=-1)
    expected = (weights * distance).sum() / weights.sum()
    assert feature_reconstruction_loss(pred, target, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    uniform = feature_reconstruction_loss(pred, target, torch.full((2, 5), 3.0))
    assert uniform.item() == pytest.approx(feature_reconstruction_loss(pred, target).item(), rel=1e-6)
    with pytest.raises(ValueError, match="weights"):
        feature_reconstruction_loss(pred, target, weights[:, :4])


def test_deviation_weights_single_out_the_odd_patch():
    features, odd = plain_images_with_one_odd_patch()
    weights = deviation_weights(features)
    assert weights.shape == (B, N) and not weights.requires_grad
    assert torch.allclose(weights.mean(dim=1), torch.ones(B))
    assert torch.equal(weights.argmax(dim=1), odd)
    assert (weights[torch.arange(B), odd] > 4 * weights.median(dim=1).values).all()
    sharper = deviation_weights(features, power=2.0)
    assert (sharper[torch.arange(B), odd] > weights[torch.arange(B), odd]).all()
    assert torch.allclose(deviation_weights(features, power=0.0), torch.ones(B, N))
    plain = torch.randn(C).expand(B, N, C)  # all patches alike: nothing to single out
    assert torch.allclose(deviation_weights(plain), torch.ones(B, N))


def test_deviation_weighting_makes_an_error_on_the_odd_patch_cost_more():
    features, odd = plain_images_with_one_odd_patch()
    background = (odd + 1) % N
    rows = torch.arange(B)
    wrong_object, wrong_background = features.clone(), features.clone()
    wrong_object[rows, odd] = -features[rows, odd]
    wrong_background[rows, background] = -features[rows, background]
    paper = [feature_reconstruction_loss(p, features).item() for p in (wrong_object, wrong_background)]
    assert paper[0] == pytest.approx(paper[1], rel=1e-5)  # the paper's loss: every patch the same
    weights = deviation_weights(features)
    weighted = [feature_reconstruction_loss(p, features, weights).item() for p in (wrong_object, wrong_background)]
    assert weighted[0] > 4 * weighted[1]


# ---- selector prior --------------------------------------------------------------------------------

def test_selector_loss_is_the_nll_of_keeping_the_most_deviant_patches():
    features, odd = plain_images_with_one_odd_patch()
    ratio = 1 / N  # ceil(ratio * N) = 1 patch to keep: the odd one
    p_keep = torch.full((B, N), 0.2)
    p_keep[torch.arange(B), odd] = 0.9
    log_probs = torch.stack([p_keep.log(), (1 - p_keep).log()], dim=-1)
    expected = -(math.log(0.9) + (N - 1) * math.log(0.8)) / N
    assert selector_deviation_loss(log_probs, features, ratio).item() == pytest.approx(expected, rel=1e-5)
    reversed_probs = log_probs.flip(-1)  # keeps the background, drops the object
    assert (selector_deviation_loss(reversed_probs, features, ratio)
            > selector_deviation_loss(log_probs, features, ratio))

    # ratio 1/3 of 16 patches: the top ceil(5.33) = 6 patches are the ones to keep
    graded = torch.zeros(1, N, C)
    graded[0, N - 6:, 0] = 10.0 + torch.arange(6.0)  # the last 6 patches lie far from the image's mean
    perfect = torch.full((1, N, 2), -1e4)
    perfect[0, N - 6:, 0] = 0.0
    perfect[0, :N - 6, 1] = 0.0
    assert selector_deviation_loss(perfect, graded, 1 / 3).item() == pytest.approx(0.0, abs=1e-6)


# ---- similarity preservation -----------------------------------------------------------------------

def test_similarity_loss_is_zero_when_latents_keep_the_vits_geometry():
    features, _ = plain_images_with_one_odd_patch()
    keep = torch.zeros(B, N)
    keep[:, ::3] = 1
    centred = features - features.flatten(0, 1).mean(0)
    exact = encoding_of(features, keep, latents_per_patch=centred)  # latents = normalised centred features
    assert similarity_preservation_loss(exact).item() == pytest.approx(0.0, abs=1e-10)
    rotated = encoding_of(features, keep, latents_per_patch=centred @ torch.linalg.qr(torch.randn(C, C))[0])
    assert similarity_preservation_loss(rotated).item() == pytest.approx(0.0, abs=1e-10)  # only angles count
    scrambled = encoding_of(features, keep, latents_per_patch=torch.randn(B, N, C))
    assert similarity_preservation_loss(scrambled).item() > 0.05
    uncentred = encoding_of(features, keep, latents_per_patch=features)  # the shared component is not the target
    assert similarity_preservation_loss(uncentred).item() > 1e-3


def test_similarity_loss_reaches_the_latents_and_can_subsample_tokens():
    features, _ = plain_images_with_one_odd_patch()
    keep = torch.ones(B, N)
    latents = torch.randn(B, N, 4, requires_grad=True)
    enc = encoding_of(features, keep, latents_per_patch=latents)
    full = similarity_preservation_loss(enc)
    full.backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    torch.manual_seed(0)
    sub = similarity_preservation_loss(enc, max_tokens=12)  # 48 kept tokens -> 12
    assert 0 < sub.item() < 4 and sub.item() != pytest.approx(full.item())


# ---- the configured sum ----------------------------------------------------------------------------

def test_optional_terms_enter_the_sum_with_their_weights():
    features, _ = plain_images_with_one_odd_patch()
    keep = torch.zeros(B, N)
    keep[:, ::2] = 1
    log_probs = torch.log_softmax(torch.randn(B, N, 2), dim=-1)
    enc = encoding_of(features, keep, keep_log_probs=log_probs)
    pred = torch.randn(B, N, C)
    config = KeyframeTokenizerLossConfig(target_keep_ratio=0.25, keep_ratio_weight=3.0, patch_weighting="deviation",
                                         selector_weight=2.0, similarity_weight=5.0)
    terms = keyframe_tokenizer_loss(pred, enc, config)
    assert set(terms) == {"reconstruction", "weighted_reconstruction", "keep_ratio", "commitment",
                          "selector_deviation", "similarity", "loss"}
    assert terms["reconstruction"].item() == pytest.approx(feature_reconstruction_loss(pred, features).item())
    assert terms["weighted_reconstruction"].item() == pytest.approx(
        feature_reconstruction_loss(pred, features, deviation_weights(features)).item(), rel=1e-6)
    expected = (terms["weighted_reconstruction"] + 3.0 * keep_ratio_loss(keep, 0.25) + 0.125
                + 2.0 * selector_deviation_loss(log_probs, features, 0.25) + 5.0 * similarity_preservation_loss(enc))
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("patch_weighting", "variance", "patch_weighting must be one of"),
    ("target_keep_ratio", 0.0, "target_keep_ratio must be in"),
    ("selector_weight", -1.0, "selector_weight must be >= 0"),
    ("similarity_weight", -0.5, "similarity_weight must be >= 0"),
    ("deviation_power", -1.0, "deviation_power must be >= 0"),
    ("similarity_max_tokens", 1, "similarity_max_tokens must be >= 2"),
])
def test_bad_loss_config_values_are_rejected_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        KeyframeTokenizerLossConfig(**{field: value})


# ---- in the stage --------------------------------------------------------------------------------------

IMAGE, PATCH = 28, 7  # 16 patches


def tiny_stage(loss: KeyframeTokenizerLossConfig, **optimizer) -> KeyframeTokenizerStage:
    vit = dict(image_size=IMAGE, patch_size=PATCH, width=32, depth=2, num_heads=2, mlp_dim=64, embed_dim=16)
    tokenizer = KeyframeTokenizerConfig(vit=EvaViTConfig(**vit), merger_depth=1, merger_heads=2, merger_mlp_dim=64,
                                        num_codes=32, code_dim=8, llm_dim=16, ema_decay=0.9, eval_selection="sample")
    decoder = KeyframeFeatureDecoderConfig(code_dim=8, width=32, depth=1, num_heads=2, mlp_dim=64, num_queries=N,
                                           max_codes=N, feature_dim=32, unet_context_dims=(8, 8), unet_pooled_dim=8)
    with pytest.warns(UserWarning, match="RANDOMLY"):
        stage = KeyframeTokenizerStage(tokenizer=tokenizer, decoder=decoder, loss=loss, backbone_seed=3)
    for key, value in optimizer.items():
        setattr(stage.optimizer_config, key, value)
    return stage


def square_on_plain_background(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1]: a plain tinted background with one saturated 7x7 square filling a random patch."""
    g = torch.Generator().manual_seed(seed)
    images = (0.3 + 0.4 * torch.rand(count, 3, 1, 1, generator=g)).expand(count, 3, IMAGE, IMAGE).clone()
    patch = torch.randint(0, N, (count,), generator=g)
    colours = torch.eye(3)[torch.randint(0, 3, (count,), generator=g)]
    for i, p in enumerate(patch.tolist()):
        r, c = divmod(p, IMAGE // PATCH)
        images[i, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = colours[i][:, None, None]
    return images, patch


def test_stage_logs_the_optional_terms_only_when_they_are_on():
    images, _ = square_on_plain_background(4, seed=0)
    batch = {"image": (images * 255).to(torch.uint8), "key": list("abcd"), "clip_start": torch.zeros(4)}
    for loss, optional in ((KeyframeTokenizerLossConfig(), set()),
                           (KeyframeTokenizerLossConfig(patch_weighting="deviation", selector_weight=1.0,
                                                        similarity_weight=1.0),
                            {"train/weighted_reconstruction_loss", "train/selector_deviation_loss",
                             "train/similarity_loss"})):
        stage = tiny_stage(loss)
        logged: dict[str, float] = {}
        stage.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value.detach()))
        stage.log_dict = lambda values, **kwargs: logged.update({k: float(v.detach()) for k, v in values.items()})
        total = stage.training_step(batch, 0)
        assert {k for k in logged if k.endswith("_loss")} - {
            "train/reconstruction_loss", "train/keep_ratio_loss", "train/commitment_loss"} == optional
        assert logged["train/loss"] == pytest.approx(float(total.detach()))


def fit_and_measure_object_keep(loss: KeyframeTokenizerLossConfig, steps: int = 60) -> tuple[float, float]:
    """Train a tiny stage directly on square-on-background images; mean p(keep) at the square's patch and
    elsewhere on held-out images."""
    torch.manual_seed(0)
    stage = tiny_stage(loss, extra_lr={"model.token_predictor.": 1e-2})
    optimizer = torch.optim.AdamW(stage.parameter_groups(), lr=1e-3)
    images, _ = square_on_plain_background(64, seed=1)
    stage.train()
    for step in range(steps):
        _, _, terms = stage(images[(step * 8) % 64:(step * 8) % 64 + 8])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    held_out, patch = square_on_plain_background(32, seed=2)
    with torch.no_grad():
        p_keep = stage.model.token_predictor(stage.model.vit_patch_features(held_out))[..., 0].exp()
    on_object = F.one_hot(patch, N).bool()
    return float(p_keep[on_object].mean()), float(p_keep[~on_object].mean())


def test_selector_prior_teaches_the_selector_to_keep_the_object():
    """With the paper's objective a short fit leaves p(keep) at the object's patch near the others'; with the
    selector prior the object's patch is kept far more often (measured: 0.90 vs 0.33 elsewhere)."""
    paper_object, paper_other = fit_and_measure_object_keep(KeyframeTokenizerLossConfig())
    prior_object, prior_other = fit_and_measure_object_keep(KeyframeTokenizerLossConfig(selector_weight=1.0))
    assert prior_object > 0.8 and prior_object > prior_other + 0.4, (prior_object, prior_other)
    assert prior_object > paper_object + 0.2, (paper_object, prior_object)


# ---- the probe tool (benchmarks/keyframe_code_probe.py) ------------------------------------------------

def load_probe_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("keyframe_code_probe", REPO / "benchmarks/keyframe_code_probe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_probe_tool_finds_the_objects_patch_and_scores_held_out_probes():
    probe = load_probe_tool()
    record = {"start_x": 100.0, "start_y": 20.0, "dx_px_per_s": -12.0, "dy_px_per_s": 0.0, "width": 128, "height": 128}
    # frame 12 at 6 fps = 2 s: centre (76, 20) of 128 -> (33.25, 8.75) of 56 -> column 2, row 0 of 14-px patches
    assert probe.object_patch_index(record, frame=12, fps=6, image_size=56, patch_size=14) == 2
    assert probe.object_patch_index(record | {"start_x": 500.0}, 0, 6, 56, 14) == 3  # clamped to the grid

    g = torch.Generator().manual_seed(0)
    labels = ["a", "b", "c"] * 20
    videos = [f"v{i // 2}" for i in range(60)]
    signal = F.one_hot(torch.tensor([ord(c) - ord("a") for c in labels]), 3).float()
    informative = torch.cat([signal + 0.1 * torch.randn(60, 3, generator=g), torch.randn(60, 5, generator=g)], 1)
    accuracy, l2 = probe.probe_accuracy([informative[:45]], labels[:45], videos[:45], [informative[45:]], labels[45:])
    assert accuracy == 1.0 and l2 in probe.L2_GRID
    noise = torch.randn(60, 8, generator=g)
    accuracy, _ = probe.probe_accuracy([noise[:45]], labels[:45], videos[:45], [noise[45:]], labels[45:])
    assert accuracy < 0.8
