"""Instruction-tuning conversations: the LLaVA "v1" template, turn masking, and dataset readers.

Instruction tuning puts the loss on the assistant turns only, and the ids it trains on must equal the ids
inference builds, whatever the tokenizer's merge rules. ``ConversationTemplate`` renders a conversation, encodes
it into ``input_ids`` and aligned ``labels`` (``sequences`` conventions) and gives the same format as a Hugging
Face chat template for the exports; ``LLAVA_V1`` (the paper's, the default) and ``VIDEO_LAVIT_RELEASE`` (the
release's separator) are its two instances. The readers turn LLaVA, Video-ChatGPT and synthetic QA files into
``ConversationSample``s. Rendering, masking and id rules: docs/design.md §8 ("Conversation templates").
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from videolavit.llm.sequences import IGNORE_INDEX, TokenSequence

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")

LLAVA_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                       "The assistant gives helpful, detailed, and polite answers to the user's questions.")

Role = Literal["user", "assistant"]
_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn. ``text=None`` is allowed only for a final assistant turn: the generation prompt."""

    role: Role
    text: str | None


@dataclasses.dataclass(frozen=True)
class _Piece:
    literal: str             # how the piece reads in the rendered string
    ids: list[int] | None    # token ids inserted as-is, or None for text to tokenize
    supervised: bool


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """A two-role, two-separator chat template (LLaVA ``SeparatorStyle.TWO``)."""

    system: str = LLAVA_SYSTEM_PROMPT
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "       # after the system prompt and after each user turn
    sep2: str = "</s>"   # after each assistant turn; the eos token inside it is inserted by id

    def render(self, messages: Sequence[Message]) -> str:
        """The conversation as text (no bos), e.g. for display or a slow-tokenizer check."""
        return "".join(p.literal for p in self._pieces(messages, eos_token=None, eos_id=None, visual_ids=None))

    def encode(self, messages: Sequence[Message], tokenizer, visual_ids: Sequence[Sequence[int]] = (),
               add_bos: bool = True) -> TokenSequence:
        """Token ids and labels (loss on assistant turns only); ``visual_ids[k]`` replaces the k-th placeholder."""
        pieces = self._pieces(messages, eos_token=tokenizer.eos_token, eos_id=tokenizer.eos_token_id,
                              visual_ids=[list(v) for v in visual_ids])
        if add_bos:
            pieces.insert(0, _Piece("", [tokenizer.bos_token_id], False))
        input_ids: list[int] = []
        labels: list[int] = []
        run: list[_Piece] = []

        def flush() -> None:
            if not run:
                return
            text = "".join(p.literal for p in run)
            spans, start = [], 0
            for p in run:
                spans.append((start, start + len(p.literal), p.supervised))
                start += len(p.literal)
            enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)
            for token_id, (begin, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
                supervised = next((s for lo, hi, s in spans if lo <= begin < hi), False)
                input_ids.append(token_id)
                labels.append(token_id if supervised else IGNORE_INDEX)
            run.clear()

        for piece in pieces:
            if piece.ids is None:
                if piece.literal:
                    run.append(piece)
                continue
            flush()
            input_ids.extend(piece.ids)
            labels.extend(piece.ids if piece.supervised else [IGNORE_INDEX] * len(piece.ids))
        flush()
        return TokenSequence(input_ids, labels)

    def generation_prompt(self, messages: Sequence[Message], tokenizer,
                          visual_ids: Sequence[Sequence[int]] = ()) -> list[int]:
        """Ids of ``messages`` followed by ``ASSISTANT:``: what the model continues at inference."""
        return self.encode([*messages, Message("assistant", None)], tokenizer, visual_ids).input_ids

    def chat_template(self) -> str:
        """This template as a Hugging Face (Jinja) chat template (docs/design.md §8)."""
        def lit(text: str) -> str:  # a Jinja string literal (JSON escapes are Jinja escapes too)
            return json.dumps(text)

        return (
            "{%- set ns = namespace(system=" + lit(self.system) + ", start=0) -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}{%- endif -%}"
            "{{- bos_token + ns.system + " + lit(self.sep) + " -}}"
            "{%- for message in messages[ns.start:] -%}"
            "{%- set user = (loop.index0 % 2 == 0) -%}"
            "{%- if message['role'] != ('user' if user else 'assistant') -%}"
            "{{- raise_exception('turns must alternate user/assistant, starting with the user (one optional "
            "system message first)') -}}{%- endif -%}"
            "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
            "{%- else -%}{%- set content = namespace(text='') -%}"
            "{%- for item in message['content'] -%}"
            "{%- if item['type'] == 'video' -%}{%- set content.text = content.text + " + lit(VIDEO_PLACEHOLDER + "\n")
            + " -%}{%- elif item['type'] == 'image' -%}{%- set content.text = content.text + "
            + lit(IMAGE_PLACEHOLDER + "\n") + " -%}{%- else -%}{%- set content.text = content.text + item['text'] -%}"
            "{%- endif -%}{%- endfor -%}{%- set content = content.text -%}{%- endif -%}"
            "{%- if user -%}{{- " + lit(self.user_role + ": ") + " + content + " + lit(self.sep) + " -}}"
            "{%- else -%}{{- " + lit(self.assistant_role + ": ") + " + content + " + lit(self.sep2) + " -}}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + lit(self.assistant_role + ":") + " -}}{%- endif -%}"
        )

    # ---------------------------------------------------------------------------------------------
    def _sep2_pieces(self, eos_token: str | None, eos_id: int | None) -> list[_Piece]:
        if eos_token is None or eos_token not in self.sep2:
            if eos_token is not None:
                raise ValueError(f"sep2 {self.sep2!r} does not contain the tokenizer's eos {eos_token!r}")
            return [_Piece(self.sep2, None, True)]
        out: list[_Piece] = []
        for k, part in enumerate(self.sep2.split(eos_token)):
            if k:
                out.append(_Piece(eos_token, [eos_id], True))
            out.append(_Piece(part, None, True))
        return out

    def _pieces(self, messages: Sequence[Message], eos_token: str | None, eos_id: int | None,
                visual_ids: list[list[int]] | None) -> list[_Piece]:
        _check_turns(messages)
        pieces = [_Piece(self.system + self.sep, None, False)]
        remaining = None if visual_ids is None else list(visual_ids)
        for m in messages:
            role = self.user_role if m.role == "user" else self.assistant_role
            if m.text is None:
                pieces.append(_Piece(role + ":", None, False))
                break
            assistant = m.role == "assistant"
            pieces.append(_Piece(role + ":", None, False))
            # The space after the colon belongs to the answer: the prompt stops at the colon.
            for k, chunk in enumerate(_PLACEHOLDER.split(" " + m.text)):
                if k % 2 == 0:
                    pieces.append(_Piece(chunk, None, assistant))
                elif remaining is None:
                    pieces.append(_Piece(chunk, None, assistant))
                else:
                    if not remaining:
                        raise ValueError("more <image>/<video> placeholders than visual inputs")
                    pieces.append(_Piece(chunk, remaining.pop(0), assistant))
            pieces += self._sep2_pieces(eos_token, eos_id) if assistant else [_Piece(self.sep, None, False)]
        if remaining:
            raise ValueError(f"{len(remaining)} visual input(s) left without a placeholder")
        return pieces


def encode_rendered(text: str, tokenizer, visual_ids: Sequence[Sequence[int]] = ()) -> list[int]:
    """Ids of a rendered chat (``apply_chat_template(..., tokenize=False)``) with ``visual_ids[k]`` in
    place of its k-th ``<image>``/``<video>`` placeholder; the text is tokenized without adding specials."""
    chunks = _PLACEHOLDER.split(text)
    if len(chunks) // 2 != len(visual_ids):
        raise ValueError(f"{len(chunks) // 2} <image>/<video> placeholder(s) but {len(visual_ids)} visual input(s)")
    ids: list[int] = []
    for k, chunk in enumerate(chunks):
        if k % 2:
            ids.extend(int(i) for i in visual_ids[k // 2])
        elif chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def _check_turns(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m.role != expected:
            raise ValueError(f"message {i} is from {m.role!r}; turns must alternate starting with the user")
        if m.text is None and (m.role != "assistant" or i != len(messages) - 1):
            raise ValueError("only the last (assistant) message may be empty")


LLAVA_V1 = ConversationTemplate()
VIDEO_LAVIT_RELEASE = ConversationTemplate(sep2=" \\n </s>")


# ============================================================================================ readers
@dataclasses.dataclass(frozen=True)
class ConversationSample:
    """One instruction sample: its media (path or id; None for text-only) and its turns."""

    sample_id: str
    media: str | None
    media_kind: Literal["image", "video"] | None
    messages: tuple[Message, ...]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _load(source: str | Path | list) -> list:
    if isinstance(source, (str, Path)):
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    else:
        data = source
    if not isinstance(data, list):
        raise ValueError("expected a JSON list of samples")
    return data


def _place_media(messages: list[Message], placeholder: str) -> list[Message]:
    """LLaVA's normalisation: the placeholder leads its message, followed by a newline.

    A message mentioning it has all mentions removed and ``placeholder + "\\n"`` put in front; if no
    message mentions it, it is put in front of the first user message.
    """
    out, seen = [], False
    for m in messages:
        if m.text is not None and placeholder in m.text:
            seen = True
            m = Message(m.role, placeholder + "\n" + m.text.replace(placeholder, "").strip())
        out.append(m)
    if not seen:
        out[0] = Message(out[0].role, placeholder + "\n" + (out[0].text or "").strip())
    return out


def _messages_from_llava(turns: list[dict]) -> list[Message]:
    messages = []
    for turn in turns:
        role = _ROLE_NAMES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"unknown speaker {turn.get('from')!r}")
        messages.append(Message(role, str(turn["value"])))
    if messages and messages[0].role != "user":
        messages = messages[1:]  # LLaVA skips a leading assistant turn
    _check_turns(messages)
    return messages


def _conversation_sample(item: dict, index: int) -> ConversationSample:
    if "image" in item:
        media, kind, placeholder = str(item["image"]), "image", IMAGE_PLACEHOLDER
    elif "video" in item or "video_id" in item:
        media, kind, placeholder = str(item.get("video", item.get("video_id"))), "video", VIDEO_PLACEHOLDER
    else:
        media, kind, placeholder = None, None, None
    messages = _messages_from_llava(item["conversations"])
    if placeholder is not None:
        messages = _place_media(messages, placeholder)
    sample_id = str(item.get("id", media if media is not None else index))
    return ConversationSample(sample_id, media, kind, tuple(messages))


def read_llava_conversations(source: str | Path | list) -> list[ConversationSample]:
    """LLaVA-style JSON (e.g. LLaVA-665k): ``[{"id", "image"?, "conversations": [{"from", "value"}]}]``.

    Items without ``image`` are text-only; items with ``video`` are read as video conversations.
    """
    return [_conversation_sample(item, i) for i, item in enumerate(_load(source))]


def read_video_qa(source: str | Path | list) -> list[ConversationSample]:
    """Video-ChatGPT-style video QA: ``[{"video_id" or "video", "q", "a"}]`` or the conversation form.

    A q/a item becomes one exchange ``<video>\\n{q}`` -> ``{a}``.
    """
    samples = []
    for i, item in enumerate(_load(source)):
        if "conversations" in item:
            sample = _conversation_sample(item, i)
            if sample.media_kind != "video":
                raise ValueError(f"item {i} has no video")
            samples.append(sample)
            continue
        media = item.get("video_id", item.get("video"))
        if media is None or "q" not in item or "a" not in item:
            raise ValueError(f"item {i} needs video_id/video, q and a")
        messages = (Message("user", VIDEO_PLACEHOLDER + "\n" + str(item["q"]).strip()),
                    Message("assistant", str(item["a"]).strip()))
        samples.append(ConversationSample(f"{media}#{i}", str(media), "video", messages))
    return samples


def read_synthetic_qa(source: str | Path | list) -> list[ConversationSample]:
    """Our synthetic corpus's ``qa.json``: ``[{"video_id", "question", "answer", "attribute"}]``.

    The attribute (what the question asks about) is kept in ``meta`` so answers can be scored per kind.
    """
    samples = []
    for i, item in enumerate(_load(source)):
        missing = {"video_id", "question", "answer"} - set(item)
        if missing:
            raise ValueError(f"item {i} lacks {sorted(missing)}")
        messages = (Message("user", VIDEO_PLACEHOLDER + "\n" + str(item["question"]).strip()),
                    Message("assistant", str(item["answer"]).strip()))
        samples.append(ConversationSample(f"{item['video_id']}#{i}", str(item["video_id"]), "video", messages,
                                          {"attribute": item.get("attribute")}))
    return samples
