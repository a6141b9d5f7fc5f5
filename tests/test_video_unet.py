"""The video U-Net (SVD layout, per-frame motion context), SVD weight loading, and the detokenizer model
around it: EDM training step, deterministic guided sampling, unconditional branch, export round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel

from videolavit.metrics.weights import MissingWeightsError
from videolavit.models.motion_condition_encoder import MotionConditionEncoderConfig
from videolavit.models.latent_space import build_latent_space
from videolavit.models.video_detokenizer import (
    UNCONDITIONAL_KEYS,
    VideoDetokenizer,
    VideoDetokenizerConfig,
    VideoDetokenizerSpec,
    load_video_detokenizer,
    read_video_detokenizer_spec,
    save_video_detokenizer,
)
from videolavit.models.video_unet import VideoUNet, VideoUNetConfig, load_svd_unet_weights, per_location_motion_context

DOWN = ("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal")
UP = ("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal")
TINY_UNET = dict(down_block_types=DOWN, up_block_types=UP, block_out_channels=(32, 32), layers_per_block=1,
                 num_attention_heads=(1, 2), cross_attention_dim=16, addition_time_embed_dim=8, motion_grid=(4, 4))




def tiny_unet(**overrides) -> VideoUNet:
    torch.manual_seed(0)
    return VideoUNet(VideoUNetConfig(**{**TINY_UNET, **overrides})).eval()


def unet_inputs(batch=2, frames=3, size=8, channels=10, tokens=16, dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, frames, channels, size, size, generator=g), torch.full((batch,), 0.3),
            torch.randn(batch, frames, tokens, dim, generator=g), torch.tensor([[6.0, 127.0, 0.02]] * batch))


# ---- the U-Net ----------------------------------------------------------------------------------

def test_output_has_the_latent_channels_of_every_frame():
    unet = tiny_unet()
    assert unet.conv_in.in_channels == 10  # noisy 4 ‖ keyframe 4 ‖ motion 2
    with torch.no_grad():
        out = unet(*unet_inputs())
    assert out.shape == (2, 3, 4, 8, 8)
    assert torch.isfinite(out).all()
    pixel = tiny_unet(latent_channels=3)
    assert pixel.conv_in.in_channels == 8
    with torch.no_grad():
        assert pixel(*unet_inputs(channels=8)).shape == (2, 3, 3, 8, 8)


def test_odd_sizes_are_upsampled_back_to_the_input_size():
    with torch.no_grad():
        assert tiny_unet()(*unet_inputs(size=6, batch=1)).shape == (1, 3, 4, 6, 6)


def test_changing_one_frames_motion_context_changes_that_frame():
    unet = tiny_unet()
    sample, timestep, context, ids = unet_inputs()
    with torch.no_grad():
        base = unet(sample, timestep, context, ids)
        edited = context.clone()
        edited[0, 2] = torch.randn_like(edited[0, 2]) * 3
        out = unet(sample, timestep, edited, ids)
    change = (out - base).abs().flatten(3).mean(-1)  # [b, T, C]
    assert change[0, 2].min() > 1e-4  # frame 2 of video 0 follows its own context
    assert change[1].max() == 0  # other videos of the batch do not see it


def test_each_frame_gets_its_own_spatial_context():
    # the spatial cross-attention alone (temporal mixing switched off): a frame's output depends on its
    # own motion tokens only, where stock diffusers would give every frame the same context
    unet = tiny_unet()
    for module in unet.modules():
        if type(module).__name__ == "AlphaBlender":
            module.mix_factor.data.fill_(1e4)  # sigmoid -> 1: spatial path only
        if type(module).__name__ == "SpatioTemporalResBlock":
            module.time_mixer.mix_factor.data.fill_(1e4)
    sample, timestep, context, ids = unet_inputs(batch=1)
    with torch.no_grad():
        base = unet(sample, timestep, context, ids)
        edited = context.clone()
        edited[0, 1] += torch.randn_like(edited[0, 1])
        out = unet(sample, timestep, edited, ids)
    change = (out - base).abs().flatten(2).amax(-1)[0]  # [T]
    assert change[1] > 1e-4
    assert change[0] < 1e-6 and change[2] < 1e-6


def test_temporal_context_is_the_motion_under_each_location_over_time():
    batch, frames, grid, dim = 2, 3, (4, 4), 5
    context = torch.randn(batch * frames, 16, dim)
    same = per_location_motion_context(context, grid, (4, 4), frames)  # [b*h*w, T, D]
    assert same.shape == (batch * 16, frames, dim)
    as_grid = context.reshape(batch, frames, 4, 4, dim)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (0, 3, 1)]:
        assert torch.equal(same[b * 16 + i * 4 + j], as_grid[b, :, i, j])
    constant = torch.ones(batch * frames, 16, dim) * torch.arange(frames).repeat(batch)[:, None, None]
    up = per_location_motion_context(constant, grid, (8, 8), frames)
    down = per_location_motion_context(constant, grid, (2, 2), frames)
    for resampled in (up, down):  # a field constant in space stays constant, frame by frame
        assert torch.allclose(resampled, torch.arange(frames, dtype=torch.float)[None, :, None].expand_as(resampled))


def test_bad_inputs_are_named():
    unet = tiny_unet()
    sample, timestep, context, ids = unet_inputs()
    with pytest.raises(ValueError, match=r"sample must be \[batch, frames, 10, height, width\]"):
        unet(sample[:, :, :8], timestep, context, ids)
    with pytest.raises(ValueError, match=r"motion_context must be \[batch, frames, 4x4 tokens, 16\]"):
        unet(sample, timestep, context[:, :, :9], ids)
    with pytest.raises(ValueError, match="added_time_ids"):
        unet(sample, timestep, context, ids[:, :2])
    with pytest.raises(ValueError, match="multiples of 32"):
        VideoUNetConfig(block_out_channels=(16, 32), num_attention_heads=(1, 1))


def test_fewer_norm_groups_keep_the_layout_and_the_flat_colours():
    narrow, svd_like = tiny_unet(norm_num_groups=8), tiny_unet()
    norms = [m for m in narrow.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    assert {k: v.shape for k, v in narrow.state_dict().items()} == {k: v.shape for k, v in svd_like.state_dict().items()}
    # 32 groups of 32 channels normalise each channel alone: a frame's flat colour does not reach the output
    flat = torch.ones(1, 2, 32, 4, 4) * torch.linspace(-1, 1, 32)[None, None, :, None, None]
    brighter = flat + 0.5 * torch.rand(1, 1, 32, 1, 1)
    out = narrow.conv_norm_out
    assert not torch.allclose(out(flat.flatten(0, 1)), out(brighter.flatten(0, 1)), atol=1e-3)
    assert torch.allclose(svd_like.conv_norm_out(flat.flatten(0, 1)), svd_like.conv_norm_out(brighter.flatten(0, 1)),
                          atol=1e-3)
    with pytest.raises(ValueError, match="norm_num_groups must divide 32"):
        VideoUNetConfig(norm_num_groups=5)


def test_full_size_model_has_the_svd_xt_layout():
    with torch.device("meta"):
        ours = VideoUNet(VideoUNetConfig())
        svd = UNetSpatioTemporalConditionModel()  # diffusers' defaults are SVD img2vid-xt
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    svd_shapes = {k: tuple(v.shape) for k, v in svd.state_dict().items()}
    assert ours_shapes.keys() == svd_shapes.keys()
    differ = sorted(k for k in ours_shapes if ours_shapes[k] != svd_shapes[k])
    assert differ == ["conv_in.weight"]  # 10 input channels instead of SVD's 8
    assert ours_shapes["conv_in.weight"] == (320, 10, 3, 3)


# ---- SVD weights --------------------------------------------------------------------------------

def save_tiny_svd(root) -> UNetSpatioTemporalConditionModel:
    """A tiny SVD-style U-Net (8 input channels) saved as a diffusers pipeline directory ``root/unet``."""
    torch.manual_seed(3)
    svd = UNetSpatioTemporalConditionModel(
        in_channels=8, out_channels=4, down_block_types=DOWN, up_block_types=UP, block_out_channels=(32, 32),
        layers_per_block=1, num_attention_heads=(1, 2), cross_attention_dim=16, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24)
    svd.save_pretrained(root / "unet")
    return svd


def test_svd_weights_load_except_input_conv_and_cross_attention(tmp_path, capsys):
    svd = save_tiny_svd(tmp_path)
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    report = load_svd_unet_weights(unet, tmp_path)  # the pipeline root; its unet/ is found
    assert "tensors loaded" in capsys.readouterr().out

    theirs, ours = svd.state_dict(), unet.state_dict()
    cross = [k for k in ours if ".attn2." in k]
    assert cross and {"conv_in.weight", "conv_in.bias"} | set(cross) == set(report.fresh)
    assert not report.unused
    assert set(report.loaded) == set(ours) - set(report.fresh)
    for key in report.loaded:
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(ours["conv_in.weight"], before["conv_in.weight"])
    for key in cross:  # same shape as SVD's, but trained from scratch: q/k/v as initialised, output at zero
        if ".to_out." in key:
            assert not ours[key].any(), key
        else:
            assert torch.equal(ours[key], before[key]) and not torch.equal(ours[key], theirs[key]), key

    again = tiny_unet()
    assert load_svd_unet_weights(again, tmp_path / "unet", verbose=False).loaded == report.loaded


def test_svd_weights_of_another_shape_stay_fresh(tmp_path):
    save_tiny_svd(tmp_path)
    unet = tiny_unet(addition_time_embed_dim=4)  # add_embedding input 12 instead of 24
    report = load_svd_unet_weights(unet, tmp_path, verbose=False)
    assert "add_embedding.linear_1.weight" in report.fresh
    assert "add_embedding.linear_1.bias" in report.loaded  # same shape: loaded


def test_missing_svd_directory_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="SVD U-Net directory not found"):
        load_svd_unet_weights(tiny_unet(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no U-Net safetensors file"):
        load_svd_unet_weights(tiny_unet(), tmp_path / "empty")


# ---- the detokenizer ----------------------------------------------------------------------------

def tiny_detokenizer(**overrides) -> VideoDetokenizer:
    torch.manual_seed(0)
    config = VideoDetokenizerConfig(
        unet=VideoUNetConfig(**{**TINY_UNET, "latent_channels": 3}),
        motion_encoder=MotionConditionEncoderConfig(height=4, width=4, dim=16, depth=1, num_heads=2, out_dim=16),
        **{"scaling": "edm", "sigma_data": 0.5, "sigma_max": 80.0, **overrides})
    return VideoDetokenizer(config)


def detokenizer_batch(batch=2, frames=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, frames, 3, size, size, generator=g) - 0.5
    keyframe = x0[:, 0].clone()
    motion = torch.randn(batch, 2, frames, 6, 6, generator=g) * 10  # a 6x6 grid: resized to 4x4 and 8x8
    return x0, keyframe, motion


def test_conditioning_layout_and_the_unconditional_branch():
    model = tiny_detokenizer()
    _, keyframe, motion = detokenizer_batch()
    cond = model.conditioning(keyframe, motion, generator=torch.Generator().manual_seed(0))
    assert cond["keyframe_latent"].shape == (2, 3, 8, 8)
    assert cond["motion_field"].shape == (2, 3, 2, 8, 8)
    assert cond["motion_context"].shape == (2, 3, 16, 16)
    assert torch.allclose(cond["added_time_ids"], torch.tensor([[6.0, 127.0, 0.02]] * 2))
    assert (cond["keyframe_latent"] - keyframe).std() == pytest.approx(0.02, rel=0.3)  # noise augmentation
    assert cond["motion_field"].abs().mean() == pytest.approx((motion / 10).abs().mean(), rel=0.5)  # standardised
    uncond = model.unconditional(cond)
    for key in UNCONDITIONAL_KEYS:
        assert not uncond[key].any()
    assert torch.equal(uncond["added_time_ids"], cond["added_time_ids"])
    with pytest.raises(ValueError, match=r"keyframe_latent must be \[batch, 3, h, w\]"):
        model.conditioning(torch.zeros(2, 4, 8, 8), motion)
    with pytest.raises(ValueError, match="motion must be"):
        model.conditioning(keyframe, motion[:, :1])


def test_mismatched_sizes_are_rejected_at_construction():
    with pytest.raises(ValueError, match="cross_attention_dim .* must equal the motion encoder's out_dim"):
        VideoDetokenizerConfig(unet=VideoUNetConfig(cross_attention_dim=512))
    with pytest.raises(ValueError, match="motion_grid"):
        VideoDetokenizerConfig(unet=VideoUNetConfig(motion_grid=(8, 8)))


def test_training_steps_reduce_the_loss_on_a_fixed_batch():
    model = tiny_detokenizer(uncond_prob=0.0).train()
    x0, keyframe, motion = detokenizer_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        g = torch.Generator().manual_seed(5)  # the same σ and noise every time: a fixed objective
        return model.loss(x0, model.conditioning(keyframe, motion, generator=g), generator=g)

    start = loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.7 * start


def test_unconditional_training_zeroes_the_conditioning_of_dropped_samples():
    model = tiny_detokenizer(uncond_prob=0.5).train()
    x0, keyframe, motion = detokenizer_batch(batch=8)
    seen = {}

    def spy(x, c_noise, **cond):
        seen.update(cond)
        return torch.zeros_like(x)

    model._network = spy
    cond = model.conditioning(keyframe, motion)
    model.loss(x0, cond, generator=torch.Generator().manual_seed(0))
    dropped = seen["motion_context"].flatten(1).abs().sum(1) == 0
    assert 0 < int(dropped.sum()) < 8
    for key in UNCONDITIONAL_KEYS:
        assert not seen[key][dropped].any() and seen[key][~dropped].abs().sum() > 0
    model.eval()
    model.loss(x0, cond)
    assert all(seen["motion_context"].flatten(1).abs().sum(1) > 0)  # never in evaluation


def test_sampling_is_deterministic_given_a_generator():
    model = tiny_detokenizer().eval()
    _, keyframe, motion = detokenizer_batch()
    with torch.no_grad():
        cond = model.conditioning(keyframe, motion, generator=torch.Generator().manual_seed(0))

    def sample(seed):
        return model.sample(cond, 3, num_steps=3, generator=torch.Generator().manual_seed(seed))

    first = sample(1)
    assert first.shape == (2, 3, 3, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, sample(1))
    assert not torch.allclose(first, sample(2))
    with pytest.raises(ValueError, match="holds 3 frames of motion, asked for 4"):
        model.sample(cond, 4)


def test_guidance_ramps_linearly_over_the_frames():
    # one Euler step from σ_max to 0 returns the guided denoiser output itself
    model = tiny_detokenizer().eval()
    _, keyframe, motion = detokenizer_batch(frames=4)
    with torch.no_grad():
        cond = model.conditioning(keyframe, motion, generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 80
        guided = model.sample(cond, 4, num_steps=1, guidance=(1.0, 4.0), x_init=x)
        d_cond = model.denoiser(x, 80.0, **cond)
        d_uncond = model.denoiser(x, 80.0, **model.unconditional(cond))
        plain = model.sample(cond, 4, num_steps=1, guidance=None, x_init=x)
    assert not torch.allclose(d_cond, d_uncond, atol=1e-3)
    for t, scale in enumerate([1.0, 2.0, 3.0, 4.0]):
        expected = d_uncond[:, t] + scale * (d_cond[:, t] - d_uncond[:, t])
        assert torch.allclose(guided[:, t], expected, atol=1e-4), t
    assert torch.allclose(plain, d_cond, atol=1e-4)  # x − 80·(x − D)/80 rounds at ~1e-5


def test_export_round_trip_gives_identical_samples(tmp_path):
    model = tiny_detokenizer().eval()
    spec = VideoDetokenizerSpec(latent_space={"class_path": "videolavit.models.latent_space.PixelSpace",
                                              "init_args": {"scale": 1.0}},
                                frame_size=(8, 8), num_frames=3, motion_grid=(6, 6), motion_scale=10.0)
    save_video_detokenizer(model, tmp_path, spec)
    restored, latent_config = load_video_detokenizer(tmp_path)
    assert restored.config == model.config
    assert read_video_detokenizer_spec(tmp_path) == spec
    assert type(build_latent_space(latent_config)).__name__ == "PixelSpace"
    _, keyframe, motion = detokenizer_batch()

    def sample(m):
        g = torch.Generator().manual_seed(4)
        return m.sample(m.conditioning(keyframe, motion, generator=g), 3, num_steps=2, generator=g)

    with torch.no_grad():
        assert torch.equal(sample(restored), sample(model))


def test_only_latent_spaces_are_built_from_a_config():
    with pytest.raises(ValueError, match="not a videolavit LatentSpace"):
        build_latent_space({"class_path": "torch.nn.Linear", "init_args": {"in_features": 1, "out_features": 1}})
    with pytest.raises(ValueError, match="cannot be imported"):
        build_latent_space({"class_path": "videolavit.models.latent_space.NoSuchSpace"})


def test_temporal_convolutions_run_as_2d_with_the_same_parameters_and_result():
    from videolavit.models.video_unet import TemporalConv3d

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(6, 5, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    fast = torch.nn.Conv3d(6, 5, kernel_size=(3, 1, 1), padding=(1, 0, 0))
    fast.load_state_dict(conv.state_dict())
    assert TemporalConv3d.applies_to(fast)
    fast = TemporalConv3d.like(fast)
    x = torch.randn(2, 6, 7, 4, 3, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(fast(x2), conv(x), rtol=1e-5, atol=1e-6)
    conv(x).square().sum().backward()
    fast(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-5)
    assert not TemporalConv3d.applies_to(torch.nn.Conv3d(6, 5, kernel_size=3, padding=1))  # spatial kernels stay 3-D

    temporal = [m for m in tiny_unet().modules() if isinstance(m, torch.nn.Conv3d)]
    assert temporal and all(type(m) is TemporalConv3d for m in temporal)


def test_keyframe_residual_diffuses_the_clip_minus_its_keyframe():
    x0, keyframe, motion = detokenizer_batch()
    plain, residual = tiny_detokenizer(uncond_prob=0.0), tiny_detokenizer(uncond_prob=0.0, keyframe_residual=True)
    residual.load_state_dict(plain.state_dict())
    cond = residual.conditioning(keyframe, motion, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cond["residual_base"], keyframe)  # the clean keyframe, not the noise-augmented one
    plain_cond = {k: v for k, v in cond.items() if k != "residual_base"}
    got = residual.loss(x0, cond, generator=torch.Generator().manual_seed(1))
    want = plain.loss(x0 - keyframe[:, None], plain_cond, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want)

    # sampling: the same trajectory as the plain model, shifted by the keyframe
    out = residual.sample(cond, 3, num_steps=4, guidance=(1.0, 2.0), generator=torch.Generator().manual_seed(2))
    shifted = plain.sample(plain_cond, 3, num_steps=4, guidance=(1.0, 2.0), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, shifted + keyframe[:, None])


def test_gradient_checkpointing_recomputes_whole_transformers_with_the_same_loss_and_gradients():
    from videolavit.models.video_unet import MotionTransformerSpatioTemporal
    from videolavit.planning.saved_activations import SavedTensorBytes

    model = tiny_detokenizer(uncond_prob=0.5).train()
    x0, keyframe, motion = detokenizer_batch()
    transformers = [m for m in model.unet.modules() if isinstance(m, MotionTransformerSpatioTemporal)]
    runs = {"temporal_blocks": 0, "time_mixer": 0}
    for transformer in transformers:
        for block in transformer.temporal_transformer_blocks:
            block.register_forward_hook(lambda *_: runs.__setitem__("temporal_blocks", runs["temporal_blocks"] + 1))
        transformer.time_mixer.register_forward_hook(lambda *_: runs.__setitem__("time_mixer", runs["time_mixer"] + 1))

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor], int, dict[str, int]]:
        model.zero_grad(set_to_none=True)
        runs.update(temporal_blocks=0, time_mixer=0)
        g = torch.Generator().manual_seed(3)  # the same σ, noise and dropped conditioning both times
        with SavedTensorBytes(exclude=model.parameters()) as saved:
            loss = model.loss(x0, model.conditioning(keyframe, motion, generator=g), generator=g)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, saved.bytes, dict(runs)

    loss, grads, saved, plain_runs = step()
    model.unet.enable_gradient_checkpointing()
    assert all(t.gradient_checkpointing for t in transformers)
    loss_ckpt, grads_ckpt, saved_ckpt, ckpt_runs = step()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # the temporal blocks and the mixer run again in the backward pass, so their activations were not kept
    assert plain_runs == {"temporal_blocks": len(transformers), "time_mixer": len(transformers)}
    assert ckpt_runs == {"temporal_blocks": 2 * len(transformers), "time_mixer": 2 * len(transformers)}
    assert saved_ckpt < saved / 2
    with torch.no_grad():  # nothing to recompute without gradients
        runs.update(temporal_blocks=0, time_mixer=0)
        model.unet(*unet_inputs(channels=8))
        assert runs["temporal_blocks"] == len(transformers)
