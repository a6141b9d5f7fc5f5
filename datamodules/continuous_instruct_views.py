"""Stage 3 on the continuous keyframe path (the release's SFT model, ``videolavit.llm.keyframe_features``).

On this path the LLM reads each keyframe as features the stage computes with gradients (the keyframe tokenizer's
merger and ``vit_proj``), so rows cannot hold keyframe ids: ``ContinuousInstructionView`` reads the decomposed
video shards, codes the motion with the frozen motion tokenizer and gives, per conversation, its ids with one
``KEYFRAME_SLOT_ID`` per clip and the clips' keyframe images. Conversations, turns, templates, skips and held-out
questions are ``InstructionSequenceView``'s. How the pieces fit (why rows are not packed, where they are cut):
docs/design.md §8 ("Keyframes as codes or as features"); batch keys: ``ContinuousInstructionView.collate``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch

from datamodules.instruct_views import NO_CONVERSATION, ConversationFormat, InstructionSequenceView
from datamodules.sample_format import decode_sample
from datamodules.skip_tracker import SKIPS, SKIPS_KEY
from datamodules.token_source import TokenSource
from videolavit.inference.video_chat import read_llm_vocabulary
from videolavit.llm.keyframe_features import KEYFRAME_SLOT_ID, continuous_clip_ids
from videolavit.llm.sequences import IGNORE_INDEX
from videolavit.llm.video_codes import VideoCoder
from videolavit.llm.vocabulary import VOCABULARY_FILE, Vocabulary
from videolavit.video.clips import CLIP_FRAMES
from videolavit.video import errors


class ContinuousInstructionView(InstructionSequenceView):
    """Conversation rows with keyframe slots and images (docs/design.md §8), one conversation per row. Arguments as
    ``InstructionSequenceView`` (image conversations, packing and ``keyframe_source`` do not apply);
    ``tokenizer_exports`` (the motion tokenizer) is required; ``image_tokenizer_export`` (whose input size the
    keyframes are resized and centre-cropped to) defaults to it, since an imported SFT export holds both; and
    ``vocabulary`` defaults to the one ``tokenizer_path`` records when it is an LLM export."""

    name = "continuous_instruction"
    need_video = True

    def __init__(self, tokenizer_path: str, tokenizer_exports: str, vocabulary: Vocabulary | None = None,
                 seq_len: int = 2048, conversations: str | list[str] | None = None,
                 val_conversations: str | list[str] | None = None, conversation_format: ConversationFormat = "auto",
                 turns: Literal["separate", "merged"] = "separate", template: str = "v1",
                 overlong: Literal["skip", "truncate"] = "skip", image_tokenizer_export: str | None = None,
                 keyframe_backbone_weights: str | None = None, tokenizer_device: str = "cpu",
                 clip_frames: int = CLIP_FRAMES, max_clips: int = 8, clips_per_video: str = "all"):
        if vocabulary is None and (Path(tokenizer_path) / VOCABULARY_FILE).is_file():
            vocabulary = read_llm_vocabulary(tokenizer_path)  # an LLM export: its own id layout
        tokens = TokenSource(tokenizer_path, vocabulary=vocabulary, seq_len=seq_len,
                             tokenizer_exports=tokenizer_exports, image_tokenizer_export=image_tokenizer_export,
                             keyframe_backbone_weights=keyframe_backbone_weights, tokenizer_device=tokenizer_device,
                             clip_frames=clip_frames, max_clips=max_clips, clips_per_video=clips_per_video)
        super().__init__(tokens, conversations=conversations, val_conversations=val_conversations,
                         conversation_format=conversation_format, turns=turns, weights={"video": 1.0},
                         template=template, overlong=overlong, pack=False)
        self._coder: VideoCoder | None = None

    @property
    def coder(self) -> VideoCoder:
        """The frozen motion tokenizer (and the keyframe tokenizer's input size), loaded once per process."""
        if self._coder is None:
            self._coder = VideoCoder(self.vocabulary, self.tokenizer_exports, self.image_tokenizer_export,
                                     keyframe_backbone_weights=self.keyframe_backbone_weights,
                                     device=self.tokenizer_device, clip_frames=self.clip_frames)
        return self._coder

    def video_clips(self, sample: dict, train: bool, rng: random.Random) -> tuple[list[int], torch.Tensor]:
        """(LLM ids with one slot per clip, keyframe images [N, 3, S, S]) of a decoded sample."""
        starts = self.clip_starts(sample, train, rng)
        motions = self.coder.motion_codes(self.coder.motion_clips(sample["motion"], starts))
        images = self.coder.keyframe_images(sample["mp4"], sample["meta"], starts)
        return continuous_clip_ids(motions, self.vocabulary), images

    def conversation_rows(self, samples: Iterable[dict], train: bool, rng: random.Random,
                          questions: list[dict] | None) -> Iterator[dict]:
        for raw in samples:
            key = raw.get("__key__", "?")
            try:
                sample = decode_sample(raw, need_video=True)
                items = self.conversations_of(sample["key"], sample["meta"], train)
                if not items:
                    files = self.conversations if train or not self.val_conversations else self.val_conversations
                    raise errors.VideoSkip(NO_CONVERSATION, f"{key}: not in {files}")
                video, images = self.video_clips(sample, train, rng)
            except errors.VideoSkip as skip:
                SKIPS.record(key, skip.reason, skip.detail)
                continue
            if questions is not None:
                for q in self.questions_of(sample["key"], items, video):
                    questions.append({**q, "keyframe_images": images})
            for messages in self.video_conversations(items, train, rng):
                doc = self.encode(messages, [video], key)
                if doc is not None:
                    SKIPS.delivered()
                    yield {"input_ids": doc.input_ids, "labels": doc.labels, "keyframe_images": images}

    def __call__(self, samples: Iterable[dict], train: bool = False, rng: random.Random | None = None
                 ) -> Iterator[dict]:
        rng = rng or random.Random(0)
        pending: list[dict] | None = None if train else []
        for row in self.conversation_rows(samples, train, rng, pending):
            if pending is not None:
                row["questions"] = list(pending)
                pending.clear()
            yield row

    def collate(self, examples: list[dict]) -> dict:
        """Rows -> a batch, right-padded to the longest row (the stage splices the features in and cuts each row
        to its ``max_sequence_length``), with these keys:

        ====================  ==========================================================================
        ``input_ids``         long [B, L]; ``KEYFRAME_SLOT_ID`` where a keyframe's features go; pad id after the row
        ``labels``            long [B, L]; assistant targets, else -100 (slots and padding included)
        ``keyframe_images``   float [K, 3, S, S] in [0, 1]: the batch's keyframes, row by row, slot by slot
        ``keyframe_counts``   long [B]: slots per row
        ``row_lengths``       long [B]: ids per row before the padding
        ====================  ==========================================================================

        plus ``questions`` in validation (as ``InstructionSequenceView.collate``), each with its ``keyframe_images``.
        """
        width = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        counts = (ids == KEYFRAME_SLOT_ID).sum(dim=1)
        lengths = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)
        batch = {"input_ids": ids, "labels": labels, "keyframe_counts": counts, "row_lengths": lengths,
                 "keyframe_images": torch.cat([e["keyframe_images"] for e in examples])}
        if any("questions" in e for e in examples):
            batch["questions"] = [q for e in examples for q in e.get("questions", [])]
        SKIPS.delivered()
        batch[SKIPS_KEY] = SKIPS.snapshot()
        return batch


__all__ = ["ContinuousInstructionView"]
