"""EVA-CLIP ViT backbone: the attention math, pixel normalisation and loading weights from local files."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from videolavit.models.eva_vit import BackboneWeightsError, EvaViT, EvaViTConfig
from videolavit.models.keyframe_tokenizer import CLIP_MEAN, CLIP_STD, KeyframeTokenizer, KeyframeTokenizerConfig

CONFIG = EvaViTConfig(image_size=28, patch_size=7, width=32, depth=2, num_heads=2, mlp_dim=48, embed_dim=16)


@pytest.fixture
def vit() -> EvaViT:
    torch.manual_seed(0)
    model = EvaViT(CONFIG).eval()
    with torch.no_grad():  # make the q/v biases matter
        for block in model.blocks:
            block.attn.q_bias.normal_()
            block.attn.v_bias.normal_()
    return model


def reference_features(model: EvaViT, pixels: torch.Tensor) -> torch.Tensor:
    """Plain re-statement of EVA-CLIP: cls + patches + pos, pre-norm blocks, k without bias, no final norm."""
    p = CONFIG.patch_size
    b = pixels.shape[0]
    patches = pixels.unfold(2, p, p).unfold(3, p, p)  # [B, 3, g, g, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
    x = patches @ model.patch_embed.proj.weight.reshape(CONFIG.width, -1).T + model.patch_embed.proj.bias
    x = torch.cat([model.cls_token.expand(b, -1, -1), x], dim=1) + model.pos_embed
    heads, dh = CONFIG.num_heads, CONFIG.width // CONFIG.num_heads
    for blk in model.blocks:
        h = torch.nn.functional.layer_norm(x, (CONFIG.width,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        wq, wk, wv = blk.attn.qkv.weight.chunk(3)
        q = (h @ wq.T + blk.attn.q_bias).reshape(b, -1, heads, dh).transpose(1, 2)
        k = (h @ wk.T).reshape(b, -1, heads, dh).transpose(1, 2)
        v = (h @ wv.T + blk.attn.v_bias).reshape(b, -1, heads, dh).transpose(1, 2)
        attn = ((q @ k.transpose(-1, -2)) / dh**0.5).softmax(-1)
        x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(b, -1, CONFIG.width))
        h = torch.nn.functional.layer_norm(x, (CONFIG.width,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        x = x + blk.mlp.fc2(torch.nn.functional.gelu(blk.mlp.fc1(h)))
    return x


def test_forward_features_match_reference(vit):
    pixels = torch.randn(2, 3, 28, 28)
    out = vit.forward_features(pixels)
    assert out.shape == (2, 1 + 16, 32)
    assert torch.allclose(out, reference_features(vit, pixels), atol=1e-5)
    embedding = vit(pixels)
    assert embedding.shape == (2, 16)
    assert torch.allclose(embedding, vit.head(vit.norm(out)[:, 0]))


def test_tokenizer_normalises_unit_range_images_with_clip_statistics():
    torch.manual_seed(0)
    tok = KeyframeTokenizer(KeyframeTokenizerConfig(vit=CONFIG, merger_depth=1, merger_heads=2, merger_mlp_dim=48,
                                                    num_codes=8, code_dim=4, llm_dim=8))
    images = torch.rand(2, 3, 28, 28)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = tok.encoder.forward_features((images - mean) / std)[:, 1:]
    assert torch.allclose(tok.vit_patch_features(images), expected, atol=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_load_backbone_weights_round_trip(vit, tmp_path, suffix):
    path = tmp_path / f"eva{suffix}"
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(1)
    fresh = EvaViT(CONFIG).eval()
    pixels = torch.randn(1, 3, 28, 28)
    assert not torch.allclose(fresh.forward_features(pixels), vit.forward_features(pixels))
    fresh.load_backbone_weights(path)
    assert torch.equal(fresh.forward_features(pixels), vit.forward_features(pixels))


def test_load_backbone_weights_with_prefix_from_a_tokenizer_checkpoint(vit, tmp_path):
    path = tmp_path / "tokenizer.safetensors"
    state = {f"encoder.{k}": v for k, v in vit.state_dict().items()}
    state["token_predictor.in_conv.0.weight"] = torch.ones(32)
    save_file(state, str(path))
    fresh = EvaViT(CONFIG)
    fresh.load_backbone_weights(path, prefix="encoder.")
    assert torch.equal(fresh.pos_embed, vit.pos_embed)
    with pytest.raises(BackboneWeightsError, match="unexpected"):
        fresh.load_backbone_weights(path)  # without the prefix nothing matches


def test_load_backbone_weights_errors(vit, tmp_path):
    with pytest.raises(BackboneWeightsError, match="not found: .*missing.bin"):
        vit.load_backbone_weights(tmp_path / "missing.bin")

    state = dict(vit.state_dict())
    del state["blocks.1.attn.q_bias"]
    state["blocks.1.attn.k_bias"] = torch.zeros(32)
    path = tmp_path / "renamed.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneWeightsError, match=r"1 missing \['blocks.1.attn.q_bias'\].*k_bias"):
        vit.load_backbone_weights(path)

    state = dict(vit.state_dict())
    state["pos_embed"] = torch.zeros(1, 50, 32)
    path = tmp_path / "wrong_size.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneWeightsError, match=r"pos_embed: file \(1, 50, 32\)"):
        vit.load_backbone_weights(path)

    path = tmp_path / "pickled.bin"
    path.write_bytes(pickle.dumps({"pos_embed": object()}, protocol=2))
    with pytest.raises(BackboneWeightsError, match="weights-only"):
        vit.load_backbone_weights(path)
