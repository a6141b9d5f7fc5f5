"""Stage 1 keyframe tokenizer through the CLI users run: fit logs its scalars, checkpoints leave the frozen
ViT out (it is reloaded from its file on every start, resume included), the exports (trained parts only)
rejoin the backbone file to give the stage's ids, predict dumps variable-length ids; and at stage level
the ViT stays frozen while the feature reconstruction improves."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.ddp_fit import fit_two_processes, rank_state_callback
from tests.stage_configs import stage_conf, write_stage_config
from tests.tensorboard_scalars import scalars
from safetensors.torch import load_file, save_file

from videolavit.token_dump import read_token_dump, read_token_manifest
from datamodules.video_datamodule import VideoDataModule
from datamodules.views import KeyframeView
from stages.keyframe_tokenizer import (
    DECODER_EXPORT_NAME,
    NOT_TRAINED_HERE,
    KeyframeTokenizerStage,
    check_configs,
    images_from_batch,
)
from videolavit.cli import run_lightning_cli
from videolavit.config_files import read_config
from videolavit.models.eva_vit import EvaViT, EvaViTConfig
from videolavit.models.export import ExportError, load_export
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_tokenizer import KeyframeTokenizerConfig
from videolavit.models.keyframe_tokenizer_export import (
    EXPORT_NAME,
    RandomBackboneWarning,
    load_keyframe_tokenizer,
)
from videolavit.models.keyframe_tokenizer_loss import feature_reconstruction_loss

REPO = Path(__file__).resolve().parents[1]
IMAGE, PATCH = 28, 7  # 4 x 4 = 16 patches
NUM_PATCHES = (IMAGE // PATCH) ** 2
TOKENIZER = stage_conf("keyframe_tokenizer")["model"]["init_args"]["tokenizer"]  # tests/conf/keyframe_tokenizer.yaml
VIT = TOKENIZER["vit"]
DECODER = stage_conf("keyframe_tokenizer")["model"]["init_args"]["decoder"]
VAL_IMAGES = 16  # 8 videos x 2 clip keyframes
TRAIN_SCALARS = {"train/loss", "train/reconstruction_loss", "train/keep_ratio_loss", "train/commitment_loss",
                 "train/keep_ratio", "train/tokens_per_image", "train/codebook_usage", "train/perplexity"}
VAL_SCALARS = {"val/loss", "val/reconstruction_loss", "val/feature_cosine", "val/tokens_per_image",
               "val/keep_ratio", "val/keep_prob", "val/codebook_usage", "val/perplexity"}




def tiny_stage(backbone: Path | None, **kwargs) -> KeyframeTokenizerStage:
    return KeyframeTokenizerStage(tokenizer=KeyframeTokenizerConfig(**TOKENIZER),
                                  decoder=KeyframeFeatureDecoderConfig(**DECODER),
                                  backbone_weights=None if backbone is None else str(backbone), **kwargs)


def write_backbone(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(EvaViT(EvaViTConfig(**VIT)).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    """A 'pretrained' ViT: a random one written to a local safetensors file, as a real backbone would be."""
    return write_backbone(tmp_path_factory.mktemp("backbone") / "eva_vit_tiny.safetensors", seed=123)


def write_config(root: Path, shards: Path, backbone: Path, callbacks: list[dict] | None = None) -> Path:
    return write_stage_config("keyframe_tokenizer", root, shards,
                              {"model": {"init_args": {"backbone_weights": str(backbone)}}}, callbacks=callbacks)


def val_images(shards: Path) -> list[dict]:
    dm = VideoDataModule(val_shards=str(shards), view=KeyframeView(image_size=IMAGE), batch_size=8, num_workers=0)
    return list(dm.val_dataloader())


def stage_from_checkpoint(path: Path, backbone: Path) -> KeyframeTokenizerStage:
    """What Lightning does on resume: build the stage (backbone from its file), fill the frozen keys, load strictly."""
    stage = tiny_stage(backbone)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    stage.on_load_checkpoint(checkpoint)
    stage.load_state_dict(checkpoint["state_dict"], strict=True)
    return stage.eval()


def trimmed(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]


@pytest.fixture(scope="module")
def trained_run(prepared_shards, backbone_file, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One 6-step fit (validation after steps 3 and 6) -> (run dir, the ViT's state when fit ended)."""
    root = tmp_path_factory.mktemp("stage1_keyframes")
    cli = run_lightning_cli(["fit", "--config", str(write_config(root, prepared_shards, backbone_file))])
    return root, {k: v.detach().clone() for k, v in cli.model.model.encoder.state_dict().items()}


def test_fit_logs_checkpoints_without_the_vit_and_exports_that_rejoin_the_backbone(
        trained_run, backbone_file, prepared_shards):
    root, final_vit = trained_run
    logged = scalars(root / "logs")
    assert TRAIN_SCALARS | VAL_SCALARS <= set(logged), sorted(logged)
    assert sorted(step for step, _ in logged["val/feature_cosine"]) == [2, 5]  # after steps 3 and 6 (0-based)
    assert all(torch.isfinite(torch.tensor(v)) for tag in TRAIN_SCALARS for _, v in logged[tag])
    assert all(1 <= v <= NUM_PATCHES for _, v in logged["train/tokens_per_image"] + logged["val/tokens_per_image"])
    assert all(-1 <= v <= 1 for _, v in logged["val/feature_cosine"])
    for (_, ratio), (_, tokens) in zip(logged["train/keep_ratio"], logged["train/tokens_per_image"]):
        assert ratio == pytest.approx(tokens / NUM_PATCHES, rel=1e-5)

    # The frozen ViT was not trained: it is still exactly the file's.
    assert final_vit.keys() == load_file(str(backbone_file)).keys()
    for name, tensor in load_file(str(backbone_file)).items():
        assert torch.equal(final_vit[name], tensor), name

    last = root / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6
    state = checkpoint["state_dict"]
    assert not [k for k in state if k.startswith("model.encoder.")]
    assert any(k.startswith("model.causal_encoder.") for k in state) and any(k.startswith("decoder.") for k in state)
    assert "model.quantize.embedding.weight" in state and int(state["model.quantize.num_updates"]) == 6
    stage = stage_from_checkpoint(last, backbone_file)

    export = root / "export"
    for name in (EXPORT_NAME, DECODER_EXPORT_NAME):
        assert (export / f"{name}.safetensors").is_file() and (export / f"{name}.json").is_file()
    assert not [k for k in load_file(str(export / f"{EXPORT_NAME}.safetensors")) if k.startswith("encoder.")]

    tokenizer = load_keyframe_tokenizer(export)  # the backbone comes from the file recorded in the export
    decoder = load_export(export, DECODER_EXPORT_NAME).eval()
    for name, tensor in stage.model.state_dict().items():
        assert torch.equal(tokenizer.state_dict()[name], tensor), name
    for name, tensor in stage.decoder.state_dict().items():
        assert torch.equal(decoder.state_dict()[name], tensor), name
    images = torch.cat([images_from_batch(batch) for batch in val_images(prepared_shards)])
    with torch.inference_mode():
        expected, got = stage.model.encode(images), tokenizer.encode(images)
        assert torch.equal(got.ids, expected.ids) and torch.equal(got.lengths, expected.lengths)
        assert torch.equal(decoder(got.codes, got.mask), stage.decoder(expected.codes, expected.mask))
    assert got.ids.shape[0] == VAL_IMAGES and (got.ids[got.mask] >= 0).all() and (got.ids[~got.mask] == -1).all()


def test_exports_refuse_another_backbone(trained_run, tmp_path):
    export = trained_run[0] / "export"
    other = write_backbone(tmp_path / "other_vit.safetensors", seed=7)
    with pytest.raises(ExportError, match="different ViT backbone"):
        load_keyframe_tokenizer(export, backbone_weights=other)
    with pytest.raises(ExportError, match="not found"):
        load_keyframe_tokenizer(export, backbone_weights=tmp_path / "missing.safetensors")
    with pytest.raises(ExportError, match="missing"):  # the generic loader cannot supply the backbone
        load_export(export, EXPORT_NAME)

    stage = tiny_stage(other)
    with pytest.raises(ExportError, match="different ViT backbone"):
        stage.load_init_from(str(export))


def test_init_from_loads_both_trained_sub_models(trained_run, backbone_file):
    export = trained_run[0] / "export"
    stage = tiny_stage(backbone_file)
    stage.load_init_from(str(export))
    tokenizer = load_keyframe_tokenizer(export)
    for name, tensor in tokenizer.state_dict().items():
        assert torch.equal(stage.model.state_dict()[name], tensor), name
    decoder = load_export(export, DECODER_EXPORT_NAME)
    for name, tensor in decoder.state_dict().items():
        assert torch.equal(stage.decoder.state_dict()[name], tensor), name


def test_resume_reloads_the_backbone_and_continues(trained_run, backbone_file, prepared_shards, tmp_path):
    shutil.copytree(trained_run[0] / "checkpoints", tmp_path / "checkpoints")
    config = write_config(tmp_path, prepared_shards, backbone_file)
    cli = run_lightning_cli(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "9"])

    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    steps = [step for step, _ in scalars(tmp_path / "logs")["train/loss"]]
    assert min(steps) >= 6 and max(steps) == 8
    vit = cli.model.model.encoder.state_dict()
    for name, tensor in load_file(str(backbone_file)).items():
        assert torch.equal(vit[name], tensor), name
    assert int(load_keyframe_tokenizer(tmp_path / "export").quantize.num_updates) == 9


def test_predict_dumps_each_keyframe_s_variable_length_ids(trained_run, prepared_shards, tmp_path):
    root = trained_run[0]
    out = tmp_path / "tokens"
    run_lightning_cli(["predict", "--config", str(root / "config.yaml"), "--ckpt_path", "last",
                       "--trainer.callbacks+=callbacks.token_dump.TokenDumpWriter",
                       f"--trainer.callbacks.output_dir={out}", "--trainer.callbacks.name=keyframe"])
    manifest = read_token_manifest(out, "keyframe")
    assert manifest["num_codes"] == TOKENIZER["num_codes"]
    tokens = read_token_dump(out, "keyframe")
    assert len(tokens) == VAL_IMAGES

    tokenizer = load_keyframe_tokenizer(root / "export")
    lengths_seen = set()
    for batch in val_images(prepared_shards):
        with torch.inference_mode():
            ids, lengths = tokenizer.tokenize(images_from_batch(batch))
        for key, start, expected in zip(batch["key"], batch["clip_start"].tolist(), trimmed(ids, lengths)):
            assert [i for i in tokens[(key, start)] if i >= 0] == expected  # the dump may keep the -1 padding
            lengths_seen.add(len(expected))
    assert all(1 <= n <= NUM_PATCHES for n in lengths_seen)


def test_predict_step_returns_padded_ids_and_lengths(backbone_file):
    stage = tiny_stage(backbone_file).eval()
    images = torch.randint(0, 256, (5, 3, IMAGE, IMAGE), dtype=torch.uint8)
    out = stage.predict_step({"image": images, "key": list("abcde"), "clip_start": torch.arange(5)}, 0)
    assert out["key"] == list("abcde") and out["clip_start"].tolist() == list(range(5))
    ids, lengths = out["ids"], out["lengths"]
    assert ids.shape == (5, int(lengths.max())) and ids.dtype == torch.long
    for row, n in zip(ids, lengths.tolist()):
        assert (row[:n] >= 0).all() and (row[n:] == -1).all()
    expected, _ = stage.model.tokenize(images.float() / 255)
    assert torch.equal(ids, expected)


def test_training_improves_feature_reconstruction_and_leaves_the_vit_alone(backbone_file):
    """A direct fit on 8 fixed images: the reconstruction loss falls, the ViT and the heads trained by
    later stages do not move, and the optimiser never sees them."""
    import lightning.pytorch as pl

    pl.seed_everything(0)
    stage = tiny_stage(backbone_file)
    images = torch.rand(8, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    batch = {"image": (images * 255).to(torch.uint8), "key": [f"k{i}" for i in range(8)],
             "clip_start": torch.zeros(8, dtype=torch.long)}
    x = images_from_batch(batch)

    def reconstruction() -> float:
        stage.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            encoding, rebuilt, _ = stage(x)
            return float(feature_reconstruction_loss(rebuilt, encoding.vit_features))

    before = reconstruction()
    untouched = {k: v.clone() for k, v in stage.state_dict().items()
                 if k.startswith(("model.encoder.",) + NOT_TRAINED_HERE)}
    trainer = pl.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    stage.optimizer_config.lr, stage.optimizer_config.warmup_steps = 2e-3, 5
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader([batch] * 40, batch_size=None))
    after = reconstruction()
    assert after < 0.75 * before, (before, after)  # ~1.0 -> ~0.59 (cosine 0 -> 0.41) on this random ViT

    for name, tensor in untouched.items():
        assert torch.equal(stage.state_dict()[name], tensor), name
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    named = dict(stage.named_parameters())
    kept_out = ("model.encoder.",) + NOT_TRAINED_HERE
    assert not [n for n, p in named.items() if id(p) in optimised and n.startswith(kept_out)]
    assert all(p.grad is None for n, p in named.items() if n.startswith("model.encoder."))
    assert any(id(named[n]) in optimised for n in named if n.startswith("model.token_predictor."))


def test_random_backbone_warns_and_is_reproduced_from_the_export(tmp_path):
    torch.manual_seed(1)
    with pytest.warns(RandomBackboneWarning, match="RANDOMLY"):
        stage = tiny_stage(None, backbone_seed=5, export_dir=str(tmp_path))
    torch.manual_seed(2)  # the global seed does not change the backbone; backbone_seed does
    with pytest.warns(RandomBackboneWarning):
        same = tiny_stage(None, backbone_seed=5)
        other = tiny_stage(None, backbone_seed=6)
    vit = stage.model.encoder.state_dict()
    assert all(torch.equal(vit[k], v) for k, v in same.model.encoder.state_dict().items())
    assert not torch.equal(vit["patch_embed.proj.weight"], other.model.encoder.state_dict()["patch_embed.proj.weight"])

    stage.export(tmp_path)
    with pytest.warns(RandomBackboneWarning, match="RANDOM ViT"):
        loaded = load_keyframe_tokenizer(tmp_path)
    images = torch.rand(4, 3, IMAGE, IMAGE)
    with torch.inference_mode():
        assert torch.equal(loaded.tokenize(images)[0], stage.model.eval().tokenize(images)[0])


def test_mismatched_decoder_is_rejected():
    tokenizer = KeyframeTokenizerConfig(**TOKENIZER)
    with pytest.raises(ValueError, match="feature_dim 48 != ViT width 32"):
        check_configs(tokenizer, KeyframeFeatureDecoderConfig(**{**DECODER, "feature_dim": 48, "num_heads": 2}))
    with pytest.raises(ValueError, match="num_queries"):
        check_configs(tokenizer, KeyframeFeatureDecoderConfig(**{**DECODER, "num_queries": 8}))


@pytest.mark.parametrize("config", ["stage1_keyframe_tokenizer.yaml", "tiny/keyframe_tokenizer.yaml"])
def test_experiment_configs_fit_together(config):
    """Sub-model sizes fit each other and the data view (tests/test_experiment_configs.py parses every config)."""
    full = read_config(REPO / "experiments" / config)
    args = full["model"]["init_args"]
    tokenizer = KeyframeTokenizerConfig(**args["tokenizer"])
    check_configs(tokenizer, KeyframeFeatureDecoderConfig(**args["decoder"]))
    assert full["data"]["init_args"]["view"]["init_args"]["image_size"] == tokenizer.vit.image_size
    trainer = full["trainer"]
    devices = trainer.get("num_nodes", 1) * trainer["devices"]
    assert full["data"]["init_args"]["batch_size"] % devices == 0


@pytest.mark.slow
def test_two_process_ddp_trains_without_unused_parameters_and_keeps_ranks_in_sync(
        prepared_shards, backbone_file, tmp_path):
    config = write_config(tmp_path, prepared_shards, backbone_file, callbacks=[rank_state_callback(tmp_path)])
    ranks = fit_two_processes(config, tmp_path)
    assert int(ranks[0]["model.quantize.num_updates"]) == 6  # one EMA step per optimiser step, on both ranks
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    assert not [k for k in checkpoint["state_dict"] if k.startswith("model.encoder.")]
    tokenizer = load_keyframe_tokenizer(tmp_path / "export")
    for name, tensor in tokenizer.state_dict().items():
        assert torch.equal(tensor, ranks[0][f"model.{name}"]), name
    assert VAL_SCALARS <= set(scalars(tmp_path / "logs"))
