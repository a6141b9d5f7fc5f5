"""Every training stage fits with ``init_from`` an imported release directory (a fabricated release-layout
directory, ``tests.release_fixtures``): its weights start from the import (a tiny learning rate keeps them within
a hair of it after one step, far from a fresh init) and a step trains."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch

from tests.release_fixtures import exports, release  # noqa: F401  (module fixtures, rebuilt for this module)

LR = 1e-7  # one step moves every weight by about lr (Adam): the imported values stay visible


def fit_one_step(stage, batch) -> None:
    stage.optimizer_config.lr, stage.optimizer_config.warmup_steps = LR, 0
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1


def assert_started_from(trained: dict, source: dict, names) -> None:
    """Every named tensor within the step's reach of the imported one, and at least one moved."""
    moved = False
    for name in names:
        difference = (trained[name].float() - source[name].float()).abs().max().item()
        assert difference < 1e-4, (name, difference)
        moved |= difference > 0
    assert moved


def test_motion_tokenizer_stage(release, exports):
    from stages.motion_tokenizer import MotionTokenizerStage
    from videolavit.models.motion_tokenizer import MotionTokenizerConfig

    made = release[1]
    stage = MotionTokenizerStage(MotionTokenizerConfig.preset("release", **made["sizes"]["motion_tokenizer"]),
                                 init_from=str(exports))
    fit_one_step(stage, {"motion": 10 * torch.randn(2, 2, 24, 20, 36)})
    source = made["motion"].state_dict()
    trained = stage.model.state_dict()
    assert_started_from(trained, source, [k for k in source if "encoder" in k and source[k].is_floating_point()])


def test_keyframe_tokenizer_stage(release, exports):
    from stages.keyframe_tokenizer import KeyframeTokenizerStage
    from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
    from videolavit.models.keyframe_tokenizer import KeyframeTokenizerConfig

    made = release[1]
    sizes = made["sizes"]
    stage = KeyframeTokenizerStage(KeyframeTokenizerConfig(**sizes["keyframe_tokenizer"]),
                                   KeyframeFeatureDecoderConfig(**sizes["keyframe_feature_decoder"]),
                                   backbone_weights=str(exports / "keyframe_tokenizer_backbone.safetensors"),
                                   init_from=str(exports))
    images = (torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    fit_one_step(stage, {"image": images, "key": ["a", "b", "c", "d"], "clip_start": torch.zeros(4, dtype=torch.long)})
    source = made["keyframe"].state_dict()
    trained = stage.model.state_dict()
    assert_started_from(trained, source, [k for k in source if k.startswith(("token_predictor.", "causal_encoder."))])
    decoder = made["decoder"].state_dict()
    assert_started_from(stage.decoder.state_dict(), decoder, [k for k in decoder if decoder[k].is_floating_point()])


def test_keyframe_detokenizer_stage(release, exports):
    from stages.keyframe_detokenizer import KeyframeDetokenizerStage
    from videolavit.models.keyframe_detokenizer import load_keyframe_detokenizer
    from videolavit.models.latent_space import VaeLatentSpace

    made = release[1]
    config = load_keyframe_detokenizer(exports / "keyframe_detokenizer").config
    stage = KeyframeDetokenizerStage(init_from=str(exports), unet=config.unet, diffusion=config.diffusion,
                                     latent_space=VaeLatentSpace(str(exports / "keyframe_detokenizer" / "vae"),
                                                                 subfolder=None),
                                     image_size=32, unet_weights=str(exports / "keyframe_detokenizer" / "unet"),
                                     val_samples=0)
    images = (torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    fit_one_step(stage, {"image": images, "caption": ["a", "b"], "key": ["a", "b"],
                         "clip_start": torch.zeros(2, dtype=torch.long)})
    source = made["image_unet"].net.state_dict()
    trained = stage.detokenizer.unet.net.state_dict()
    assert_started_from(trained, source, [k for k in source if source[k].is_floating_point()])


def test_video_detokenizer_stage(release, exports):
    from stages.video_detokenizer import VideoDetokenizerStage
    from videolavit.models.video_detokenizer import load_video_detokenizer

    made = release[1]
    model, latent_space = load_video_detokenizer(exports / "video_detokenizer")
    stage = VideoDetokenizerStage(detokenizer=model.config, latent_space=latent_space, init_from=str(exports),
                                  weights_from=str(exports / "video_detokenizer"), direction_clips=0)
    g = torch.Generator().manual_seed(2)
    frames = torch.randint(0, 256, (1, 24, 3, 32, 32), dtype=torch.uint8, generator=g)
    fit_one_step(stage, {"frames": frames, "keyframe": frames[:, 0], "motion": 10 * torch.randn(1, 2, 24, 20, 36,
                                                                                                 generator=g),
                         "caption": ["a"], "key": ["a"]})
    source = made["video"].state_dict()
    trained = stage.model.state_dict()
    assert_started_from(trained, source, [k for k in source if k.startswith("unet.") and source[k].is_floating_point()])


def llm_batch(vocabulary, length: int = 16) -> dict:
    ids = torch.randint(3, vocabulary.text_size, (2, length), generator=torch.Generator().manual_seed(4))
    ids[:, 5] = vocabulary.image_start_id
    ids[:, 6] = vocabulary.visual_offset + 3
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(length).expand(2, -1).clone()}


def test_pretrain_stage(release, exports):
    from stages.pretrain import PretrainStage
    from videolavit.inference.video_chat import read_llm_vocabulary

    made = release[1]
    directory = str(exports / "pretrain")
    vocabulary = read_llm_vocabulary(directory)
    stage = PretrainStage(tokenizer_path=directory, vocabulary=vocabulary, llm_path=directory, init_from=directory)
    fit_one_step(stage, llm_batch(vocabulary))
    source = made["llms"]["language_model"].state_dict()
    trained = {k: v for k, v in stage.llm.state_dict().items()}
    trained["model.embed_tokens.weight"] = torch.cat([trained.pop("model.embed_tokens.base"),
                                                      trained.pop("model.embed_tokens.new")])
    assert_started_from(trained, source, ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"])


def test_instruct_stage_on_codes_from_the_generation_llm(release, exports):
    from stages.instruct import InstructStage

    made = release[1]
    stage = InstructStage(init_from=str(exports / "pretrain"), qa_eval_questions=0)
    assert stage.keyframe_input == "codes"
    fit_one_step(stage, llm_batch(stage.vocabulary))
    source = made["llms"]["language_model"].state_dict()
    trained = stage.llm.state_dict()
    assert_started_from(trained, source, ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"])
