"""Random tiny stage-1 tokenizer exports (motion: 24x8x8 clips -> 16 codes of 32; keyframe: 56 px ViT -> codes of
16), the layout the LLM view, tokenize and chat tests share."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

MOTION_CODES, VISUAL_CODES = 32, 16


def build_tokenizer_exports(out: Path, seed: int = 0, eval_selection: str = "threshold") -> Path:
    """Write ``motion_tokenizer.*`` and ``keyframe_tokenizer.*`` into ``out``; returns ``out``."""
    from videolavit.models.eva_vit import EvaViTConfig
    from videolavit.models.export import save_export
    from videolavit.models.keyframe_tokenizer import KeyframeTokenizer, KeyframeTokenizerConfig
    from videolavit.models.keyframe_tokenizer_export import init_backbone, save_keyframe_tokenizer
    from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig

    out = Path(out)
    torch.manual_seed(seed)
    motion = MotionTokenizerConfig(num_frames=24, height=8, width=8, dim=32, num_heads=2, mlp_ratio=2.0,
                                   blocks_per_stage=[1, 1, 1, 1], downsample="conv", num_codes=MOTION_CODES,
                                   code_dim=8, stage_factors=[[1, 2, 2], [2, 2, 2], [3, 1, 1], [1, 1, 1]])
    save_export(MotionTokenizer(motion), out, "motion_tokenizer", motion)
    keyframe = KeyframeTokenizerConfig(
        vit=EvaViTConfig(image_size=56, patch_size=14, width=32, depth=1, num_heads=2, mlp_dim=64, embed_dim=32),
        merger_depth=1, merger_heads=2, merger_mlp_dim=64, num_codes=VISUAL_CODES, code_dim=8, llm_dim=32,
        eval_selection=eval_selection)
    model = KeyframeTokenizer(keyframe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_keyframe_tokenizer(model, out, init_backbone(model, None, 0))
    return out
