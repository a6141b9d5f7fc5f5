"""The names of the stage exports in an exports directory, spelled once.

A name is ``<dir>/<name>.{json,safetensors}`` (``videolavit.models.export``) or, for the diffusers-style
detokenizers, the folder ``<dir>/<name>/``. The stages write these names and the tokenize job, the LLM views, the
generation pipeline and the release importer look for them, so a name changed in one place only is impossible.
"""

from __future__ import annotations

MOTION_TOKENIZER = "motion_tokenizer"                  # stage 1a: motion field -> motion codes
VISION_BACKBONE = "vision_backbone"                    # the EVA ViT the keyframe tokenizer encodes with
KEYFRAME_TOKENIZER = "keyframe_tokenizer"              # stage 1a: keyframe -> keyframe codes
KEYFRAME_FEATURE_DECODER = "keyframe_feature_decoder"  # keyframe codes -> ViT features (beside the tokenizer)
KEYFRAME_DETOKENIZER = "keyframe_detokenizer"          # stage 1b g_I (a folder)
VIDEO_DETOKENIZER = "video_detokenizer"                # stage 1b g_V (a folder)
LLM = "llm"                                            # the LLM stages' checkpoint export name

__all__ = ["MOTION_TOKENIZER", "VISION_BACKBONE", "KEYFRAME_TOKENIZER", "KEYFRAME_FEATURE_DECODER",
           "KEYFRAME_DETOKENIZER", "VIDEO_DETOKENIZER", "LLM"]
