"""Import a Video-LaVIT release directory (``videolavit.release.layout``) into our exports layout.

Holders of the released weights can then run inference, ``chat`` and the stages' ``init_from`` on them as on our
own exports. ``import_release`` writes every component: the tokenizers, the keyframe feature decoder, both
detokenizers and the LLM directories, each recording the release behaviour (what goes where: docs/design.md §12).
Every weight file is read with ``torch.load(weights_only=True)`` (``checkpoint.load_bin_state_dict``) and
re-written as safetensors. Sizes are the release's unless ``sizes`` overrides them (reduced test directories);
loading is strict, and every missing, unexpected or mis-shaped file or key is a ``ReleaseImportError`` naming it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from videolavit.llm.vocabulary import Vocabulary, write_vocabulary_file
from videolavit.models.export_names import KEYFRAME_DETOKENIZER, KEYFRAME_TOKENIZER, MOTION_TOKENIZER, VIDEO_DETOKENIZER
from videolavit.release import layout as L
from videolavit.release.checkpoint import ReleaseCheckpointError, load_bin_state_dict

SIZE_SECTIONS = ("motion_tokenizer", "keyframe_tokenizer", "keyframe_feature_decoder", "keyframe_detokenizer",
                 "motion_encoder", "video_detokenizer")
FEATURE_DECODER = "visual_tokenizer/highres_tokenizer_decoder.bin"
FEATURE_DECODER_EXPORT = "keyframe_feature_decoder"  # stages.keyframe_tokenizer's DECODER_EXPORT_NAME
IMAGE_UNET = "unet/diffusion_pytorch_model.bin"
VAE_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors")
LLM_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors", "model.safetensors.index.json")
LLM_EXPORTS = {"language_model": "pretrain", "language_model_sft": "instruct"}
ALLOWED_TOP = {"motion_tokenizer.bin", "visual_tokenizer", "video_detokenizer", "image_detokenizer",
               *L.LLM_DIRECTORIES}
# the release's understanding model (VideoLaVITLlamaForCausalLM) holds its keyframe and motion tokenizers
VISION_PREFIXES = ("model.visual_tokenizer.", "model.motion_tokenizer.")
VIDEO_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction",
                   "use_karras_sigmas": True}


class ReleaseImportError(ValueError):
    """The release directory lacks, has extra, or mis-shapes a file or key (the message names it)."""


@dataclass
class ImportReport:
    written: list[str] = field(default_factory=list)  # export names / directories written under ``out``
    skipped: list[str] = field(default_factory=list)  # optional parts the release directory does not hold


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ReleaseImportError(f"release directory is missing {what}: {path}")
    return path


def _bin(path: Path, what: str) -> dict[str, torch.Tensor]:
    _require(path, what)
    try:
        return load_bin_state_dict(path)
    except ReleaseCheckpointError as exc:
        raise ReleaseImportError(str(exc)) from None


def _json(path: Path, what: str) -> dict:
    _require(path, what)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseImportError(f"{what} {path} is not valid JSON: {exc}") from None


def _strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
            may_lack: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` naming every missing, unexpected and mis-shaped key; keys ending in
    ``may_lack`` (ours only, e.g. codebook EMA statistics) keep their fresh values."""
    ours = module.state_dict()
    missing = sorted(k for k in set(ours) - set(state) if not k.endswith(may_lack or ("\0",)))
    unexpected = sorted(set(state) - set(ours))
    mis_shaped = sorted(f"{k}: file {list(state[k].shape)} vs model {list(ours[k].shape)}"
                        for k in set(state) & set(ours) if state[k].shape != ours[k].shape)
    if missing or unexpected or mis_shaped:
        raise ReleaseImportError(f"{source} does not fit: {len(missing)} missing {missing[:6]}, {len(unexpected)} "
                                 f"unexpected {unexpected[:6]}, {len(mis_shaped)} mis-shaped {mis_shaped[:6]}")
    module.load_state_dict({**ours, **state}, strict=True)


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many ``prefix.N.`` blocks a state dict holds."""
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _check_top_level(release: Path) -> None:
    extra = sorted(p.name for p in release.iterdir()
                   if p.name not in ALLOWED_TOP and not p.name.startswith(".") and not p.name.lower().startswith("readme"))
    if extra:
        raise ReleaseImportError(f"unexpected entries in the release directory {release}: {extra} (expected "
                                 f"{sorted(ALLOWED_TOP)})")


def _copy_vae(src: Path, dest: Path) -> None:
    """A diffusers VAE directory with its weights re-written as safetensors."""
    config = _require(src / "config.json", "a VAE config")
    weights = next((src / n for n in VAE_WEIGHTS if (src / n).is_file()), None)
    if weights is None:
        raise ReleaseImportError(f"release VAE {src} holds none of {list(VAE_WEIGHTS)}")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, dest / "config.json")
    if weights.suffix == ".bin":
        state = _bin(weights, "VAE weights")
        save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "diffusion_pytorch_model.safetensors"))
    else:
        shutil.copy(weights, dest / weights.name)


def _vae_space(temporal: bool) -> dict:
    """The latent space of a detokenizer whose VAE ``_copy_vae`` put in its ``vae/``: a path relative to the
    export directory (``videolavit.models.latent_space.resolve_latent_space`` resolves it when loading)."""
    from videolavit.models.latent_space import VAE_SPACE, VAE_SUBFOLDER

    return {"class_path": VAE_SPACE,
            "init_args": {"path": VAE_SUBFOLDER, "subfolder": None, "temporal_decoder": temporal, "chunk": 16,
                          "sample_posterior": False}}


# ---- components -------------------------------------------------------------------------------------

def import_motion_tokenizer(release: Path, out: Path, sizes: dict) -> None:
    from videolavit.models.export import save_export
    from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig

    path = release / L.MOTION_TOKENIZER
    state = _bin(path, "the motion tokenizer")
    model = MotionTokenizer(MotionTokenizerConfig.preset("release", **sizes))
    _strict(model, state, str(path), may_lack=("quantize.cluster_size", "quantize.num_updates"))
    save_export(model, out, MOTION_TOKENIZER, model.config)


def import_keyframe_tokenizer(release: Path, out: Path, sizes: dict) -> torch.Tensor:
    """-> the codebook (the keyframe detokenizer's)."""
    from videolavit.models.keyframe_tokenizer import KeyframeTokenizer, KeyframeTokenizerConfig
    from videolavit.models.keyframe_tokenizer_export import init_backbone, save_keyframe_tokenizer

    path = release / L.KEYFRAME_TOKENIZER
    state = _bin(path, "the keyframe tokenizer")
    model = KeyframeTokenizer(KeyframeTokenizerConfig(**sizes))
    _strict(model, state, str(path), may_lack=("quantize.cluster_size", "quantize.num_updates"))
    backbone_file = out / "keyframe_tokenizer_backbone.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k[len("encoder."):]: v.contiguous() for k, v in state.items() if k.startswith("encoder.")},
              str(backbone_file))
    backbone = init_backbone(model, backbone_file.resolve())
    save_keyframe_tokenizer(model, out, backbone)
    return state["quantize.embedding.weight"]


def import_keyframe_detokenizer(release: Path, out: Path, codebook: torch.Tensor, sizes: dict,
                                decoder_sizes: dict) -> None:
    from videolavit.models.keyframe_detokenizer import (RELEASE_SCHEDULERS, KeyframeDetokenizer,
                                                        KeyframeDetokenizerConfig, KeyframeDiffusionConfig,
                                                        save_keyframe_detokenizer)
    from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
    from videolavit.models.keyframe_unet import KeyframeUNetConfig

    root = _require(release / L.IMAGE_DETOKENIZER, "the keyframe detokenizer (image_detokenizer/)")
    unet_config = _json(root / "unet" / "config.json", "the keyframe U-Net config")
    scheduler = _json(root / "scheduler" / "scheduler_config.json", "the keyframe scheduler config")
    sampler = RELEASE_SCHEDULERS.get(scheduler.get("_class_name"))
    if sampler is None:
        raise ReleaseImportError(f"{root / 'scheduler'}: scheduler {scheduler.get('_class_name')!r} is not one of "
                                 f"the release's {sorted(RELEASE_SCHEDULERS)}")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ReleaseImportError(f"{root / 'scheduler'}: prediction_type {prediction!r} is not supported")
    heads = unet_config.get("attention_head_dim")
    layers = unet_config.get("transformer_layers_per_block", 1)
    blocks = unet_config["block_out_channels"]
    unet = KeyframeUNetConfig(
        in_channels=unet_config["in_channels"], out_channels=unet_config["out_channels"], block_out_channels=blocks,
        down_block_types=unet_config["down_block_types"], up_block_types=unet_config["up_block_types"],
        layers_per_block=unet_config["layers_per_block"],
        transformer_layers_per_block=layers if isinstance(layers, list) else [layers] * len(blocks),
        num_heads=heads if isinstance(heads, list) else [heads] * len(blocks),
        context_dim=unet_config["cross_attention_dim"],
        pooled_dim=unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"],
        addition_time_embed_dim=unet_config["addition_time_embed_dim"],
        norm_num_groups=unet_config.get("norm_num_groups", 32),
        use_linear_projection=unet_config.get("use_linear_projection", True))
    diffusion = KeyframeDiffusionConfig(scaling="eps_discrete" if prediction == "epsilon" else "v_discrete",
                                        sampler=sampler, scheduler=scheduler,
                                        num_train_timesteps=scheduler.get("num_train_timesteps", 1000),
                                        beta_start=scheduler.get("beta_start", 0.00085),
                                        beta_end=scheduler.get("beta_end", 0.012),
                                        beta_schedule=scheduler.get("beta_schedule", "scaled_linear"),
                                        num_steps=sizes.pop("num_steps", 25),
                                        guidance_scale=sizes.pop("guidance_scale", 3.0))
    decoder = KeyframeFeatureDecoderConfig(**{"code_dim": int(codebook.shape[1]), **decoder_sizes})
    config = KeyframeDetokenizerConfig(unet=unet, decoder=decoder, diffusion=diffusion,
                                       num_codes=int(codebook.shape[0]), code_dim=int(codebook.shape[1]),
                                       **{"image_size": 1024, "latent_downsample": 8, **sizes})
    model = KeyframeDetokenizer(config)
    decoder_path = release / FEATURE_DECODER
    decoder_state = _bin(decoder_path, "the keyframe feature decoder")
    _strict(model.feature_decoder, decoder_state, str(decoder_path))
    # also the keyframe tokenizer stage's feature decoder export, so both stage-1 keyframe stages start from here
    from videolavit.models.export import save_export

    save_export(model.feature_decoder, out, FEATURE_DECODER_EXPORT, model.feature_decoder.config)
    model.load_tokenizer_parts(codebook, model.feature_decoder.state_dict())
    unet_path = root / IMAGE_UNET
    _strict(model.unet.net, _bin(unet_path, "the keyframe U-Net weights"), str(unet_path))
    dest = out / KEYFRAME_DETOKENIZER
    _copy_vae(_require(root / "vae", "the keyframe VAE"), dest / "vae")
    save_keyframe_detokenizer(model, dest, _vae_space(temporal=False), provenance={"release": root.name})


def import_video_detokenizer(release: Path, out: Path, sizes: dict, encoder_sizes: dict) -> None:
    from videolavit.models.motion_condition_encoder import MotionConditionEncoderConfig
    from videolavit.models.video_detokenizer import (VideoDetokenizer, VideoDetokenizerConfig, VideoDetokenizerSpec,
                                                     release_behaviour, save_video_detokenizer)
    from videolavit.models.video_unet import VideoUNetConfig

    root = _require(release / L.VIDEO_DETOKENIZER, "the video detokenizer (video_detokenizer/)")
    unet_config = _json(root / "unet" / "config.json", "the video U-Net config")
    scheduler = _json(root / "scheduler" / "scheduler_config.json", "the video scheduler config")
    for key, value in VIDEO_SCHEDULER.items():
        if scheduler.get(key) != value:
            raise ReleaseImportError(f"{root / 'scheduler'}: {key} is {scheduler.get(key)!r}, g_V samples with "
                                     f"{value!r} (SVD's Euler scheduler)")
    weights = next((root / n for n in L.VIDEO_UNET_FILES if (root / n).is_file()), None)
    if weights is None:
        raise ReleaseImportError(f"release directory is missing the g_V weights: one of "
                                 f"{[str(root / n) for n in L.VIDEO_UNET_FILES]}")
    state = _bin(weights, "the g_V weights")
    state = {k: v for k, v in state.items() if not k.startswith(("motion_tokenizer.", "vae."))}  # loaded apart
    if "motion_encoder.in_proj.weight" not in state:
        raise ReleaseImportError(f"{weights} holds no motion_encoder.* tensors: not the whole g_V module's state")
    heads = unet_config.get("num_attention_heads")
    blocks = unet_config["block_out_channels"]
    latent = int(unet_config["out_channels"])
    encoder = MotionConditionEncoderConfig(**{
        "dim": int(state["motion_encoder.in_proj.weight"].shape[0]), "depth": _blocks(state, "motion_encoder.blocks."),
        "out_dim": int(state["motion_encoder.out_proj.weight"].shape[0]), **encoder_sizes})
    unet = VideoUNetConfig(latent_channels=latent, down_block_types=unet_config["down_block_types"],
                           up_block_types=unet_config["up_block_types"], block_out_channels=blocks,
                           layers_per_block=unet_config["layers_per_block"],
                           transformer_layers_per_block=unet_config.get("transformer_layers_per_block", 1),
                           num_attention_heads=heads if isinstance(heads, list) else [heads] * len(blocks),
                           cross_attention_dim=unet_config["cross_attention_dim"],
                           addition_time_embed_dim=unet_config["addition_time_embed_dim"],
                           motion_grid=(encoder.height, encoder.width))
    if unet.in_channels != unet_config["in_channels"]:
        raise ReleaseImportError(f"{root / 'unet/config.json'}: in_channels {unet_config['in_channels']} is not "
                                 f"noisy {latent} + keyframe {latent} + motion 2")
    spec_sizes = {"frame_size": (576, 1024), "num_frames": 24, **{k: sizes.pop(k) for k in ("frame_size", "num_frames")
                                                                    if k in sizes}}
    vae_config = _json(root / "vae" / "config.json", "the video VAE config")
    config = release_behaviour(VideoDetokenizerConfig(unet=unet, motion_encoder=encoder,
                                                      sigma_min=scheduler.get("sigma_min", 0.002),
                                                      sigma_max=scheduler.get("sigma_max", 700.0), **sizes),
                               float(vae_config.get("scaling_factor", 0.18215)))
    model = VideoDetokenizer(config)
    _strict(model, state, str(weights))
    dest = out / VIDEO_DETOKENIZER
    _copy_vae(root / "vae", dest / "vae")
    save_video_detokenizer(model, dest, VideoDetokenizerSpec(
        latent_space=_vae_space(temporal=True), frame_size=tuple(spec_sizes["frame_size"]),
        num_frames=int(spec_sizes["num_frames"]), motion_grid=(20, 36), motion_scale=10.0))


def _llm_weights(src: Path, dest: Path) -> dict[str, torch.Tensor]:
    """HF Llama weights (``.bin``, sharded or not, or safetensors) -> ``model.safetensors`` in ``dest``.

    The release's understanding checkpoint is a ``VideoLaVITLlamaForCausalLM``: its ``model.visual_tokenizer.*``
    and ``model.motion_tokenizer.*`` tensors are not the LLM's; they are returned (keys as in the file) and kept
    out of ``model.safetensors``."""
    names = [n for n in LLM_WEIGHTS if (src / n).is_file()]
    if not names:
        raise ReleaseImportError(f"LLM directory {src} holds no weights (one of {list(LLM_WEIGHTS)})")
    name = names[0]
    if name.endswith(".index.json"):
        shards = sorted(set(_json(src / name, "the LLM weight index")["weight_map"].values()))
    else:
        shards = [name]
    if name.endswith("safetensors") or name == "model.safetensors.index.json":
        from safetensors import safe_open

        towers = {}
        for shard in shards:
            with safe_open(str(_require(src / shard, "an LLM weight shard")), "pt") as handle:
                towers.update({k: handle.get_tensor(k) for k in handle.keys() if k.startswith(VISION_PREFIXES)})
        if not towers:
            for path in [src / name, *(src / f for f in shards if name.endswith(".json"))]:
                shutil.copy(path, dest / path.name)
            return {}
        state = {}
        for shard in shards:
            with safe_open(str(src / shard), "pt") as handle:
                state.update({k: handle.get_tensor(k) for k in handle.keys()})
    else:
        state = {}
        for shard in shards:
            state.update(_bin(src / shard, "an LLM weight shard"))
    towers = {k: state.pop(k) for k in [k for k in state if k.startswith(VISION_PREFIXES)]}
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"))
    return towers


class SentencepieceMissingError(ReleaseImportError):
    """The release's slow ``tokenizer.model`` needs the sentencepiece package to become a fast tokenizer."""


def sentencepiece_available() -> bool:
    return importlib.util.find_spec("sentencepiece") is not None


def _fast_tokenizer(src: Path, dest: Path):
    """The release ships a slow sentencepiece tokenizer: use its ``tokenizer.json`` where present, else
    convert ``tokenizer.model`` with transformers (needs the sentencepiece package: ``videolavit[release]``)."""
    from transformers import AutoTokenizer

    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
        raise ReleaseImportError(f"LLM directory {src} has no tokenizer (tokenizer.model or tokenizer.json)")
    if not (src / "tokenizer.json").is_file() and not sentencepiece_available():
        raise SentencepieceMissingError(f"{src / 'tokenizer.model'} is a slow sentencepiece tokenizer; converting it "
                                        "needs the sentencepiece package: pip install 'videolavit[release]' (or "
                                        "pip install sentencepiece)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - conversion fails in several libraries' error types
        raise ReleaseImportError(f"cannot build a fast tokenizer from {src}: {type(exc).__name__}: {exc} "
                                 "(converting the slow tokenizer.model needs the sentencepiece package)") from None
    if not getattr(tokenizer, "is_fast", False) or len(tokenizer) < 3:
        raise ReleaseImportError(f"{src}: the slow tokenizer.model could not be converted to a fast tokenizer "
                                 "(install the sentencepiece package, or put its tokenizer.json next to it)")
    tokenizer.save_pretrained(str(dest))
    return tokenizer


def import_llm(src: Path, dest: Path, vocabulary: Vocabulary, keyframe_keys: set[str] | None,
               understanding: "UnderstandingParts | None" = None) -> None:
    """One LLM directory. ``understanding`` (for ``language_model_sft/``): the export reads keyframes as
    continuous features (``videolavit.llm.keyframe_features``) and gets its own keyframe and motion tokenizer
    exports - the SFT checkpoint's ``model.visual_tokenizer.*`` / ``model.motion_tokenizer.*`` when it holds them
    (the release's understanding model loads those), else the release's tokenizers with ``visual_weight.bin``
    over the keyframe tokenizer's (LaVIT's ``build_dynamic_tokenizer(for_understanding=True)``)."""
    from videolavit.llm.keyframe_features import write_llm_spec

    config = _json(src / "config.json", "an LLM config")
    if int(config.get("vocab_size", -1)) != vocabulary.size:
        raise ReleaseImportError(f"{src / 'config.json'}: vocab_size {config.get('vocab_size')} is not the "
                                 f"release vocabulary's {vocabulary.size}")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    towers = _llm_weights(src, dest)
    tokenizer = _fast_tokenizer(src, dest)
    if len(tokenizer) != vocabulary.text_size:
        raise ReleaseImportError(f"{src}: the tokenizer has {len(tokenizer)} ids, the release's text ids are "
                                 f"0..{vocabulary.text_size - 1}")
    write_vocabulary_file(dest, vocabulary)
    visual = src / L.VISUAL_WEIGHT
    visual_state = None
    if visual.is_file():  # the keyframe tokenizer's parts trained with this LLM (continuous keyframes)
        visual_state = _bin(visual, "the LLM's visual weights")
        if keyframe_keys is not None:
            unknown = sorted(set(visual_state) - keyframe_keys)
            if unknown:
                raise ReleaseImportError(f"{visual}: keys that are not the keyframe tokenizer's: {unknown[:6]}")
        save_file({k: v.contiguous() for k, v in visual_state.items()}, str(dest / "visual_weight.safetensors"))
    sources = {}
    if understanding is not None:
        sources = understanding.write(src, dest, towers, visual_state)
    elif towers:
        raise ReleaseImportError(f"{src}: a generation LLM with {sorted(towers)[:3]}...: only language_model_sft/ "
                                 "holds the understanding model's tokenizers")
    write_llm_spec(dest, "continuous" if understanding is not None else "codes", **sources)
    (dest / L.BEHAVIOUR_FILE).write_text(json.dumps({"llm_generation": "release", "source": str(src.resolve()),
                                                     "visual_weight": visual.is_file(),
                                                     "keyframe_input": "continuous" if understanding else "codes"},
                                                    indent=2))


@dataclass
class UnderstandingParts:
    """What an understanding (SFT) export needs besides the LLM: the imported tokenizers to start from."""

    out: Path  # the exports directory holding the imported motion_tokenizer.* and keyframe_tokenizer.*
    motion_sizes: dict
    keyframe_sizes: dict

    def write(self, src: Path, dest: Path, towers: dict, visual_state: dict | None) -> dict:
        from videolavit.models.export import save_export
        from videolavit.models.keyframe_tokenizer import KeyframeTokenizer, KeyframeTokenizerConfig
        from videolavit.models.keyframe_tokenizer_export import (init_backbone, load_keyframe_tokenizer,
                                                                 save_keyframe_tokenizer)
        from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig

        ema = ("quantize.cluster_size", "quantize.num_updates")
        sources = {}
        visual = {k[len("model.visual_tokenizer."):]: v for k, v in towers.items()
                  if k.startswith("model.visual_tokenizer.")}
        if visual:  # the release's understanding model: its own, complete keyframe tokenizer
            model = KeyframeTokenizer(KeyframeTokenizerConfig(**self.keyframe_sizes))
            _strict(model, visual, f"{src} (model.visual_tokenizer.*)", may_lack=ema)
            backbone_file = dest / "keyframe_tokenizer_backbone.safetensors"
            save_file({k[len("encoder."):]: v.contiguous() for k, v in visual.items() if k.startswith("encoder.")},
                      str(backbone_file))
            backbone = init_backbone(model, backbone_file.resolve())
            sources["keyframe_encoder"] = "model.visual_tokenizer"
        else:
            model = load_keyframe_tokenizer(self.out)
            backbone = init_backbone(model, (self.out / "keyframe_tokenizer_backbone.safetensors").resolve())
            sources["keyframe_encoder"] = "visual_tokenizer/tokenizer_encoder.bin"
            if visual_state is not None:
                ours = model.state_dict()
                mis_shaped = sorted(k for k in visual_state if visual_state[k].shape != ours[k].shape)
                if mis_shaped:
                    raise ReleaseImportError(f"{src / L.VISUAL_WEIGHT}: mis-shaped {mis_shaped[:6]}")
                model.load_state_dict({**ours, **visual_state})
                sources["keyframe_encoder"] += f" + {L.VISUAL_WEIGHT}"
        save_keyframe_tokenizer(model, dest, backbone)
        motion = {k[len("model.motion_tokenizer."):]: v for k, v in towers.items()
                  if k.startswith("model.motion_tokenizer.")}
        if motion:
            tokenizer = MotionTokenizer(MotionTokenizerConfig.preset("release", **self.motion_sizes))
            _strict(tokenizer, motion, f"{src} (model.motion_tokenizer.*)", may_lack=ema)
            save_export(tokenizer, dest, MOTION_TOKENIZER, tokenizer.config)
            sources["motion_tokenizer"] = "model.motion_tokenizer"
        else:
            for suffix in (".json", ".safetensors"):
                shutil.copy(self.out / f"motion_tokenizer{suffix}", dest / f"motion_tokenizer{suffix}")
            sources["motion_tokenizer"] = L.MOTION_TOKENIZER
        return sources


def import_release(release: str | Path, out: str | Path, sizes: dict | None = None) -> ImportReport:
    """Import every component of ``release`` into ``out`` (docs/design.md §12); ``sizes``: per section of
    ``SIZE_SECTIONS``, constructor arguments that replace the release's sizes."""
    release, out = Path(release), Path(out)
    if not release.is_dir():
        raise ReleaseImportError(f"release directory {release} does not exist")
    sizes = {k: dict(v) for k, v in (sizes or {}).items()}
    unknown = sorted(set(sizes) - set(SIZE_SECTIONS))
    if unknown:
        raise ReleaseImportError(f"unknown size sections {unknown}; known: {list(SIZE_SECTIONS)}")
    _check_top_level(release)
    out.mkdir(parents=True, exist_ok=True)
    report = ImportReport()
    import_motion_tokenizer(release, out, sizes.get("motion_tokenizer", {}))
    report.written.append(MOTION_TOKENIZER)
    codebook = import_keyframe_tokenizer(release, out, sizes.get("keyframe_tokenizer", {}))
    report.written.append(KEYFRAME_TOKENIZER)
    import_keyframe_detokenizer(release, out, codebook, sizes.get("keyframe_detokenizer", {}),
                                sizes.get("keyframe_feature_decoder", {}))
    report.written.append(KEYFRAME_DETOKENIZER)
    import_video_detokenizer(release, out, sizes.get("video_detokenizer", {}), sizes.get("motion_encoder", {}))
    report.written.append(VIDEO_DETOKENIZER)
    from videolavit.models.keyframe_tokenizer import KeyframeTokenizer, KeyframeTokenizerConfig

    with torch.device("meta"):
        keyframe_keys = set(KeyframeTokenizer(KeyframeTokenizerConfig(**sizes.get("keyframe_tokenizer", {})))
                            .state_dict())
    motion_codes = int(json.loads((out / f"{MOTION_TOKENIZER}.json").read_text())["config"].get("num_codes", 1024))
    vocabulary = Vocabulary(text_size=32000, visual_codes=int(codebook.shape[0]), motion_codes=motion_codes)
    found = [name for name in L.LLM_DIRECTORIES if (release / name).is_dir()]
    if not found:
        raise ReleaseImportError(f"release directory {release} holds no LLM ({' or '.join(L.LLM_DIRECTORIES)}/)")
    for name in L.LLM_DIRECTORIES:
        if name not in found:
            report.skipped.append(name)
            continue
        understanding = UnderstandingParts(out, sizes.get("motion_tokenizer", {}), sizes.get("keyframe_tokenizer", {})) \
            if name == "language_model_sft" else None
        import_llm(release / name, out / LLM_EXPORTS[name], _llm_vocabulary(release / name, vocabulary),
                   keyframe_keys, understanding)
        report.written.append(LLM_EXPORTS[name])
    (out / L.BEHAVIOUR_FILE).write_text(json.dumps({"release": str(release.resolve()), "written": report.written,
                                                    "skipped": report.skipped}, indent=2))
    return report


def _llm_vocabulary(directory: Path, vocabulary: Vocabulary) -> Vocabulary:
    """The release's ids: text below [IMG] = vocab_size - codes - 4 markers (32000 for the release)."""
    config = _json(directory / "config.json", "an LLM config")
    text_size = int(config.get("vocab_size", 0)) - vocabulary.visual_codes - vocabulary.motion_codes - 4
    if text_size < 3:
        raise ReleaseImportError(f"{directory / 'config.json'}: vocab_size {config.get('vocab_size')} leaves no "
                                 f"text ids beside {vocabulary.visual_codes} visual and {vocabulary.motion_codes} "
                                 "motion codes")
    return Vocabulary(text_size=text_size, visual_codes=vocabulary.visual_codes, motion_codes=vocabulary.motion_codes)
