"""The release directory's layout (Video-LaVIT-v1) and the behaviour file an import leaves in an export.

Names are the release code's: ``language_model/`` and ``language_model_sft/`` (HF Llama directories with a
slow sentencepiece tokenizer and ``visual_weight.bin``), ``visual_tokenizer/tokenizer_encoder.bin``,
``motion_tokenizer.bin``, ``video_detokenizer/{vae,scheduler,unet}`` (``unet/`` holding the diffusers
config and ``video_3d_unet.bin`` or ``diffusion_pytorch_model.bin``: the whole g_V module's state dict,
``unet.*`` + ``motion_encoder.*``), ``image_detokenizer/{vae,scheduler,unet}``.
"""

from __future__ import annotations

import json
from pathlib import Path

LLM_DIRECTORIES = ("language_model", "language_model_sft")
VISUAL_WEIGHT = "visual_weight.bin"  # in each LLM directory: the keyframe tokenizer + feature decoder heads
KEYFRAME_TOKENIZER = "visual_tokenizer/tokenizer_encoder.bin"
MOTION_TOKENIZER = "motion_tokenizer.bin"
VIDEO_DETOKENIZER = "video_detokenizer"
VIDEO_UNET_FILES = ("unet/video_3d_unet.bin", "unet/diffusion_pytorch_model.bin")
IMAGE_DETOKENIZER = "image_detokenizer"
BEHAVIOUR_FILE = "release_behaviour.json"  # written by the import next to an export: which behaviours it has


def read_behaviour(directory: str | Path) -> dict:
    """The behaviour record of an imported export directory ({} for our own exports)."""
    path = Path(directory) / BEHAVIOUR_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return record
