"""Exports of the LaVIT keyframe tokenizer *without* its frozen ViT, and how a loader joins them again.

The frozen EVA-CLIP ViT-g/14 (about 1B parameters) never changes during tokenizer training, so an export
holds only the trained parts and names the backbone it was trained against, with a fingerprint of its
tensors; the backbone itself is read from its own local weight file (or, for tests and tiny runs, re-created
from the seed of its random init). A different ViT would silently give different ids, so a loader checks the
fingerprint. The files: :func:`save_keyframe_tokenizer`; the loading steps: :func:`load_keyframe_tokenizer`.

``videolavit.models.export.load_export`` cannot load this export (it would report the ``encoder.`` keys as
missing); use :func:`load_keyframe_tokenizer`. Nothing here unpickles objects: tensors come from
safetensors (or ``weights_only`` torch files for the backbone), configs from JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from videolavit.models.eva_vit import EvaViT, EvaViTConfig
from videolavit.models.export import (FORMAT_VERSION, ExportError, check_export_class, class_path, read_export,
                                      write_export)
from videolavit.models.export_names import KEYFRAME_TOKENIZER
from videolavit.models.keyframe_tokenizer import KeyframeTokenizer, KeyframeTokenizerConfig

EXPORT_NAME = KEYFRAME_TOKENIZER
BACKBONE_PREFIX = "encoder."


class RandomBackboneWarning(UserWarning):
    """The keyframe tokenizer's ViT is randomly initialised: fine for tests and tiny runs only."""


@dataclass(frozen=True)
class BackboneSource:
    """Where a tokenizer's frozen ViT came from (recorded in exports as ``extra.backbone``)."""

    weights: str | None  # absolute path of the local weight file, or None for a seeded random init
    weights_prefix: str  # key prefix selected and stripped in that file ("" = the file is the ViT alone)
    random_init_seed: int | None
    fingerprint: str

    def to_json(self) -> dict:
        return {"model_prefix": BACKBONE_PREFIX, **dataclasses.asdict(self)}


def backbone_fingerprint(encoder: torch.nn.Module) -> str:
    """SHA-256 over the backbone's tensors (name, shape, float32 bytes), in sorted name order.

    Values are compared in float32, so an fp16/bf16 weight file and the fp32 model it was loaded into
    have the same fingerprint. Hashing ViT-g (~1B parameters) takes a few seconds.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.float()
        tensor = tensor.contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        digest.update(memoryview(tensor.numpy()).cast("B"))
    return digest.hexdigest()


def random_backbone_state(config: EvaViTConfig, seed: int) -> dict[str, torch.Tensor]:
    """The state of an ``EvaViT(config)`` initialised from ``seed`` alone (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            return EvaViT(config).state_dict()


def init_backbone(model: KeyframeTokenizer, weights: str | Path | None, random_init_seed: int = 0,
                  weights_prefix: str = "") -> BackboneSource:
    """Fill ``model.encoder`` from a local weight file (strict; ``weights_prefix`` selects and strips a key
    prefix, e.g. ``"encoder."`` to take the ViT out of a full tokenizer checkpoint), or, when ``weights`` is
    None, from a seeded random init (with a :class:`RandomBackboneWarning`). Returns what an export must
    record about it."""
    if weights is not None:
        path = Path(weights).expanduser().resolve()
        model.encoder.load_backbone_weights(path, prefix=weights_prefix)
        source_weights, seed = str(path), None
    else:
        warnings.warn(
            "keyframe tokenizer: no backbone_weights given, so the frozen ViT is RANDOMLY initialised "
            f"(seed {random_init_seed}). Its features carry no pretrained semantics: use this only for tests "
            "and tiny runs, and set backbone_weights to a local EVA-CLIP file for real training.",
            RandomBackboneWarning, stacklevel=2)
        model.encoder.load_state_dict(random_backbone_state(model.config.vit, random_init_seed), strict=True)
        source_weights, seed, weights_prefix = None, int(random_init_seed), ""
    model.encoder.requires_grad_(False)
    model.encoder.eval()
    return BackboneSource(weights=source_weights, weights_prefix=weights_prefix, random_init_seed=seed,
                          fingerprint=backbone_fingerprint(model.encoder))


def trainable_state(model: KeyframeTokenizer) -> dict[str, torch.Tensor]:
    """Everything of the tokenizer's state except the frozen backbone, on CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(BACKBONE_PREFIX)}


def save_keyframe_tokenizer(model: KeyframeTokenizer, directory: str | Path, backbone: BackboneSource,
                            name: str = EXPORT_NAME) -> Path:
    """Write ``{name}.safetensors`` (no ``encoder.`` tensors) and ``{name}.json``; returns the weights path::

        keyframe_tokenizer.safetensors  trained tensors only: token_predictor.*, causal_encoder.*,
                                        encode_task_layer.*, quantize.* (codebook + EMA state), vit_proj.*
        keyframe_tokenizer.json         the same JSON layout as ``videolavit.models.export`` (class_path,
                                        config_class, config) plus ``extra.backbone``:
            {"model_prefix": "encoder.",  key prefix of the backbone inside KeyframeTokenizer (absent from the file)
             "weights": "/abs/path" | null,   the local file the backbone was loaded from during training
             "weights_prefix": "",            key prefix selected (and stripped) in that file, e.g. "encoder."
             "random_init_seed": int | null,  set instead of "weights" when the backbone was a seeded random init
             "fingerprint": "<sha256>"}       of the backbone's tensors (float32, sorted by name)
    """
    config = model.config
    meta = {
        "format_version": FORMAT_VERSION,
        "class_path": class_path(KeyframeTokenizer),
        "config_class": class_path(type(config)),
        "config": dataclasses.asdict(config),
        "extra": {"backbone": backbone.to_json()},
    }
    return write_export(directory, name, trainable_state(model), meta)


def read_keyframe_tokenizer(directory: str | Path, name: str = EXPORT_NAME
                            ) -> tuple[dict[str, torch.Tensor], KeyframeTokenizerConfig, dict]:
    """``(trained tensors, config, backbone record)`` of an export, without building the model."""
    state, meta = read_export(directory, name)
    check_export_class(meta, KeyframeTokenizer, f"export '{name}' in {directory}")
    backbone = (meta.get("extra") or {}).get("backbone")
    if backbone is None:
        raise ExportError(f"{directory}/{name}.json has no extra.backbone record: not a keyframe tokenizer export "
                          "written by save_keyframe_tokenizer")
    leaked = sorted(k for k in state if k.startswith(BACKBONE_PREFIX))
    if leaked:
        raise ExportError(f"{directory}/{name}.safetensors holds backbone tensors {leaked[:4]}; exports keep the "
                          "backbone in its own file")
    try:
        config = KeyframeTokenizerConfig(**meta.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{directory}/{name}.json: its config does not build a keyframe tokenizer ({exc})") from None
    return state, config, backbone


def load_trained_parts(model: KeyframeTokenizer, state: dict[str, torch.Tensor], source: str = "export") -> None:
    """Load the non-backbone tensors strictly (every trained key present, no unknown key); ``encoder.`` is untouched."""
    expected = {k for k in model.state_dict() if not k.startswith(BACKBONE_PREFIX)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"{source} does not match the keyframe tokenizer: missing={missing[:8]} "
                          f"unexpected={unexpected[:8]}")
    model.load_state_dict(state, strict=False)  # only the backbone's keys are missing: checked above


def check_backbone(found: BackboneSource, recorded: dict, source: str) -> None:
    """Raise if the loaded backbone (``found``) is not the one the export was trained against."""
    if found.fingerprint != recorded["fingerprint"]:
        trained_with = recorded.get("weights") or f"a random init with seed {recorded.get('random_init_seed')}"
        raise ExportError(
            f"{source} was trained against a different ViT backbone ({trained_with}, fingerprint "
            f"{recorded['fingerprint'][:12]}…) than the one loaded (fingerprint {found.fingerprint[:12]}…); "
            "its ids would not mean the same. Pass the right backbone_weights (or check_fingerprint=False to "
            "override).")


def load_keyframe_tokenizer(directory: str | Path, backbone_weights: str | Path | None = None,
                            name: str = EXPORT_NAME, map_location: str | torch.device = "cpu",
                            check_fingerprint: bool = True, backbone_prefix: str | None = None) -> KeyframeTokenizer:
    """Rebuild a trained keyframe tokenizer: the export's trained parts + the backbone from its own file.

    ``backbone_weights`` (and ``backbone_prefix``) override the file (and key prefix) recorded in the
    export, e.g. where the file lives elsewhere on this machine. Returns the model in eval mode on
    ``map_location``. The steps:

    1. builds ``KeyframeTokenizer(config)`` from the JSON;
    2. fills ``encoder.`` from ``backbone_weights`` (argument) or else the recorded ``weights`` path, with the
       recorded ``weights_prefix`` (``EvaViT.load_backbone_weights``, strict), or — for exports of test/tiny
       runs whose backbone was a seeded random init — re-creates that init from ``random_init_seed``;
    3. checks the backbone's fingerprint against the recorded one (a different ViT would silently give
       different ids: that is an error unless ``check_fingerprint=False``);
    4. loads the trained tensors strictly: every non-``encoder.`` key must be present, nothing else may be.
    """
    state, config, recorded = read_keyframe_tokenizer(directory, name)
    model = KeyframeTokenizer(config)
    source = f"export '{name}' in {directory}"
    weights = backbone_weights if backbone_weights is not None else recorded.get("weights")
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise ExportError(f"{source}: backbone weight file {weights} not found; pass backbone_weights=PATH to "
                              "the local EVA-CLIP file it was trained with")
        prefix = backbone_prefix if backbone_prefix is not None else recorded.get("weights_prefix", "")
        found = init_backbone(model, weights, weights_prefix=prefix)
    elif recorded.get("random_init_seed") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomBackboneWarning)
            found = init_backbone(model, None, recorded["random_init_seed"])
        warnings.warn(f"{source} was trained against a seeded RANDOM ViT (test/tiny run); its tokens carry no "
                      "pretrained semantics", RandomBackboneWarning, stacklevel=2)
    else:
        raise ExportError(f"{source} records no backbone weight file; pass backbone_weights=PATH")
    if check_fingerprint:
        check_backbone(found, recorded, source)
    load_trained_parts(model, state, source)
    return model.to(map_location).eval()
