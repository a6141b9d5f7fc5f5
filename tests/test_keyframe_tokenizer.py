"""LaVIT keyframe tokenizer, its feature decoder and its training objective (tiny sizes; full sizes on meta)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.release_layout import LAYOUT_FILE
from videolavit.models.eva_vit import EvaViTConfig
from videolavit.models.export import load_export, save_export
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoder, KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_tokenizer import (
    KeyframeTokenizer,
    KeyframeTokenizerConfig,
    TokenMerger,
)
from videolavit.models.keyframe_tokenizer_loss import (
    KeyframeTokenizerLossConfig,
    feature_reconstruction_loss,
    keep_ratio_loss,
    keyframe_tokenizer_loss,
)

GRID = 4  # 4 x 4 = 16 patches
NUM_PATCHES = GRID * GRID
IMAGE = 28
WIDTH = 32
# The codebook's EMA statistics: ours, not the release's (vector_quantizer fills them in when absent).
EMA_STATS = {"quantize.cluster_size", "quantize.num_updates"}


def tiny_tokenizer_config(**overrides) -> KeyframeTokenizerConfig:
    vit = EvaViTConfig(image_size=IMAGE, patch_size=IMAGE // GRID, width=WIDTH, depth=2, num_heads=2,
                       mlp_dim=64, embed_dim=16)
    fields = dict(vit=vit, merger_depth=2, merger_heads=2, merger_mlp_dim=64, num_codes=64, code_dim=8, llm_dim=24)
    fields.update(overrides)
    return KeyframeTokenizerConfig(**fields)


def tiny_decoder_config() -> KeyframeFeatureDecoderConfig:
    return KeyframeFeatureDecoderConfig(code_dim=8, width=WIDTH, depth=2, num_heads=2, mlp_dim=64,
                                        num_queries=NUM_PATCHES, max_codes=NUM_PATCHES, feature_dim=WIDTH,
                                        unet_context_dims=(12, 20), unet_pooled_dim=20)


@pytest.fixture
def tokenizer() -> KeyframeTokenizer:
    torch.manual_seed(0)
    return KeyframeTokenizer(tiny_tokenizer_config())


@pytest.fixture
def decoder() -> KeyframeFeatureDecoder:
    torch.manual_seed(1)
    return KeyframeFeatureDecoder(tiny_decoder_config())


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# ----- release layout --------------------------------------------------------------------------------

def _layout_file() -> Path:
    return LAYOUT_FILE


BLOCK = re.compile(r"^(.*?blocks)\.(\d+)\.(.*)$")


def release_section(section: str) -> tuple[dict[str, tuple[int, ...]], dict[str, int], int]:
    """(templates name -> shape with block index as '{}', block count per prefix, expected tensor count)."""
    lines = _layout_file().read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"[{section}]"))
    templates: dict[str, tuple[int, ...]] = {}
    counts: dict[str, int] = {}
    total = None
    for line in lines[start + 1:]:
        if line.startswith("["):
            break
        if m := re.match(r"^tensors=(\d+)", line):
            total = int(m.group(1))
        elif m := re.match(r"^# (\S+)\.N: (\d+) blocks", line):
            counts[m.group(1)] = int(m.group(2))
        elif ": " in line and not line.startswith("#"):
            name, shape = line.split(": ")
            dims = tuple(int(d) for d in shape.split("x"))
            if b := BLOCK.match(name):
                name = f"{b.group(1)}.{{}}.{b.group(3)}"
                counts[b.group(1)] = max(counts.get(b.group(1), 0), int(b.group(2)) + 1)
            assert templates.setdefault(name, dims) == dims, name
    return templates, counts, total


def expand(templates: dict[str, tuple[int, ...]], counts: dict[str, int]) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, shape in templates.items():
        if "{}" in name:
            prefix = name.split(".{}.")[0]
            out.update({name.format(i): shape for i in range(counts[prefix])})
        else:
            out[name] = shape
    return out


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "section, build",
    [
        ("visual_tokenizer", lambda: KeyframeTokenizer(KeyframeTokenizerConfig())),
        ("keyframe_feature_decoder", lambda: KeyframeFeatureDecoder(KeyframeFeatureDecoderConfig())),
    ],
)
def test_full_size_models_match_release_layout(section, build):
    templates, counts, total = release_section(section)
    expected = expand(templates, counts)
    assert len(expected) == total  # the "N blocks" expansion reproduces the file's tensor count
    with torch.device("meta"):
        model = build()
    got = {k: v for k, v in shapes(model).items() if k not in EMA_STATS}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}


@pytest.mark.parametrize(
    "section, build, counts",
    [
        ("visual_tokenizer", lambda: KeyframeTokenizer(tiny_tokenizer_config()),
         {"encoder.blocks": 2, "causal_encoder.blocks": 2}),
        ("keyframe_feature_decoder", lambda: KeyframeFeatureDecoder(tiny_decoder_config()), {"blocks": 2}),
    ],
)
def test_release_layout_state_dict_loads_strictly(section, build, counts):
    templates, _, _ = release_section(section)
    torch.manual_seed(0)
    model = build()
    names = set(expand(templates, counts))
    assert set(model.state_dict()) - EMA_STATS == names  # tiny model: the release's names with fewer blocks
    random_state = {k: torch.randn(v.shape) for k, v in model.state_dict().items() if k in names}
    fresh = build()
    fresh.load_state_dict(random_state, strict=True)
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], random_state[k]) for k in names)
    random_state["quantize.unknown"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(random_state, strict=True)


# ----- tokenizer behaviour ---------------------------------------------------------------------------

def test_eval_ids_are_left_packed_and_padded_with_minus_one(tokenizer):
    tokenizer.eval()
    x = images(8)
    enc = tokenizer.encode(x)
    b, length = enc.ids.shape
    expected_lengths = (enc.keep_log_probs[..., 0].exp() >= 0.5).sum(dim=1).clamp(min=1)
    assert torch.equal(enc.lengths, expected_lengths)
    assert len(set(enc.lengths.tolist())) > 1  # variable length within the batch
    assert int(enc.lengths.max()) == length <= NUM_PATCHES
    for i in range(b):
        n = int(enc.lengths[i])
        assert (enc.ids[i, :n] >= 0).all() and (enc.ids[i, :n] < 64).all()
        assert (enc.ids[i, n:] == -1).all() and (enc.positions[i, n:] == -1).all()
        assert enc.mask[i, :n].all() and not enc.mask[i, n:].any()
        assert (enc.codes[i, n:] == 0).all()
        kept_patches = torch.nonzero(enc.keep[i]).flatten()
        assert torch.equal(enc.positions[i, :n], kept_patches)  # raster order of the kept patches
    # deterministic outside training
    assert torch.equal(tokenizer.encode(x).ids, enc.ids)
    ids, lengths = tokenizer.tokenize(x)
    assert torch.equal(ids, enc.ids) and torch.equal(lengths, enc.lengths)


def test_codes_are_nearest_l2_normalised_codebook_entries(tokenizer):
    tokenizer.eval()
    enc = tokenizer.encode(images(3))
    latents = enc.latents[enc.mask]
    assert torch.allclose(latents.norm(dim=-1), torch.ones(len(latents)), atol=1e-5)
    codebook = tokenizer.quantize.embedding.weight
    assert torch.equal(torch.cdist(latents, codebook).argmin(dim=-1), enc.ids[enc.mask])
    codes, mask = tokenizer.codes_from_ids(enc.ids)
    assert torch.equal(mask, enc.mask) and torch.allclose(codes, enc.codes)
    with pytest.raises(ValueError, match="code ids must be -1"):
        tokenizer.codes_from_ids(torch.tensor([[64]]))
    with pytest.raises(ValueError, match="code ids must be -1"):
        tokenizer.codes_from_ids(torch.tensor([[-2]]))
    # commitment: mean squared distance of the real tokens' latents to their codes
    expected = (latents - enc.codes[enc.mask]).pow(2).mean()
    assert enc.commitment_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_only_kept_tokens_update_the_codebook(tokenizer):
    tokenizer.train()
    before = tokenizer.quantize.embedding.weight.clone()
    enc = tokenizer.encode(images(4))
    decay = tokenizer.config.ema_decay
    assert int(tokenizer.quantize.num_updates) == 1
    # one EMA step from zero counts: cluster sizes sum to (1 - decay) x number of real tokens
    assert tokenizer.quantize.cluster_size.sum().item() == pytest.approx((1 - decay) * int(enc.lengths.sum()))
    moved = (tokenizer.quantize.embedding.weight != before).any(dim=1)
    assert set(torch.nonzero(moved).flatten().tolist()) == set(enc.ids[enc.mask].tolist())


def test_selector_decisions_control_lengths(tokenizer):
    tokenizer.eval()
    last = tokenizer.token_predictor.out_conv[4]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([5.0, -5.0]))  # keep every patch
    assert tokenizer.encode(images(2)).lengths.tolist() == [NUM_PATCHES] * 2
    with torch.no_grad():
        last.bias.copy_(torch.tensor([-5.0, 5.0]))  # drop every patch -> the most confident one is kept
    enc = tokenizer.encode(images(2))
    assert enc.lengths.tolist() == [1, 1] and enc.ids.shape == (2, 1)

    # Gumbel sampling (training) follows the same convention: index 0 of the log-probs means "keep".
    tokenizer.train()
    with torch.no_grad():
        last.bias.copy_(torch.tensor([10.0, -10.0]))
    assert tokenizer.encode(images(2)).lengths.tolist() == [NUM_PATCHES] * 2
    with torch.no_grad():
        last.bias.copy_(torch.tensor([-10.0, 10.0]))
    assert tokenizer.encode(images(2)).lengths.tolist() == [1, 1]


def test_wrong_image_size_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="28x28"):
        tokenizer.encode(torch.rand(1, 3, 32, 32))


def test_vit_is_frozen_and_gradients_reach_selector_only_through_gumbel(tokenizer, decoder):
    tokenizer.train()
    assert not tokenizer.encoder.training and tokenizer.token_predictor.training
    assert all(not p.requires_grad for p in tokenizer.encoder.parameters())
    trainable = {n for n, p in tokenizer.named_parameters() if p.requires_grad}
    assert not any(n.startswith("encoder.") for n in trainable)
    assert any(n.startswith("token_predictor.") for n in trainable)

    torch.manual_seed(3)
    enc = tokenizer.encode(images(4))
    feature_reconstruction_loss(decoder(enc.codes, enc.mask), enc.vit_features).backward()
    assert all(p.grad is None for p in tokenizer.encoder.parameters())
    selector_grad = sum(p.grad.abs().sum() for p in tokenizer.token_predictor.parameters())
    assert torch.isfinite(selector_grad) and selector_grad > 0

    # With the deterministic threshold (eval) the selection is not differentiable: no gradient reaches it.
    tokenizer.zero_grad(set_to_none=True)
    tokenizer.eval()
    enc = tokenizer.encode(images(4))
    feature_reconstruction_loss(decoder(enc.codes, enc.mask), enc.vit_features).backward()
    assert all(p.grad is None or not p.grad.any() for p in tokenizer.token_predictor.parameters())
    assert tokenizer.encode_task_layer[0].weight.grad.abs().sum() > 0


def test_merger_is_causal_over_kept_tokens_and_reads_dropped_ones():
    torch.manual_seed(0)
    merger = TokenMerger(WIDTH, depth=2, num_heads=2, mlp_dim=64, norm_eps=1e-5).eval()
    features = torch.randn(1, 8, WIDTH)
    keep = torch.tensor([[1.0, 0, 1, 1, 0, 1, 0, 1]])
    base = merger(features, keep)

    later_kept = features.clone()
    later_kept[0, 5] += 3.0 * torch.randn(WIDTH)  # kept patch 5 must not influence kept patches 0, 2, 3
    out = merger(later_kept, keep)
    assert torch.allclose(out[0, [0, 2, 3]], base[0, [0, 2, 3]], atol=1e-4)
    assert not torch.allclose(out[0, 5], base[0, 5], atol=1e-3)

    dropped = features.clone()
    dropped[0, 6] += 3.0 * torch.randn(WIDTH)  # a dropped patch is merged into every kept token, earlier ones included
    out = merger(dropped, keep)
    assert not torch.allclose(out[0, 0], base[0, 0], atol=1e-3)


def test_llm_features_follow_the_kept_tokens(tokenizer):
    tokenizer.eval()
    x = images(3)
    feats, mask = tokenizer.llm_features(x)
    enc = tokenizer.encode(x)
    assert torch.equal(mask, enc.mask) and feats.shape == (*enc.mask.shape, 24)
    assert (feats[~mask] == 0).all()


# ----- decoder -----------------------------------------------------------------------------------------

def test_decoder_reconstructs_all_patches_and_ignores_padding(tokenizer, decoder):
    tokenizer.eval()
    decoder.eval()
    enc = tokenizer.encode(images(4))
    feats = decoder(enc.codes, enc.mask)
    assert feats.shape == (4, NUM_PATCHES, WIDTH)

    noisy_padding = enc.codes + torch.randn_like(enc.codes) * (~enc.mask)[..., None]
    assert torch.allclose(decoder(noisy_padding, enc.mask), feats, atol=1e-5)
    row = int(enc.lengths.argmin())
    other = enc.codes.clone()
    other[row, 0] = -other[row, 0]
    assert not torch.allclose(decoder(other, enc.mask)[row], feats[row], atol=1e-4)

    context, pooled = decoder.unet_condition(feats)
    assert context.shape == (4, NUM_PATCHES, 32) and pooled.shape == (4, 20)
    assert torch.allclose(context[..., :12], decoder.unet_proj_1(feats))
    with pytest.raises(ValueError, match="max_codes"):
        decoder(torch.zeros(1, NUM_PATCHES + 1, 8), torch.ones(1, NUM_PATCHES + 1, dtype=torch.bool))


def test_attention_pool_matches_torch_multi_head_attention(decoder):
    pool = decoder.unet_attnpool
    x = torch.randn(2, NUM_PATCHES, WIDTH)
    seq = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding
    mha = torch.nn.MultiheadAttention(WIDTH, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]))
        mha.out_proj.weight.copy_(torch.eye(WIDTH))  # expose the attention output itself
        mha.out_proj.bias.zero_()
    attended, _ = mha(seq, seq, seq, need_weights=False)
    assert torch.allclose(pool(x), pool.c_proj(attended[:, 0]), atol=1e-5)


# ----- export and training ---------------------------------------------------------------------------

def test_export_round_trip_gives_identical_ids(tokenizer, decoder, tmp_path):
    tokenizer.eval()
    x = images(4)
    save_export(tokenizer, tmp_path, "keyframe_tokenizer", tokenizer.config)
    save_export(decoder, tmp_path, "keyframe_feature_decoder", decoder.config)
    loaded = load_export(tmp_path, "keyframe_tokenizer").eval()
    loaded_decoder = load_export(tmp_path, "keyframe_feature_decoder").eval()
    assert isinstance(loaded, KeyframeTokenizer) and loaded.config == tokenizer.config
    a, b = tokenizer.encode(x), loaded.encode(x)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.lengths, b.lengths)
    assert torch.allclose(decoder.eval()(a.codes, a.mask), loaded_decoder(b.codes, b.mask))


def test_training_steps_reduce_feature_reconstruction_loss(tokenizer, decoder):
    x = images(4, seed=5)
    params = [p for p in tokenizer.parameters() if p.requires_grad] + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=2e-3)
    loss_config = KeyframeTokenizerLossConfig()

    def eval_loss() -> float:
        tokenizer.eval()
        with torch.no_grad():
            enc = tokenizer.encode(x)
            return float(feature_reconstruction_loss(decoder(enc.codes, enc.mask), enc.vit_features))

    before = eval_loss()
    torch.manual_seed(0)
    tokenizer.train()
    for _ in range(15):
        enc = tokenizer.encode(x)
        terms = keyframe_tokenizer_loss(decoder(enc.codes, enc.mask), enc, loss_config)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.75 * before, (before, after)


# ----- loss functions ----------------------------------------------------------------------------------

def test_feature_reconstruction_loss_values():
    t = torch.randn(2, 5, 7)
    assert feature_reconstruction_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_reconstruction_loss(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert feature_reconstruction_loss(-t, t).item() == pytest.approx(2.0, abs=1e-6)
    e0, e1 = torch.eye(2)[0].expand(4, 2), torch.eye(2)[1].expand(4, 2)
    assert feature_reconstruction_loss(e0, e1).item() == pytest.approx(1.0)
    mixed = torch.stack([e0[0], -e1[0]])
    assert feature_reconstruction_loss(mixed, torch.stack([e0[0], e1[0]])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        feature_reconstruction_loss(t, t[:, :4])


def test_keep_ratio_loss_and_total_objective(tokenizer, decoder):
    keep = torch.tensor([[1.0, 1, 1, 1], [1.0, 0, 0, 0]])  # ratios 1 and 1/4
    assert keep_ratio_loss(keep, 0.5).item() == pytest.approx((0.5**2 + 0.25**2) / 2)
    assert keep_ratio_loss(keep[:1], 1.0).item() == 0.0

    tokenizer.eval()
    enc = tokenizer.encode(images(2))
    rec = decoder(enc.codes, enc.mask)
    terms = keyframe_tokenizer_loss(rec, enc, KeyframeTokenizerLossConfig(target_keep_ratio=0.25,
                                                                         keep_ratio_weight=3.0))
    expected = (feature_reconstruction_loss(rec, enc.vit_features) + 3.0 * keep_ratio_loss(enc.keep, 0.25)
                + enc.commitment_loss)
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
