"""Motion-condition encoder: output layout, release layout and strict loading, time equivariance, export."""

import os
import re
from pathlib import Path

import pytest
import torch

from videolavit.models.export import load_export, save_export
from videolavit.models.motion_condition_encoder import MotionConditionEncoder, MotionConditionEncoderConfig
from tests.release_layout import release_layout




def tiny(**overrides) -> MotionConditionEncoderConfig:
    return MotionConditionEncoderConfig(**{**dict(dim=32, depth=2, num_heads=2, out_dim=48), **overrides})


def test_output_is_one_context_token_per_macroblock_per_frame():
    torch.manual_seed(0)
    encoder = MotionConditionEncoder(tiny())
    context = encoder(torch.randn(2, 2, 24, 16, 16))
    assert context.shape == (2, 24, 256, 48)
    assert torch.isfinite(context).all()


def test_wrong_input_shape_is_rejected():
    encoder = MotionConditionEncoder(tiny())
    with pytest.raises(ValueError, match=r"motion must be \[batch, 2, frames, 16, 16\]"):
        encoder(torch.zeros(1, 2, 24, 20, 36))


def test_full_size_model_matches_the_reference_layout_and_loads_it_strictly():
    reference = release_layout("motion_condition_encoder")
    assert len(reference) == 247  # the header's tensor count
    with torch.device("meta"):
        encoder = MotionConditionEncoder(MotionConditionEncoderConfig())
    ours = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert ours == reference
    assert "temp_pos" not in reference  # the release adds no temporal position embedding here
    encoder.load_release_state_dict({k: torch.empty(s, device="meta") for k, s in reference.items()})


def test_random_release_layout_state_dict_loads_strictly_into_a_narrow_model():
    narrow = {512: 32, 1536: 96, 2048: 128, 1024: 48}  # positions (256) are a grid size, not a width
    layout = {k: tuple(narrow.get(n, n) for n in s)
              for k, s in release_layout("motion_condition_encoder").items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator) * 0.05 for k, s in layout.items()}
    encoder = MotionConditionEncoder(MotionConditionEncoderConfig(dim=32, out_dim=48))
    result = encoder.load_release_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in state.items():
        assert torch.equal(encoder.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="Unexpected key.*temp_pos"):
        encoder.load_release_state_dict({**state, "temp_pos": torch.zeros(1, 24, 32)})
    with pytest.raises(RuntimeError, match="size mismatch for out_proj.weight"):
        MotionConditionEncoder(MotionConditionEncoderConfig(dim=32, out_dim=64)).load_release_state_dict(state)


def test_without_temporal_embedding_the_encoder_is_equivariant_to_frame_order():
    torch.manual_seed(0)
    motion = torch.randn(1, 2, 6, 16, 16)
    order = torch.tensor([3, 0, 5, 1, 4, 2])

    release_like = MotionConditionEncoder(tiny(num_frames=6)).eval()
    with torch.no_grad():
        assert torch.allclose(release_like(motion[:, :, order]), release_like(motion)[:, order], atol=1e-5)

    with_time = MotionConditionEncoder(tiny(num_frames=6, temporal_pos_embed=True)).eval()
    assert with_time.temp_pos.shape == (1, 6, 32)
    with torch.no_grad():
        assert not torch.allclose(with_time(motion[:, :, order]), with_time(motion)[:, order], atol=1e-3)
    with pytest.raises(ValueError, match="temporal position embedding is for 6 frames, got 5"):
        with_time(motion[:, :, :5])


def test_export_round_trip_gives_identical_context(tmp_path):
    torch.manual_seed(0)
    encoder = MotionConditionEncoder(tiny(temporal_pos_embed=True)).eval()
    save_export(encoder, tmp_path, "motion_condition_encoder", encoder.config)
    restored = load_export(tmp_path, "motion_condition_encoder").eval()
    assert restored.config == encoder.config
    motion = torch.randn(1, 2, 24, 16, 16)
    with torch.no_grad():
        assert torch.equal(restored(motion), encoder(motion))


def test_weak_sparse_motion_shapes_the_context_from_the_first_step():
    # fan-in init of in_proj: a slow blob (standardised vectors of 0.1 on 9 of 256 blocks) must not drown
    # under the position embedding, or every clip starts with the same context (init_token_embedding)
    motion = torch.zeros(1, 2, 24, 16, 16)
    motion[:, 0, 1:, 6:9, 6:9] = 0.1  # moving right from frame 1
    blob = torch.zeros(16, 16, dtype=torch.bool)
    blob[6:9, 6:9] = True
    for seed in range(3):
        torch.manual_seed(seed)
        encoder = MotionConditionEncoder(tiny()).eval()
        with torch.no_grad():
            right, left, still = (encoder(m)[0, 1:, blob.flatten()] for m in (motion, -motion, torch.zeros_like(motion)))
        assert (right - left).norm() > 0.8 * still.norm(), seed  # std-0.02 in_proj: ~0.2
