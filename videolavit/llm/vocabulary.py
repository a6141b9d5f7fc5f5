"""The LLM's token-id layout: text ids, then image markers and keyframe codes, then motion markers and codes.

This is the one place the layout lives (docs/design.md §8). Every id is derived from three sizes, so the
released layout (``Vocabulary.release()``, Llama-2 text vocabulary of 32000) and tiny test layouts (a 300-token
text vocabulary) share all code paths; ``Vocabulary``'s docstring draws the layout.

An LLM export records its layout in ``videolavit_vocabulary.json`` (``write_vocabulary_file`` /
``read_vocabulary_file``): the three sizes, which are all a reader needs, and the ids derived from them, for
people and other programs reading the file (checked against the sizes when read).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from videolavit.atomic_files import write_text_atomic

VOCABULARY_FILE = "videolavit_vocabulary.json"  # beside the model in an LLM export
SIZE_FIELDS = ("text_size", "visual_codes", "motion_codes")
DERIVED_FIELDS = ("size", "image_start_id", "image_end_id", "visual_offset", "motion_start_id", "motion_end_id",
                  "motion_offset")


class VocabularyError(ValueError):
    """A code or token id lies outside the range it was claimed to belong to."""


class VocabularyFileError(ValueError):
    """A directory's vocabulary file is missing, unreadable, or contradicts itself."""


class Modality(enum.IntEnum):
    """What a token id stands for; values are what ``Vocabulary.modality_of`` returns."""

    TEXT = 0
    KEYFRAME = 1
    MOTION = 2
    SPECIAL = 3  # the four block markers [IMG] [/IMG] [MOV] [/MOV]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Id layout of the unified text + keyframe + motion vocabulary (release defaults)::

        [0, text_size)                       text (Llama tokenizer ids; bos/eos/unk are in here)
        text_size                            [IMG]   32000 in the release
        text_size + 1                        [/IMG]  32001
        [text_size + 2, +visual_codes)       keyframe (LaVIT visual) codes 32002-48385
        next                                 [MOV]   48386
        next + 1                             [/MOV]  48387
        [next + 2, +motion_codes)            motion codes 48388-49411
        size                                 49412 = rows of the LLM embedding / lm_head

    The release checks the same numbers (``motion_tokens + 32000 + 16384 + 4`` for motion codes,
    ``image_token - 32002`` for keyframe codes, and ``motion_vocab_size=1026`` = 1024 codes + 2 markers).
    """

    text_size: int = 32000
    visual_codes: int = 16384
    motion_codes: int = 1024

    def __post_init__(self) -> None:
        for name in ("text_size", "visual_codes", "motion_codes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise VocabularyError(f"{name} must be a positive int, got {value!r}")

    @classmethod
    def release(cls) -> "Vocabulary":
        """The layout of the released Video-LaVIT checkpoints (Llama-2 text vocabulary)."""
        return cls(text_size=32000, visual_codes=16384, motion_codes=1024)

    # ------------------------------------------------------------------ marker ids
    @property
    def image_start_id(self) -> int:
        """``[IMG]``: opens a keyframe (or image) block."""
        return self.text_size

    @property
    def image_end_id(self) -> int:
        """``[/IMG]``: closes a keyframe block."""
        return self.text_size + 1

    @property
    def visual_offset(self) -> int:
        """Id of keyframe code 0."""
        return self.text_size + 2

    @property
    def motion_start_id(self) -> int:
        """``[MOV]``: opens a motion block."""
        return self.visual_offset + self.visual_codes

    @property
    def motion_end_id(self) -> int:
        """``[/MOV]``: closes a motion block."""
        return self.motion_start_id + 1

    @property
    def motion_offset(self) -> int:
        """Id of motion code 0."""
        return self.motion_start_id + 2

    @property
    def size(self) -> int:
        """Total number of ids: the LLM's embedding rows."""
        return self.motion_offset + self.motion_codes

    def __len__(self) -> int:
        return self.size

    @property
    def special_ids(self) -> tuple[int, int, int, int]:
        """The block markers, in layout order: [IMG], [/IMG], [MOV], [/MOV]."""
        return (self.image_start_id, self.image_end_id, self.motion_start_id, self.motion_end_id)

    # ------------------------------------------------------------------ ranges
    @property
    def text_range(self) -> range:
        return range(0, self.text_size)

    @property
    def visual_range(self) -> range:
        return range(self.visual_offset, self.visual_offset + self.visual_codes)

    @property
    def motion_range(self) -> range:
        return range(self.motion_offset, self.motion_offset + self.motion_codes)

    # ------------------------------------------------------------------ code <-> id
    def visual_id(self, code):
        """Keyframe code(s) in [0, visual_codes) -> token id(s); raises ``VocabularyError`` outside."""
        return _shift(code, 0, self.visual_codes, self.visual_offset, "keyframe code")

    def motion_id(self, code):
        """Motion code(s) in [0, motion_codes) -> token id(s); raises ``VocabularyError`` outside."""
        return _shift(code, 0, self.motion_codes, self.motion_offset, "motion code")

    def visual_code(self, token_id):
        """Inverse of ``visual_id``; raises ``VocabularyError`` for ids that are not keyframe codes."""
        return _shift(token_id, self.visual_offset, self.visual_offset + self.visual_codes,
                      -self.visual_offset, "keyframe token id")

    def motion_code(self, token_id):
        """Inverse of ``motion_id``; raises ``VocabularyError`` for ids that are not motion codes."""
        return _shift(token_id, self.motion_offset, self.motion_offset + self.motion_codes,
                      -self.motion_offset, "motion token id")

    # ------------------------------------------------------------------ predicates
    def is_text(self, ids):
        return _in(ids, 0, self.text_size)

    def is_visual(self, ids):
        return _in(ids, self.visual_offset, self.visual_offset + self.visual_codes)

    def is_motion(self, ids):
        return _in(ids, self.motion_offset, self.motion_offset + self.motion_codes)

    def is_special(self, ids):
        """True for the four block markers (not for text bos/eos, which are text ids)."""
        if isinstance(ids, torch.Tensor):
            return torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))
        if isinstance(ids, int):
            return ids in self.special_ids
        return [i in self.special_ids for i in ids]

    def modality_of(self, ids) -> torch.Tensor:
        """Per-id ``Modality`` values as a long tensor of the same shape; raises for ids outside the vocabulary."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        bad = (ids < 0) | (ids >= self.size)
        if bool(bad.any()):
            raise VocabularyError(
                f"token id {int(ids[bad][0])} is outside the vocabulary [0, {self.size})")
        out = torch.full_like(ids, int(Modality.SPECIAL))
        out[self.is_text(ids)] = int(Modality.TEXT)
        out[self.is_visual(ids)] = int(Modality.KEYFRAME)
        out[self.is_motion(ids)] = int(Modality.MOTION)
        return out


def vocabulary_record(vocabulary: Vocabulary) -> dict[str, int]:
    """What ``videolavit_vocabulary.json`` holds: the sizes, then the derived ids."""
    return {name: int(getattr(vocabulary, name)) for name in (*SIZE_FIELDS, *DERIVED_FIELDS)}


def write_vocabulary_file(directory: str | Path, vocabulary: Vocabulary) -> Path:
    """Write ``directory/videolavit_vocabulary.json`` (atomically); returns its path."""
    return write_text_atomic(Path(directory) / VOCABULARY_FILE, json.dumps(vocabulary_record(vocabulary), indent=2))


def read_vocabulary_file(directory: str | Path) -> Vocabulary:
    """The layout recorded in ``directory/videolavit_vocabulary.json``; ``VocabularyFileError`` if the file is
    missing, is not a layout, or records an id its sizes do not give. Files holding the sizes only (and ``size``)
    read too."""
    path = Path(directory) / VOCABULARY_FILE
    if not path.is_file():
        raise VocabularyFileError(f"{directory} has no {VOCABULARY_FILE}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        vocabulary = Vocabulary(**{name: int(record[name]) for name in SIZE_FIELDS})
    except (ValueError, KeyError, TypeError) as exc:
        raise VocabularyFileError(f"{path} is not a readable vocabulary layout: {exc}") from None
    for name in DERIVED_FIELDS:
        if name in record and record[name] != getattr(vocabulary, name):
            raise VocabularyFileError(f"{path} says {name} {record[name]} but its sizes give {getattr(vocabulary, name)}")
    return vocabulary


def _in(ids, low: int, high: int):
    if isinstance(ids, torch.Tensor):
        return (ids >= low) & (ids < high)
    if isinstance(ids, int):
        return low <= ids < high
    return [low <= int(i) < high for i in ids]


def _shift(values, low: int, high: int, delta: int, what: str):
    """Add ``delta`` to values that must all lie in [low, high)."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point():
            raise VocabularyError(f"{what}s must be integers, got dtype {values.dtype}")
        if values.numel() and bool(((values < low) | (values >= high)).any()):
            bad = values[(values < low) | (values >= high)][0]
            raise VocabularyError(f"{what} {int(bad)} is outside [{low}, {high})")
        return values + delta
    if hasattr(values, "tolist") and not isinstance(values, list):  # numpy arrays and scalars
        values = values.tolist()
    if isinstance(values, int) and not isinstance(values, bool):
        if not low <= values < high:
            raise VocabularyError(f"{what} {values} is outside [{low}, {high})")
        return values + delta
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        return [_shift(v, low, high, delta, what) for v in values]
    raise VocabularyError(f"{what} must be an int, a sequence of ints or a tensor, got {type(values).__name__}")
