"""Keyframe detokenizer g_I (library): the SDXL-layout U-Net, conditioning from padded code ids, the diffusion
loss, deterministic sampling incl. starting part-way (long video), exports, and the colour learning check."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from videolavit.diffusion.ddim import ddim_invert, ddim_sample, next_keyframe_start
from videolavit.diffusion.denoiser_scaling import DiscreteTimeScaling, EDMScaling
from videolavit.diffusion.sigma_sampling import DiscreteSigmaSampler
from videolavit.metrics.shape_color import color_agreement, dominant_colors
from videolavit.metrics.weights import MissingWeightsError
from videolavit.models.export import ExportError
from videolavit.models.keyframe_detokenizer import (
    KeyframeDetokenizer,
    KeyframeDetokenizerConfig,
    KeyframeDiffusionConfig,
    load_keyframe_detokenizer,
    pack_ids,
    save_keyframe_detokenizer,
)
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_unet import KeyframeUNet, KeyframeUNetConfig, load_shared_unet_weights, time_ids
from videolavit.models.latent_space import PixelSpace, build_latent_space, latent_space_spec
from videolavit.synth.moving_shapes import COLORS

NUM_CODES, CODE_DIM, IMAGE = 64, 8, 16
DECODER = dict(code_dim=CODE_DIM, width=32, depth=1, num_heads=2, mlp_dim=64, num_queries=16, max_codes=16,
               feature_dim=32, unet_context_dims=(12, 20), unet_pooled_dim=20)
UNET = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1, transformer_layers_per_block=(1, 1), num_heads=(2, 2), context_dim=32, pooled_dim=20,
            addition_time_embed_dim=8, norm_num_groups=8)




def tiny_config(**diffusion) -> KeyframeDetokenizerConfig:
    return KeyframeDetokenizerConfig(unet=KeyframeUNetConfig(**UNET), decoder=KeyframeFeatureDecoderConfig(**DECODER),
                                     diffusion=KeyframeDiffusionConfig(**{"scaling": "edm", **diffusion}),
                                     num_codes=NUM_CODES, code_dim=CODE_DIM, image_size=IMAGE, latent_downsample=1)


@pytest.fixture
def detokenizer() -> KeyframeDetokenizer:
    torch.manual_seed(0)
    return KeyframeDetokenizer(tiny_config()).eval()


def some_ids(seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, NUM_CODES, (3, 6), generator=torch.Generator().manual_seed(seed))
    ids[1, 4:] = -1
    ids[2, 2:] = -1
    return ids


# ---- U-Net ---------------------------------------------------------------------------------------------

def test_unet_maps_latents_to_latents_and_reads_context_pooled_and_size_ids():
    torch.manual_seed(0)
    unet = KeyframeUNet(KeyframeUNetConfig(**UNET)).eval()
    x, c_noise = torch.randn(2, 3, IMAGE, IMAGE), torch.tensor([0.1, -0.3])
    context, pooled, ids = torch.randn(2, 7, 32), torch.randn(2, 20), time_ids(2, IMAGE, IMAGE)
    assert ids.tolist() == [[IMAGE, IMAGE, 0, 0, IMAGE, IMAGE]] * 2
    with torch.no_grad():
        out = unet(x, c_noise, context=context, pooled=pooled, time_ids=ids)
        assert out.shape == x.shape and torch.isfinite(out).all()
        for changed in ({"context": context + 1}, {"pooled": pooled + 1}, {"time_ids": ids * 2}):
            other = unet(x, c_noise, **{"context": context, "pooled": pooled, "time_ids": ids, **changed})
            assert not torch.allclose(other, out), changed
        with pytest.raises(ValueError, match=r"context must be \[2, tokens, 32\]"):
            unet(x, c_noise, context=torch.randn(2, 7, 16), pooled=pooled, time_ids=ids)
        with pytest.raises(ValueError, match=r"pooled must be \[2, 20\]"):
            unet(x, c_noise, context=context, pooled=pooled[:, :5], time_ids=ids)


def test_default_unet_is_sdxl_base():
    with torch.device("meta"):
        unet = KeyframeUNet(KeyframeUNetConfig())
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's U-Net
    assert unet.net.config.cross_attention_dim == 2048 and unet.net.config.addition_embed_type == "text_time"
    assert unet.net.add_embedding.linear_1.in_features == 1280 + 6 * 256


def test_shared_weights_load_from_a_diffusers_unet_directory(tmp_path):
    torch.manual_seed(1)
    source = KeyframeUNet(KeyframeUNetConfig(**UNET)).net
    source.save_pretrained(tmp_path / "sdxl" / "unet")
    torch.manual_seed(2)
    unet = KeyframeUNet(KeyframeUNetConfig(**UNET))
    shared = load_shared_unet_weights(unet, tmp_path / "sdxl")  # a pipeline root: finds unet/
    assert not shared.missing and not shared.mismatched and len(shared.loaded) == len(source.state_dict())
    for name, tensor in source.state_dict().items():
        assert torch.equal(unet.net.state_dict()[name], tensor), name

    wider = KeyframeUNet(KeyframeUNetConfig(**{**UNET, "context_dim": 48}))  # cross-attention k/v differ
    shared = load_shared_unet_weights(wider, tmp_path / "sdxl" / "unet")
    assert shared.mismatched and all("attn2.to_k" in n or "attn2.to_v" in n for n in shared.mismatched)

    with pytest.raises(MissingWeightsError, match="model.init_args.unet_weights"):
        load_shared_unet_weights(unet, tmp_path / "nowhere", "model.init_args.unet_weights")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="no U-Net weights"):
        load_shared_unet_weights(unet, tmp_path / "empty")
    (tmp_path / "other").mkdir()
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="no tensor"):
        load_shared_unet_weights(unet, tmp_path / "other")


def test_unet_config_errors_are_named():
    with pytest.raises(ValueError, match="num_heads has 1 entries"):
        KeyframeUNetConfig(**{**UNET, "num_heads": (2,)})
    with pytest.raises(ValueError, match="unet.context_dim 48 != the feature decoder's context width 32"):
        KeyframeDetokenizerConfig(unet=KeyframeUNetConfig(**{**UNET, "context_dim": 48}),
                                  decoder=KeyframeFeatureDecoderConfig(**DECODER), num_codes=NUM_CODES,
                                  code_dim=CODE_DIM, image_size=IMAGE, latent_downsample=1)
    with pytest.raises(ValueError, match="not divisible by the U-Net's down-sampling"):
        KeyframeDetokenizerConfig(unet=KeyframeUNetConfig(**UNET), decoder=KeyframeFeatureDecoderConfig(**DECODER),
                                  num_codes=NUM_CODES, code_dim=CODE_DIM, image_size=15, latent_downsample=1)


# ---- conditioning --------------------------------------------------------------------------------------

def test_pack_ids_moves_padding_right_and_trims_it():
    ids = torch.tensor([[-1, 5, -1, 7], [3, -1, -1, -1]])
    assert pack_ids(ids).tolist() == [[5, 7], [3, -1]]
    assert pack_ids(torch.full((2, 3), -1)).tolist() == [[-1], [-1]]


def test_conditioning_ignores_padding_and_depends_on_the_codes(detokenizer):
    ids = some_ids()
    with torch.no_grad():
        cond = detokenizer.conditioning(ids)
        assert cond["context"].shape == (3, 16, 32) and cond["pooled"].shape == (3, 20)
        assert cond["time_ids"].tolist() == [[IMAGE, IMAGE, 0, 0, IMAGE, IMAGE]] * 3
        padded = torch.cat([ids, torch.full((3, 5), -1)], dim=1)
        left = torch.stack([torch.cat([row[row < 0], row[row >= 0]]) for row in ids])  # padding first
        for other in (padded, left):
            again = detokenizer.conditioning(other)
            for key in cond:
                assert torch.allclose(again[key], cond[key], atol=1e-6), key
        alone = detokenizer.conditioning(ids[2:, :2])  # the same image in a batch of one, no padding
        assert torch.allclose(alone["context"], cond["context"][2:], atol=1e-6)
        changed = ids.clone()
        changed[0, 0] = (changed[0, 0] + 1) % NUM_CODES
        assert not torch.allclose(detokenizer.conditioning(changed)["context"][0], cond["context"][0])
    with pytest.raises(ValueError, match="subtract the LLM vocabulary offset"):
        detokenizer.conditioning(ids + 32002)


def test_only_condition_heads_and_unet_train(detokenizer):
    trainable = {n for n, p in detokenizer.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("unet.", "feature_decoder.unet_proj", "feature_decoder.unet_attnpool"))
                             for n in trainable)
    assert any(n.startswith("feature_decoder.unet_attnpool") for n in trainable)
    assert "codebook.weight" not in dict(detokenizer.named_parameters())  # a buffer: never optimised
    detokenizer.train()
    cond = detokenizer.conditioning(some_ids())
    detokenizer.loss(torch.zeros(3, 3, IMAGE, IMAGE), cond).backward()
    assert detokenizer.feature_decoder.unet_proj_1.weight.grad is not None  # the heads learn through the U-Net


def test_unconditional_zeroes_context_and_pooled_keeps_size_ids(detokenizer):
    cond = detokenizer.conditioning(some_ids())
    uncond = detokenizer.unconditional(cond)
    assert not uncond["context"].any() and not uncond["pooled"].any()
    assert torch.equal(uncond["time_ids"], cond["time_ids"])
    dropped = detokenizer.drop_condition(cond, torch.tensor([True, False, True]))
    assert not dropped["context"][0].any() and torch.equal(dropped["context"][1], cond["context"][1])


# ---- diffusion -----------------------------------------------------------------------------------------

def smooth_latents(batch: int, seed: int = 0) -> torch.Tensor:
    """Learnable targets: a few blurry blobs, in [-1, 1]."""
    coarse = torch.rand(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("scaling", ["edm", "eps_discrete"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(scaling):
    torch.manual_seed(0)
    model = KeyframeDetokenizer(tiny_config(scaling=scaling, condition_dropout=0.0))
    ids, x0 = some_ids(), smooth_latents(3)

    def loss() -> float:  # over 16 fixed noise draws of each image, so σ-sampling noise averages out
        model.eval()
        with torch.no_grad():
            cond = {k: v.repeat(16, *([1] * (v.ndim - 1))) for k, v in model.conditioning(ids).items()}
            return float(model.loss(x0.repeat(16, 1, 1, 1), cond, generator=torch.Generator().manual_seed(0)))

    before = loss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(40):
        value = model.loss(x0, model.conditioning(ids), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    after = loss()
    assert after < 0.7 * before, (before, after)


def test_diffusion_config_pairs_scaling_noise_and_schedule():
    edm = KeyframeDiffusionConfig(scaling="edm", sigma_data=0.4)
    assert isinstance(edm.build_scaling(), EDMScaling) and edm.build_scaling().sigma_data == 0.4
    assert edm.schedule().sigma_max == 80.0
    sdxl = KeyframeDiffusionConfig()  # the release's: SDXL's discrete ε schedule
    assert isinstance(sdxl.build_scaling(), DiscreteTimeScaling)
    schedule = sdxl.schedule()
    assert schedule.sigma_min == pytest.approx(0.029168, rel=1e-4) and schedule.sigma_max == pytest.approx(14.6146, rel=1e-4)
    sampler = sdxl.build_sigma_sampler()
    assert isinstance(sampler, DiscreteSigmaSampler)
    drawn = sampler(4000, generator=torch.Generator().manual_seed(0))
    assert torch.isin(drawn, sampler.sigmas).all() and drawn.min() < 0.1 and drawn.max() > 10
    assert sdxl.build_scaling()(drawn[:3])[3].dtype == torch.long  # the U-Net sees timestep indices
    with pytest.raises(ValueError, match="scaling must be one of"):
        KeyframeDiffusionConfig(scaling="ddpm")
    with pytest.raises(ValueError, match="needs a discrete scaling"):
        KeyframeDiffusionConfig(scaling="edm", train_sigmas="discrete")


def test_sampling_is_deterministic_given_a_generator_and_guidance_matters(detokenizer):
    cond = detokenizer.conditioning(some_ids())
    first = detokenizer.sample(cond, num_steps=4, generator=torch.Generator().manual_seed(3))
    again = detokenizer.sample(cond, num_steps=4, generator=torch.Generator().manual_seed(3))
    other = detokenizer.sample(cond, num_steps=4, generator=torch.Generator().manual_seed(4))
    assert first.shape == (3, 3, IMAGE, IMAGE) and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.allclose(first, other)
    unguided = detokenizer.sample(cond, num_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(first, unguided)


def test_starting_from_a_ddim_inverted_latent_returns_to_it(detokenizer):
    """The long-video path: x_init + a tail of the schedule; with guidance off, sampling from the DDIM
    inversion of x0 over that tail comes back to x0."""
    cond = detokenizer.conditioning(some_ids())
    x0 = smooth_latents(3, seed=1)
    denoise = detokenizer.denoise_fn(cond, guidance_scale=1.0)
    sigmas = detokenizer.sigmas(10)
    with torch.no_grad():
        start = next_keyframe_start(x0, sigmas, strategy="invert", fraction=0.3, denoise=denoise, fixed_point_iters=10)
        assert len(start.sigmas) == 8 and float(start.sigmas[0]) == float(sigmas[3])
        back = detokenizer.sample(cond, x_init=start.x, sigmas=start.sigmas, guidance_scale=1.0)
        assert torch.allclose(back, ddim_sample(start.x, denoise, start.sigmas), atol=1e-5)  # Euler = σ-space DDIM
        assert (back - x0).abs().max() < 0.05 * float(start.sigmas[0])
        first_order = ddim_invert(x0, denoise, start.sigmas)  # classic inversion: a round trip that drifts more
        drift = (detokenizer.sample(cond, x_init=first_order, sigmas=start.sigmas, guidance_scale=1.0) - x0).abs().max()
        assert (back - x0).abs().max() < drift
        noised = next_keyframe_start(x0, sigmas, fraction=0.85, generator=torch.Generator().manual_seed(0))
        out = detokenizer.sample(cond, x_init=noised.x, sigmas=noised.sigmas)
        assert out.shape == x0.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="latents must be"):
        detokenizer.sample(cond, x_init=torch.zeros(3, 3, 8, 8), sigmas=sigmas)


# ---- exports -------------------------------------------------------------------------------------------

def test_export_round_trip_gives_identical_samples(detokenizer, tmp_path):
    spec = latent_space_spec(PixelSpace(scale=1.0))
    save_keyframe_detokenizer(detokenizer, tmp_path, spec, provenance={"directory": "/somewhere"})
    meta = json.loads((tmp_path / "keyframe_detokenizer.json").read_text())
    assert meta["extra"]["latent_space"] == {"class_path": "videolavit.models.latent_space.PixelSpace",
                                             "init_args": {"scale": 1.0}}
    assert meta["config"]["image_size"] == IMAGE and meta["config"]["latent_downsample"] == 1
    loaded = load_keyframe_detokenizer(tmp_path)
    assert isinstance(build_latent_space(loaded.latent_space_spec), PixelSpace)
    ids = some_ids(5)
    samples = [model.sample(model.conditioning(ids), num_steps=3, generator=torch.Generator().manual_seed(9))
               for model in (detokenizer, loaded)]
    assert torch.equal(samples[0], samples[1])

    (tmp_path / "keyframe_detokenizer.json").write_text(json.dumps({**meta, "extra": {}}))
    with pytest.raises(ExportError, match="records no latent space"):
        load_keyframe_detokenizer(tmp_path)


# ---- colour learning check -----------------------------------------------------------------------------

def test_dominant_colors_of_painted_shapes():
    images = torch.full((len(COLORS) + 1, 3, 20, 20), 128, dtype=torch.uint8)
    images[:, 0] += 12  # a tinted background never votes
    for i, rgb in enumerate(COLORS.values()):
        shade = torch.tensor(rgb, dtype=torch.float32)[:, None, None] * torch.linspace(0.85, 1.1, 6)[None, :, None]
        images[i, :, 5:11, 5:11] = shade.clamp(0, 255).to(torch.uint8).expand(-1, -1, 6)
    predicted = dominant_colors(images)
    assert predicted == list(COLORS) + [None]
    assert color_agreement(predicted, list(COLORS) + ["red"]) == pytest.approx(len(COLORS) / (len(COLORS) + 1))
    with pytest.raises(ValueError, match="uint8"):
        dominant_colors(images.float())


def test_dominant_colors_read_the_corpus_keyframes(prepared_shards, synthetic_corpus):
    from datamodules.video_datamodule import VideoDataModule
    from datamodules.views import KeyframeView

    truth = {json.loads(line)["videoid"]: json.loads(line)["color"]
             for line in (synthetic_corpus / "metadata.jsonl").read_text().splitlines()}
    dm = VideoDataModule(val_shards=str(prepared_shards), view=KeyframeView(image_size=32), batch_size=16, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(dm.val_dataloader())
    images = torch.cat([b["image"] for b in batches])
    keys = [k for b in batches for k in b["key"]]
    assert color_agreement(dominant_colors(images), [truth[k] for k in keys]) == 1.0
