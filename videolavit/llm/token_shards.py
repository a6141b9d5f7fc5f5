"""The token shard sample contract between the tokenize job (writer) and the LLM views (readers); DESIGN §3.

One WebDataset sample per source video, under the video shard's key:

==================  ==========================================================================================
``__key__``         the prepared shard's key (sanitised source id)
``txt``             caption, UTF-8
``json``            ``{"source_id", "fps", "num_frames", "iframes", "width", "height", "clip_starts",
                    "keyframe_lengths" (list, or null without keyframe codes), "codes": {"fingerprint",
                    "motion_codes", "visual_codes" (null without keyframe codes)}}``
``motion_ids.npy``  uint16 (int32 above 65536 codes) [clips, motion tokens]: motion code ids in [0, motion_codes)
``keyframe_ids.npy`` the same dtype, [sum of keyframe_lengths]: every clip's keyframe code ids, concatenated
                    (variable length per clip); absent without a keyframe tokenizer
==================  ==========================================================================================

Clips are those of ``clip_starts`` (``select_clip_starts`` at the job's ``max_clips``), in time order; codes, not
LLM ids, so the shards do not depend on the text vocabulary. ``decode_token_sample`` checks every field against
the reader's vocabulary: a corrupt member, ids outside the codebook or a clip without motion ids is a
``TokenSampleSkip`` (a counted skip), shards of another tokenizer (code counts or fingerprint) a
``TokenizerMismatchError`` - never a silent mix.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Collection

import numpy as np

from videolavit.llm.vocabulary import Vocabulary
from videolavit.video import errors

CAPTION, META, MOTION_IDS, KEYFRAME_IDS = "txt", "json", "motion_ids.npy", "keyframe_ids.npy"
TOKEN_FIELDS = (CAPTION, META, MOTION_IDS)

# skip reasons (counted by the readers)
IDS_OUT_OF_RANGE = "ids_out_of_range"
MISSING_MOTION_IDS = "missing_motion_ids"
MISSING_KEYFRAME_IDS = "missing_keyframe_ids"
MISSING_TOKENS = "missing_tokens"  # a clip the reader selects is not in the token sample

META_KEYS = ("source_id", "fps", "num_frames", "iframes", "width", "height")


class TokenSampleSkip(errors.VideoSkip):
    """A token sample that cannot be used (``reason`` names why); readers count it and go on."""


class TokenizerMismatchError(ValueError):
    """Token shards written by other tokenizer exports than the reader's vocabulary (or fingerprint) expects."""


def code_dtype(num_codes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_codes <= 1 << 16 else np.dtype(np.int32)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_token_sample(key: str, caption: str, meta: dict, clip_starts: list[int], motions: np.ndarray,
                        keyframes: list[np.ndarray] | None, fingerprint: str, motion_codes: int,
                        visual_codes: int | None) -> dict[str, bytes]:
    """The tar members of one video (see the module docstring)."""
    motions = np.asarray(motions)
    if motions.ndim != 2 or motions.shape[0] != len(clip_starts) or motions.shape[1] == 0:
        raise ValueError(f"{key}: motion ids {motions.shape} for {len(clip_starts)} clips")
    record = {name: meta.get(name) for name in META_KEYS}
    record.update(clip_starts=[int(s) for s in clip_starts],
                  keyframe_lengths=[int(len(k)) for k in keyframes] if keyframes is not None else None,
                  codes={"fingerprint": fingerprint, "motion_codes": int(motion_codes),
                         "visual_codes": int(visual_codes) if keyframes is not None else None})
    members = {"__key__": key, CAPTION: caption.encode("utf-8"),
               META: json.dumps(record, sort_keys=True).encode("utf-8"),
               MOTION_IDS: _npy(motions.astype(code_dtype(motion_codes)))}
    if keyframes is not None:
        flat = np.concatenate([np.asarray(k, dtype=np.int64) for k in keyframes]) if keyframes else np.zeros(0)
        members[KEYFRAME_IDS] = _npy(flat.astype(code_dtype(visual_codes)))
    return members


@dataclasses.dataclass
class TokenSample:
    """A decoded token sample: codes (not LLM ids) per clip, keyed by clip start."""

    key: str
    caption: str
    meta: dict  # META_KEYS of the source video (what clip selection needs) + clip_starts, codes
    clip_starts: list[int]
    motions: np.ndarray  # [clips, tokens]
    keyframes: list[np.ndarray] | None  # per clip, variable length; None without keyframe codes

    def clips(self, starts: list[int]) -> tuple[list[np.ndarray] | None, np.ndarray]:
        """(keyframes, motions) of the clips at ``starts``; ``TokenSampleSkip(MISSING_TOKENS)`` if one is absent."""
        index = {s: i for i, s in enumerate(self.clip_starts)}
        missing = [s for s in starts if s not in index]
        if missing:
            raise TokenSampleSkip(MISSING_TOKENS, f"{self.key}: clips {missing} not tokenised "
                                                  f"(token sample has {self.clip_starts})")
        rows = [index[s] for s in starts]
        keyframes = [self.keyframes[i] for i in rows] if self.keyframes is not None else None
        return keyframes, self.motions[rows]


def _check_codes(codes: dict, vocabulary: Vocabulary, fingerprints: Collection[str] | None, need_keyframes: bool,
                 key: str) -> None:
    if codes.get("motion_codes") != vocabulary.motion_codes or (
            codes.get("visual_codes") is not None and codes["visual_codes"] != vocabulary.visual_codes):
        raise TokenizerMismatchError(
            f"token sample {key} was written by tokenizers with {codes.get('motion_codes')} motion / "
            f"{codes.get('visual_codes')} keyframe codes, the vocabulary has {vocabulary.motion_codes} / "
            f"{vocabulary.visual_codes}: tokenize the shards with this stage's stage-1 exports")
    if fingerprints is not None and codes.get("fingerprint") not in fingerprints:
        raise TokenizerMismatchError(
            f"token sample {key} was written with tokenizer exports {str(codes.get('fingerprint'))[:12]}…, the "
            f"stage expects {' or '.join(f[:12] + '…' for f in fingerprints)} (those in tokenizer_exports): "
            "tokenize the shards with the stage's exports")
    if need_keyframes and codes.get("visual_codes") is None:
        raise TokenizerMismatchError(f"token sample {key} has no keyframe codes (tokenized without a keyframe "
                                     "tokenizer) but the view reads keyframes; set keyframe_source: none or "
                                     "tokenize with a keyframe export")


def decode_token_sample(raw: dict, vocabulary: Vocabulary, need_keyframes: bool = True,
                        fingerprints: Collection[str] | None = None) -> TokenSample:
    """Parse and check one raw token sample (see the module docstring for what is a skip and what an error).

    ``fingerprints``: the export fingerprints the reader accepts (None: any with the vocabulary's code counts)."""
    key = raw.get("__key__", "?")
    if MOTION_IDS not in raw:
        raise TokenSampleSkip(MISSING_MOTION_IDS, f"{key}: no {MOTION_IDS} member")
    missing = [name for name in (CAPTION, META) if name not in raw]
    if missing:
        raise TokenSampleSkip(errors.CORRUPT_SAMPLE, f"{key}: missing member(s) {missing}")
    try:
        meta = json.loads(raw[META])
        caption = raw[CAPTION].decode("utf-8")
        motions = np.load(io.BytesIO(raw[MOTION_IDS]), allow_pickle=False)
        flat = (np.load(io.BytesIO(raw[KEYFRAME_IDS]), allow_pickle=False)
                if need_keyframes and KEYFRAME_IDS in raw else None)
        codes, starts = meta["codes"], [int(s) for s in meta["clip_starts"]]
    except (ValueError, UnicodeDecodeError, OSError, EOFError, KeyError, TypeError) as exc:
        raise TokenSampleSkip(errors.CORRUPT_SAMPLE, f"{key}: {type(exc).__name__}: {exc}") from None
    _check_codes(codes, vocabulary, fingerprints, need_keyframes, key)
    if motions.ndim != 2 or motions.shape[0] != len(starts) or not starts:
        raise TokenSampleSkip(errors.CORRUPT_SAMPLE, f"{key}: motion ids {motions.shape} for clips {starts}")
    if motions.shape[1] == 0:
        raise TokenSampleSkip(MISSING_MOTION_IDS, f"{key}: clips without motion ids")
    if motions.dtype.kind not in "iu" or int(motions.min()) < 0 or int(motions.max()) >= vocabulary.motion_codes:
        raise TokenSampleSkip(IDS_OUT_OF_RANGE, f"{key}: motion ids outside [0, {vocabulary.motion_codes})")
    keyframes = None
    if need_keyframes:
        lengths = meta.get("keyframe_lengths")
        if flat is None or lengths is None:
            raise TokenSampleSkip(MISSING_KEYFRAME_IDS, f"{key}: no {KEYFRAME_IDS} member")
        if flat.ndim != 1 or len(lengths) != len(starts) or sum(lengths) != flat.size:
            raise TokenSampleSkip(errors.CORRUPT_SAMPLE, f"{key}: keyframe ids {flat.shape} for lengths {lengths}")
        if min(lengths) <= 0:
            raise TokenSampleSkip(MISSING_KEYFRAME_IDS, f"{key}: a clip without keyframe ids")
        if flat.dtype.kind not in "iu" or int(flat.min()) < 0 or int(flat.max()) >= vocabulary.visual_codes:
            raise TokenSampleSkip(IDS_OUT_OF_RANGE, f"{key}: keyframe ids outside [0, {vocabulary.visual_codes})")
        keyframes = np.split(flat, np.cumsum(lengths)[:-1])
    return TokenSample(key, caption, meta, starts, motions, keyframes)


__all__ = ["encode_token_sample", "decode_token_sample", "TokenSample", "TokenSampleSkip", "TokenizerMismatchError",
           "code_dtype", "TOKEN_FIELDS", "IDS_OUT_OF_RANGE", "MISSING_MOTION_IDS", "MISSING_KEYFRAME_IDS",
           "MISSING_TOKENS"]
