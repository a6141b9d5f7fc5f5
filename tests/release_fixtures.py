"""Tiny models in the release's g_V layout with weights that depend only on parameter names and shapes.

The reference numbers in tests/data/release_reference.json were computed by the release's own code on
exactly these weights (procedure: tests/data/README.md); filling by sorted name from one seeded generator
makes the weights the same whatever order a library version creates its modules in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from videolavit.models.motion_condition_encoder import MotionConditionEncoderConfig
from videolavit.models.video_detokenizer import VideoDetokenizerConfig
from videolavit.models.video_unet import VideoUNetConfig
from videolavit.release.importer import import_release

REFERENCE_FILE = Path(__file__).parent / "data" / "release_reference.json"

# the release's 3-D U-Net at reduced width: three levels, so the 16x16 motion grid is resampled to 12x20,
# 6x10 and 3x5 (a 96x160 frame through an 8x VAE)
GV_UNET = dict(down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                                 "DownBlockSpatioTemporal"),
               up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                               "CrossAttnUpBlockSpatioTemporal"),
               block_out_channels=(32, 64, 64), layers_per_block=1, num_attention_heads=(2, 4, 4),
               cross_attention_dim=64, addition_time_embed_dim=32, motion_grid=(16, 16))
GV_ENCODER = dict(dim=32, depth=2, num_heads=2, out_dim=64)  # the release's grid: 16x16
GV_FRAMES, GV_FRAME_SIZE = 12, (96, 160)  # 12 frames: the release's 8-frame VAE chunks split it 8 + 4
GV_MOTION_GRID = (20, 36)  # the motion tokenizer's field (release)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                sample_size=96, scaling_factor=0.18215)


def gv_config(**overrides) -> VideoDetokenizerConfig:
    unet = VideoUNetConfig(**GV_UNET)
    encoder = MotionConditionEncoderConfig(num_frames=GV_FRAMES, **GV_ENCODER)
    return VideoDetokenizerConfig(unet=unet, motion_encoder=encoder, **overrides)


def named_random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Weights for ``shapes`` from one generator, in sorted-name order: norm scales near 1, biases and
    other vectors small, matrices and kernels ~ N(0, 1/fan_in) (no layer starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        noise = torch.randn(shape, generator=g)
        if len(shape) == 1 and ("norm" in name or name.endswith("norm.weight")) and name.endswith("weight"):
            state[name] = 1.0 + 0.1 * noise
        elif len(shape) <= 1:
            state[name] = 0.05 * noise
        else:
            fan_in = math.prod(shape[1:])
            state[name] = noise / math.sqrt(fan_in)
    return state


def fill_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter and float buffer of ``module`` with ``named_random_state``."""
    tensors = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
    state = named_random_state({k: tuple(v.shape) for k, v in tensors.items()}, seed)
    module.load_state_dict(state, strict=False)
    return module


def gv_inputs(seed: int = 7) -> dict[str, torch.Tensor]:
    """A keyframe in [-1, 1] [1, 3, 96, 160] and a motion field at the tokenizer's scale [1, 2, 12, 20, 36]."""
    g = torch.Generator().manual_seed(seed)
    keyframe = torch.rand(1, 3, *GV_FRAME_SIZE, generator=g) * 2 - 1
    motion = 10.0 * torch.randn(1, 2, GV_FRAMES, *GV_MOTION_GRID, generator=g)
    return {"keyframe": keyframe, "motion": motion}


def unet_call_inputs(seed: int = 3) -> tuple[torch.Tensor, ...]:
    """One U-Net call: sample [2, 12, 10, 12, 20], timestep, context [2, 12, 256, 64], time ids [2, 3]."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, GV_FRAMES, 10, 12, 20, generator=g)
    context = torch.randn(2, GV_FRAMES, 256, GV_UNET["cross_attention_dim"], generator=g)
    return sample, torch.tensor(0.4), context, torch.tensor([[6.0, 127.0, 0.02]] * 2)


def summary(x: torch.Tensor, points: int = 64) -> dict:
    """What the reference file keeps of a tensor: its shape, sum, L2 norm and ``points`` evenly strided values."""
    flat = x.detach().double().flatten()
    index = torch.linspace(0, flat.numel() - 1, points).round().long()
    return {"shape": list(x.shape), "sum": float(flat.sum()), "norm": float(flat.norm()),
            "index": index.tolist(), "values": flat[index].tolist()}


def max_relative_difference(x: torch.Tensor, reference: dict) -> float:
    """Largest |ours - release| at the stored points, and of the norm, relative to the reference's RMS."""
    flat = x.detach().double().flatten()
    assert list(x.shape) == reference["shape"]
    rms = reference["norm"] / math.sqrt(flat.numel())
    values = torch.tensor(reference["values"], dtype=torch.float64)
    point = (flat[torch.tensor(reference["index"])] - values).abs().max().item() / rms
    return max(point, abs(flat.norm().item() - reference["norm"]) / reference["norm"])


def load_reference() -> dict:
    return json.loads(REFERENCE_FILE.read_text())


# ---- the LLM ---------------------------------------------------------------------------------------

LLM_PROMPT = [450, 2118, 29871, 338, 4047, 2175]  # text ids of a prompt (Llama-2 ids; no BOS, as the release)
LLM_MAX_NEW_TOKENS = 80  # the release's max_new_tokens per block in the reference run (its default: 500)


def tiny_release_llm(seed: int = 21):
    """A 2-layer Llama over the release's full 49412-id vocabulary, weights by ``fill_``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=49412, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    fill_(model, seed)
    with torch.no_grad():  # lm_head rows larger than fill_'s 1/sqrt(32): confident, spread greedy choices
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[32001] *= 6.0  # [/IMG], [/MOV]: likely to win soon after the 20-code minimum
        model.lm_head.weight[48387] *= -20.0
    return model


# ---- a fabricated release directory ---------------------------------------------------------------

def _save_bin(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in state.items()}, path)


def _without(state: dict, suffixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(suffixes)}


def fabricate_release(root: Path) -> dict:
    """A release-layout directory with random weights at reduced sizes -> ``{"sizes": ..., "models": ...}``
    (the import's size overrides, and the source modules to compare the imports with)."""
    import dataclasses

    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_keyframe_tokenizer import tiny_decoder_config, tiny_tokenizer_config
    from videolavit.llm.text_tokenizer import build_tiny_tokenizer
    from videolavit.models.keyframe_detokenizer import SDXL_DDIM
    from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoder
    from videolavit.models.keyframe_tokenizer import KeyframeTokenizer
    from videolavit.models.keyframe_unet import KeyframeUNet, KeyframeUNetConfig
    from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig
    from videolavit.models.video_detokenizer import VideoDetokenizer

    ema = ("quantize.cluster_size", "quantize.num_updates")
    torch.manual_seed(0)
    motion_sizes = dict(dim=32, num_heads=2, blocks_per_stage=(1, 1, 1, 1))
    motion = MotionTokenizer(MotionTokenizerConfig.preset("release", **motion_sizes)).eval()
    _save_bin(_without(motion.state_dict(), ema), root / "motion_tokenizer.bin")

    keyframe_config = tiny_tokenizer_config(llm_dim=32)  # vit_proj into the LLMs' width (hidden_size 32)
    keyframe = KeyframeTokenizer(keyframe_config).eval()
    _save_bin(_without(keyframe.state_dict(), ema), root / "visual_tokenizer" / "tokenizer_encoder.bin")
    decoder = KeyframeFeatureDecoder(tiny_decoder_config()).eval()
    _save_bin(decoder.state_dict(), root / "visual_tokenizer" / "highres_tokenizer_decoder.bin")

    image = root / "image_detokenizer"
    unet_config = KeyframeUNetConfig(in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                     transformer_layers_per_block=(1, 1), num_heads=(2, 2), context_dim=32,
                                     pooled_dim=20, addition_time_embed_dim=8)
    image_unet = KeyframeUNet(unet_config).eval()
    _save_bin(image_unet.net.state_dict(), image / "unet" / "diffusion_pytorch_model.bin")
    (image / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                             **unet_config.diffusers_config()}))
    (image / "scheduler").mkdir(parents=True)
    (image / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_DDIM))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
                        latent_channels=4, sample_size=32)
    vae.save_pretrained(str(image / "vae"), safe_serialization=False)

    video = root / "video_detokenizer"
    g_v = VideoDetokenizer(gv_config()).eval()
    _save_bin(g_v.state_dict(), video / "unet" / "video_3d_unet.bin")
    (video / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNetSpatioTemporalConditionModel",
                                                             **g_v.unet.svd_config}))
    (video / "scheduler").mkdir(parents=True)
    (video / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
        "sigma_max": 700.0, "sigma_min": 0.002, "timestep_type": "continuous", "use_karras_sigmas": True}))
    AutoencoderKLTemporalDecoder(**TINY_VAE).save_pretrained(str(video / "vae"), safe_serialization=False)

    text_size = 300
    llms = {}
    for index, name in enumerate(("language_model", "language_model_sft")):
        directory = root / name
        build_tiny_tokenizer(directory, ["a red circle moves left", "a blue square moves up"], vocab_size=text_size)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, vocab_size=text_size + keyframe.config.num_codes + 1024 + 4,
                             max_position_embeddings=128, tie_word_embeddings=False)
        torch.manual_seed(10 + index)
        llm = LlamaForCausalLM(config).eval()
        config.save_pretrained(str(directory))
        state = llm.state_dict()
        if name == "language_model_sft":  # the release's understanding model holds its own tokenizers
            torch.manual_seed(30)
            understanding = KeyframeTokenizer(keyframe_config).eval()  # merger / vit_proj "trained with the LLM"
            understanding.encoder.load_state_dict(keyframe.encoder.state_dict())
            understanding.token_predictor.load_state_dict(keyframe.token_predictor.state_dict())
            state.update({f"model.visual_tokenizer.{k}": v for k, v in _without(understanding.state_dict(),
                                                                                 ema).items()})
            state.update({f"model.motion_tokenizer.{k}": v for k, v in _without(motion.state_dict(), ema).items()})
            made_understanding = understanding
        _save_bin(state, directory / "pytorch_model.bin")
        _save_bin({k: v for k, v in keyframe.state_dict().items() if k.startswith("vit_proj.")},
                  directory / "visual_weight.bin")
        llms[name] = llm
    sizes = {"motion_tokenizer": motion_sizes, "keyframe_tokenizer": dataclasses.asdict(keyframe_config),
             "keyframe_feature_decoder": dataclasses.asdict(tiny_decoder_config()),
             "keyframe_detokenizer": {"image_size": 32}, "motion_encoder": {"num_heads": GV_ENCODER["num_heads"],
                                                                            "num_frames": 24},
             "video_detokenizer": {"frame_size": [32, 32], "num_frames": 24}}
    return {"sizes": sizes, "motion": motion, "keyframe": keyframe, "decoder": decoder, "image_unet": image_unet,
            "video": g_v, "llms": llms, "understanding_keyframe": made_understanding}


# Module fixtures: a test module imports both (``from tests.release_fixtures import exports, release``) and gets
# its own fabricated release and import.
IMPORTED_PARTS = ["motion_tokenizer", "keyframe_tokenizer", "keyframe_detokenizer", "video_detokenizer", "pretrain",
                  "instruct"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, dict]:
    """(a fabricated release directory, what ``fabricate_release`` made)."""
    root = tmp_path_factory.mktemp("release")
    made = fabricate_release(root / "Video-LaVIT-v1")
    return root / "Video-LaVIT-v1", made


@pytest.fixture(scope="module")
def exports(release, tmp_path_factory) -> Path:
    """The exports directory ``release`` imports into, every part written."""
    directory, made = release
    out = tmp_path_factory.mktemp("exports")
    report = import_release(directory, out, made["sizes"])
    assert report.written == IMPORTED_PARTS
    return out



# ---- g_I ------------------------------------------------------------------------------------------

GI_IMAGE = (64, 128)  # height, width: non-square, as the release's 576x1024 keyframes (8x VAE -> 8x16 latents)
GI_IDS = [[3, 17, 40, 9, 22, -1]]
GI_STEPS, GI_GUIDANCE, GI_SEED = 6, 7.0, 9


def gi_model(sampler: str, scheduler: dict):
    """A tiny keyframe detokenizer (4 latent channels, 8x latent down-sampling) with ``fill_`` weights."""
    from videolavit.models.keyframe_detokenizer import (KeyframeDetokenizer, KeyframeDetokenizerConfig,
                                                        KeyframeDiffusionConfig)
    from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
    from videolavit.models.keyframe_unet import KeyframeUNetConfig

    unet = KeyframeUNetConfig(in_channels=4, out_channels=4, block_out_channels=(32, 32),
                              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                              transformer_layers_per_block=(1, 1), num_heads=(2, 2), context_dim=32, pooled_dim=20,
                              addition_time_embed_dim=8)
    decoder = KeyframeFeatureDecoderConfig(code_dim=8, width=32, depth=1, num_heads=2, mlp_dim=64, num_queries=16,
                                           max_codes=16, feature_dim=32, unet_context_dims=(12, 20),
                                           unet_pooled_dim=20)
    diffusion = KeyframeDiffusionConfig(scaling="eps_discrete", sampler=sampler, scheduler=scheduler,
                                        guidance_scale=GI_GUIDANCE, num_steps=GI_STEPS)
    config = KeyframeDetokenizerConfig(unet=unet, decoder=decoder, diffusion=diffusion, num_codes=64, code_dim=8,
                                       image_size=GI_IMAGE, latent_downsample=8)
    return fill_(KeyframeDetokenizer(config), seed=31).eval()


# ---- understanding (the SFT model's continuous keyframes) ------------------------------------------

UNDERSTANDING_QUESTION = "what moves left?"
UNDERSTANDING_SEED = 5  # seeds the keyframe selector's Gumbel draws (the release samples them)
UNDERSTANDING_MAX_NEW_TOKENS = 24


def understanding_inputs(clips: int = 2, seed: int = 13) -> dict[str, torch.Tensor]:
    """Two clips: keyframes in [0, 1] [2, 3, 28, 28] (the tiny ViT's input) and motion fields at the tokenizer's
    grid and scale [2, 2, 24, 20, 36]."""
    g = torch.Generator().manual_seed(seed)
    return {"keyframes": torch.rand(clips, 3, 28, 28, generator=g),
            "motions": 10.0 * torch.randn(clips, 2, 24, *GV_MOTION_GRID, generator=g)}
