"""What every LLM view is configured with, declared once: where its token ids come from and how rows are packed.

Stage 2's ``PretrainSequenceView`` and stage 3's ``InstructionSequenceView`` read the same token shards through
the same ``VideoTokenView`` base; this dataclass is that base's configuration, so the two views (and their YAML,
``view.init_args.tokens``) cannot drift apart. Each view adds only the arguments of its own sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from videolavit.llm.vocabulary import Vocabulary
from videolavit.video.clips import CLIP_FRAMES

KeyframeSource = Literal["tokens", "none"]
KEYFRAME_SOURCES = ("tokens", "none")
CLIPS_PER_VIDEO = ("all", "random")


@dataclass
class TokenSource:
    """Args:
        tokenizer_path: local directory of the text tokenizer (``load_text_tokenizer``; its size must be
            ``vocabulary.text_size``).
        vocabulary: the id layout (release layout by default); must be the stage's.
        seq_len: tokens per packed row (paper: 2048).
        keyframe_source: ``"tokens"`` (keyframe ids from the token shards) | ``"none"`` (motion blocks only).
        tokenizer_exports: the stage-1 exports directory the token shards must have been made with (their
            fingerprint is checked on every sample); None: only the code counts are checked.
        image_tokenizer_export: keyframe tokenizer export that tokenises the image sources (default:
            ``tokenizer_exports``).
        keyframe_backbone_weights: local ViT weight file, overriding the path recorded in that export.
        tokenizer_device: device the keyframe tokenizer of the image sources runs on.
        open_rows: rows kept open while packing (1 = next-fit; more pads less).
        clip_frames, max_clips, clips_per_video: which clips of a video (``SampleView``).
    """

    tokenizer_path: str
    vocabulary: Vocabulary | None = None
    seq_len: int = 2048
    keyframe_source: KeyframeSource = "tokens"
    tokenizer_exports: str | None = None
    image_tokenizer_export: str | None = None
    keyframe_backbone_weights: str | None = None
    tokenizer_device: str = "cpu"
    open_rows: int = 4
    clip_frames: int = CLIP_FRAMES
    max_clips: int = 8
    clips_per_video: str = "all"

    def __post_init__(self) -> None:
        if self.keyframe_source not in KEYFRAME_SOURCES:
            raise ValueError(f"keyframe_source must be 'tokens' (ids from the token shards) or 'none', got "
                             f"{self.keyframe_source!r}")
        if self.clips_per_video not in CLIPS_PER_VIDEO:
            raise ValueError("clips_per_video must be 'all' or 'random'")


__all__ = ["TokenSource", "KeyframeSource", "KEYFRAME_SOURCES"]
