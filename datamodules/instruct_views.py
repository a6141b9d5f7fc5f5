"""Instruction-tuning view for stage 3 (docs/design.md §8): video (and image) conversations -> token rows.

Stage 3 trains on conversations about videos, so ``InstructionSequenceView`` reads the same token shards
(``python -m videolavit tokenize``) and the same clip ids as stage 2 (``VideoTokenView``) and joins annotation
files to them by video key: the conversations are held in memory while the shards stream past, so memory grows
with the annotation file, never with the video corpus. LLaVA image conversations can be mixed in. Annotation
formats, ``turns``, length rules and skips: docs/design.md §8 ("Instruction-tuning data"); batch keys:
``InstructionSequenceView.collate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal


from datamodules.line_streams import reader_slot
from datamodules.image_files import UNREADABLE_IMAGE, load_image
from datamodules.llm_views import VideoTokenView
from datamodules.sample_format import sanitize_key
from datamodules.skip_tracker import SKIPS
from datamodules.token_source import TokenSource
from videolavit.inference.video_chat import template_by_name
from videolavit.llm.conversation import (
    VIDEO_PLACEHOLDER,
    ConversationSample,
    Message,
    read_llava_conversations,
    read_synthetic_qa,
    read_video_qa,
)
from videolavit.llm.sequences import IGNORE_INDEX, PackedRow, TokenSequence, image_token_ids, pack_documents
from videolavit.video import errors

log = logging.getLogger(__name__)

NO_CONVERSATION = "no_conversation"              # a shard video without annotations
CONVERSATION_TOO_LONG = "conversation_too_long"  # longer than seq_len (overlong="skip", or nothing left)
MISSING_IMAGE = "missing_image"                  # an image conversation whose file is not there
UNSUPPORTED_MEDIA = "unsupported_media"          # a video item in the image-conversation file

ConversationFormat = Literal["auto", "synthetic_qa", "video_qa", "llava"]
_VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp"}


def read_conversations(path: str | Path, format: ConversationFormat = "auto") -> list[ConversationSample]:
    """Conversations of a local annotation file; ``auto`` picks the reader from the first item's keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        items = json.load(handle)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of annotation items")
    if format == "auto":
        first = items[0] if items else {}
        if {"question", "answer"} <= set(first):
            format = "synthetic_qa"
        elif {"q", "a"} <= set(first) or "video_id" in first or "video" in first:
            format = "video_qa"
        elif "conversations" in first:
            format = "llava"
        else:
            raise ValueError(f"{path}: cannot tell the format from the keys {sorted(first)}; set conversation_format")
    readers = {"synthetic_qa": read_synthetic_qa, "video_qa": read_video_qa, "llava": read_llava_conversations}
    if format not in readers:
        raise ValueError(f"conversation_format must be one of {['auto', *readers]}, got {format!r}")
    try:
        return readers[format](items)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path} ({format}): {exc}") from None


def video_key(media: str) -> str:
    """The shard key a video id or file name maps to (``prepare``: relative path, suffix dropped, sanitised)."""
    media = str(media)
    suffix = Path(media).suffix
    if suffix.lower() in _VIDEO_SUFFIXES:
        media = media[: -len(suffix)]
    return sanitize_key(media)


def index_by_video(samples: Iterable[ConversationSample]) -> dict[str, list[ConversationSample]]:
    """Video conversations by shard key, in file order (image/text items are left out)."""
    index: dict[str, list[ConversationSample]] = {}
    for sample in samples:
        if sample.media_kind == "video" and sample.media is not None:
            index.setdefault(video_key(sample.media), []).append(sample)
    return index


@dataclasses.dataclass
class InstructRow(PackedRow):
    """A packed row plus the held-out questions it carries (validation only)."""

    questions: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class InstructStats:
    """Counts of this process (DataLoader workers keep their own)."""

    conversations: int = 0
    truncated: int = 0
    too_long: int = 0


ALL_TOO_LONG_AFTER = 64  # this many conversations too long for a row, and none that fits: a config error


class InstructionSequenceView(VideoTokenView):
    """Conversation rows for stage 3 (docs/design.md §8: sources, turns, lengths, skips; batch keys: ``collate``).

    Args:
        tokens: what every LLM view shares (``TokenSource``: tokenizer, vocabulary, seq_len, exports, clips, ...).
        conversations: local annotation file(s) of the training videos (synthetic ``qa.json``, Video-ChatGPT
            JSON or LLaVA-form video conversations).
        val_conversations: the same for the validation shards (None: ``conversations``).
        conversation_format: ``auto`` (by keys) | ``synthetic_qa`` | ``video_qa`` | ``llava``.
        turns: ``"separate"`` (one example per annotation item) or ``"merged"`` (one conversation per video).
        image_conversations: LLaVA JSON of image (and text-only) conversations to mix in (None: none).
        val_image_conversations: the same for validation (None: validation has video conversations only).
        image_root: directory the ``image`` paths are relative to.
        weights: mixing weights, ``video`` and ``image``, in conversations.
        template: ``"v1"`` (LLaVA v1.5; paper) or ``"video_lavit_release"``.
        overlong: ``"skip"`` or ``"truncate"`` conversations longer than ``seq_len``.
        pack: pack conversations into rows (True) or one conversation per row (False).
    """

    name = "instruction_sequence"

    def __init__(self, tokens: TokenSource, conversations: str | list[str] | None = None,
                 val_conversations: str | list[str] | None = None, conversation_format: ConversationFormat = "auto",
                 turns: Literal["separate", "merged"] = "separate",
                 image_conversations: str | None = None, val_image_conversations: str | None = None,
                 image_root: str | None = None, weights: dict[str, float] | None = None, template: str = "v1",
                 overlong: Literal["skip", "truncate"] = "skip", pack: bool = True):
        super().__init__(tokens)
        as_list = lambda x: [x] if isinstance(x, str) else list(x or [])  # noqa: E731
        self.conversations, self.val_conversations = as_list(conversations), as_list(val_conversations)
        self.conversation_format, self.turns = conversation_format, turns
        self.image_conversations, self.val_image_conversations = image_conversations, val_image_conversations
        self.image_root = image_root
        self.weights = dict(weights) if weights is not None else {"video": 1.0, "image": 1.0}
        self.overlong, self.pack = overlong, bool(pack)
        self.instruct_stats = InstructStats()
        self.template_name, self.template = template, template_by_name(template)
        if not self.conversations:
            raise ValueError("InstructionSequenceView needs conversations (a local QA / conversation file of the "
                             "training videos)")
        if turns not in ("separate", "merged"):
            raise ValueError(f"turns must be 'separate' or 'merged', got {turns!r}")
        if overlong not in ("skip", "truncate"):
            raise ValueError(f"overlong must be 'skip' or 'truncate', got {overlong!r}")
        unknown = set(self.weights) - {"video", "image"}
        if unknown or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights name the sources 'video' and 'image' with non-negative values, "
                             f"got {self.weights}")
        if (image_conversations or val_image_conversations) and self.image_tokenizer_export is None:
            raise ValueError("image conversations are tokenised by a keyframe tokenizer: set image_tokenizer_export "
                             "(or tokenizer_exports)")
        self._indexes: dict[bool, dict[str, list[ConversationSample]]] = {}
        self._images: dict[bool, list[ConversationSample]] = {}

    # ---- annotations ----------------------------------------------------------------------------
    def video_index(self, train: bool) -> dict[str, list[ConversationSample]]:
        """Conversations by shard key for the training or validation videos (read once per process)."""
        if train not in self._indexes:
            files = self.conversations if train or not self.val_conversations else self.val_conversations
            samples = [s for path in files for s in read_conversations(path, self.conversation_format)]
            self._indexes[train] = index_by_video(samples)
        return self._indexes[train]

    def conversations_of(self, key: str, meta: dict | None, train: bool) -> list[ConversationSample]:
        """The video's annotation items: by shard key, else by the file name part of its source id."""
        index = self.video_index(train)
        found = index.get(key)
        if found is None and meta is not None and meta.get("source_id"):
            found = index.get(video_key(Path(str(meta["source_id"])).name))
        if found is None and "__" in key:
            found = index.get(key.rsplit("__", 1)[-1])
        return found or []

    # ---- documents ------------------------------------------------------------------------------
    def encode(self, messages: list[Message], visual_ids: list[list[int]], key: str) -> TokenSequence | None:
        """The v1-encoded conversation, or None (counted) when it is too long."""
        doc = self.template.encode(messages, self.tokenizer, visual_ids)
        if len(doc) > self.seq_len:
            if self.overlong == "skip":
                return self._too_long(key, f"{len(doc)} tokens > seq_len {self.seq_len}")
            doc = TokenSequence(doc.input_ids[: self.seq_len], doc.labels[: self.seq_len])
            if all(label == IGNORE_INDEX for label in doc.labels[1:]):
                return self._too_long(key, f"no assistant token within seq_len {self.seq_len}")
            self.instruct_stats.truncated += 1
            log.info("truncated a conversation of %s to seq_len %d", key, self.seq_len)
        self.instruct_stats.conversations += 1
        return doc

    def _too_long(self, key: str, detail: str) -> None:
        """Count a conversation that does not fit a row; a stream where none fits is a configuration error
        (training would otherwise read the resampled shards forever without producing a batch)."""
        SKIPS.record(key, CONVERSATION_TOO_LONG, detail)
        self.instruct_stats.too_long += 1
        if self.instruct_stats.too_long >= ALL_TOO_LONG_AFTER and self.instruct_stats.conversations == 0:
            raise ValueError(f"InstructionSequenceView: the first {self.instruct_stats.too_long} conversations are "
                             f"all longer than seq_len={self.seq_len} (e.g. {detail}); raise seq_len, lower "
                             f"max_clips, use turns='separate' or overlong='truncate'")
        return None

    def video_conversations(self, items: list[ConversationSample], train: bool,
                            rng: random.Random) -> list[list[Message]]:
        """The message lists to encode for one video (``turns``); each has one ``<video>`` placeholder."""
        if self.turns == "separate":
            return [list(item.messages) for item in items]
        order = list(items)
        if train:
            rng.shuffle(order)
        merged: list[Message] = []
        for k, item in enumerate(order):
            for m in item.messages:
                text = m.text.replace(VIDEO_PLACEHOLDER, "").strip() if m.text is not None else m.text
                if k == 0 and m.role == "user" and not merged:
                    text = f"{VIDEO_PLACEHOLDER}\n{text}"
                merged.append(Message(m.role, text))
        return [merged]

    def questions_of(self, key: str, items: list[ConversationSample], video: list[int]) -> list[dict]:
        """Held-out questions of one video: each item's last assistant turn, prompted by what precedes it."""
        out = []
        for item in items:
            messages = list(item.messages)
            if len(messages) < 2 or messages[-1].role != "assistant":
                continue
            prompt = self.template.generation_prompt(messages[:-1], self.tokenizer, [video])
            question = messages[-2].text.replace(VIDEO_PLACEHOLDER, "").strip()
            out.append({"id": item.sample_id, "video": key, "question": question, "answer": messages[-1].text,
                        "attribute": item.meta.get("attribute"), "prompt_ids": prompt})
        return out

    def video_documents(self, samples: Iterable[dict], train: bool, rng: random.Random,
                        questions: list[dict] | None = None) -> Iterator[TokenSequence]:
        """Conversations of every usable shard video; videos without any are counted (``no_conversation``)."""
        for raw in samples:
            key = raw.get("__key__", "?")
            try:
                sample = self.token_sample(raw)
                items = self.conversations_of(sample.key, sample.meta, train)
                if not items:
                    files = self.conversations if train or not self.val_conversations else self.val_conversations
                    raise errors.VideoSkip(NO_CONVERSATION, f"{key}: not in {files}")
                video = self.video_tokens(sample, train, rng)
            except errors.VideoSkip as skip:
                SKIPS.record(key, skip.reason, skip.detail)
                continue
            if questions is not None:
                questions.extend(self.questions_of(sample.key, items, video))
            for messages in self.video_conversations(items, train, rng):
                doc = self.encode(messages, [video], key)
                if doc is not None:
                    SKIPS.delivered()
                    yield doc

    def image_items(self, train: bool) -> list[ConversationSample]:
        if train not in self._images:
            path = self.image_conversations if train else self.val_image_conversations
            self._images[train] = read_conversations(path, "llava") if path else []
        return self._images[train]

    def image_document(self, item: ConversationSample) -> TokenSequence | None:
        """One LLaVA image (or text-only) conversation; unusable images are counted and skipped."""
        visual: list[list[int]] = []
        if item.media_kind == "video":
            SKIPS.record(item.sample_id, UNSUPPORTED_MEDIA, "video items belong in the video conversations")
            return None
        if item.media_kind == "image":
            path = Path(self.image_root or ".") / item.media
            try:
                if not path.is_file():
                    raise errors.VideoSkip(MISSING_IMAGE, str(path))
                export = self.image_tokenizer_export
                image = load_image(path, self.keyframe_image_size(export))
            except errors.VideoSkip as skip:
                SKIPS.record(item.sample_id, skip.reason, skip.detail)
                return None
            codes = self.image_codes(image[None], export)[0]
            visual = [image_token_ids(codes, self.vocabulary)]
        doc = self.encode(list(item.messages), visual, item.sample_id)
        if doc is not None:
            SKIPS.delivered()
        return doc

    def image_documents(self, train: bool, rng: random.Random) -> Iterator[TokenSequence] | None:
        """This reader's share of the image conversations: endless and reshuffled per pass in training, one
        pass in file order for validation; None without a file or weight."""
        if self.weights.get("image", 0.0) <= 0 or not (self.image_conversations if train else
                                                       self.val_image_conversations):
            return None
        items = self.image_items(train)
        if not items:
            raise ValueError(f"{self.image_conversations if train else self.val_image_conversations} holds no item")
        slot, slots = reader_slot()
        mine = items[slot::slots] or items  # fewer items than readers: draw from all

        def one_pass(order: list[ConversationSample]) -> Iterator[TokenSequence]:
            for item in order:
                doc = self.image_document(item)
                if doc is not None:
                    yield doc

        def endless() -> Iterator[TokenSequence]:
            while True:
                order = list(mine)
                rng.shuffle(order)
                yield from one_pass(order)

        return endless() if train else one_pass(mine)

    def documents(self, samples: Iterable[dict], train: bool, rng: random.Random,
                  questions: list[dict] | None = None) -> Iterator[TokenSequence]:
        """The mixed conversation stream (video conversations from the shards, image conversations)."""
        from videolavit.llm.sequences import SourceMixer

        sources: dict[str, Iterable] = {}
        weights: dict[str, float] = {}
        if self.weights.get("video", 0.0) > 0:
            sources["video"] = self.video_documents(samples, train, rng, questions)
            weights["video"] = self.weights["video"]
        images = self.image_documents(train, rng)
        if images is not None:
            sources["image"], weights["image"] = images, self.weights["image"]
        if not sources:
            raise ValueError("InstructionSequenceView: no source to draw from (check weights and files)")
        mixer = SourceMixer(sources, weights, seed=rng.randrange(2 ** 31), on_exhausted="stop" if train else "drop")
        for _, doc in mixer:
            yield doc

    def __call__(self, samples: Iterable[dict], train: bool = False, rng: random.Random | None = None
                 ) -> Iterator[PackedRow]:
        rng = rng or random.Random(0)
        pending: list[dict] | None = None if train else []
        docs = self.documents(samples, train, rng, pending)
        pad = self.tokenizer.pad_token_id
        if self.pack:
            rows = pack_documents(docs, seq_len=self.seq_len, pad_id=pad, open_rows=self.open_rows, stats=self.stats)
        else:
            rows = (row for doc in docs for row in pack_documents([doc], seq_len=self.seq_len, pad_id=pad,
                                                                   stats=self.stats))
        for row in rows:
            if pending is None:
                yield row
                continue
            # A question is pending from the moment its video is read; its conversations are in this row or a
            # later one, so every question leaves with some row (exactly once).
            yield InstructRow(**{f.name: getattr(row, f.name) for f in dataclasses.fields(PackedRow)},
                              questions=list(pending))
            pending.clear()

    def collate(self, examples: list[PackedRow]) -> dict:
        """Rows -> a batch (``B`` rows of ``L = seq_len``) with exactly the keys of ``PretrainSequenceView``, so the
        stage-2 loss code runs unchanged:

        ==================  ============================================================================
        ``input_ids``       long [B, L]; padding = the tokenizer's pad id
        ``labels``          long [B, L]; the token where it is an assistant target, else -100
        ``position_ids``    long [B, L]; restart at 0 for every conversation and for the padding tail
        ``document_ids``    long [B, L]; conversation index within the row, -1 on padding
        ``modality``        long [B, L]; ``Vocabulary.modality_of(input_ids)``
        ``cu_seqlens``      int32 [segments + 1]; ``max_seqlen`` int
        ==================  ============================================================================

        plus, in validation only, ``questions``: a list (over the batch) of held-out questions of the videos read
        so far, ``{"id", "video", "question", "answer", "attribute", "prompt_ids"}`` with ``prompt_ids`` the
        generation prompt (``... USER: <video ids>\\n{question} ASSISTANT:``); stage 3 answers some of them
        greedily at the end of validation. Every validation question travels in exactly one batch.
        """
        batch = super().collate(examples)
        if any(isinstance(row, InstructRow) for row in examples):
            batch["questions"] = [q for row in examples for q in getattr(row, "questions", [])]
        return batch


__all__ = ["InstructionSequenceView", "InstructRow", "read_conversations", "video_key", "index_by_video",
           "load_image", "NO_CONVERSATION", "CONVERSATION_TOO_LONG", "MISSING_IMAGE", "UNREADABLE_IMAGE",
           "UNSUPPORTED_MEDIA"]
