"""The token shard sample contract between the tokenize job (writer) and the LLM views (readers); docs/design.md §3.

One WebDataset sample per source video, under the video shard's key, holding the caption, the metadata and
one packed array of the clips' codes (members: ``encode_token_sample``'s docstring). Clips are those of
``clip_starts`` (``select_clip_starts`` at the job's ``max_clips``), in time order; codes, not LLM ids, so the
shards do not depend on the text vocabulary. ``decode_token_sample`` checks every field against the reader's
vocabulary: a corrupt member, ids outside the codebook or a clip without motion ids is a ``TokenSampleSkip``
(a counted skip), shards of another tokenizer (code counts or fingerprint) a ``TokenizerMismatchError`` -
never a silent mix.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Collection

import numpy as np

from videolavit.llm.vocabulary import Vocabulary
from videolavit.video import errors

CAPTION, META, IDS = "txt", "json", "ids.npy"
TOKEN_FIELDS = (CAPTION, META, IDS)

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
    """The tar members of one video.

    One WebDataset sample per source video, under the video shard's key:

    ==================  ======================================================================================
    ``__key__``         the prepared shard's key (sanitised source id)
    ``txt``             caption, UTF-8
    ``json``            ``{"source_id", "fps", "num_frames", "iframes", "width", "height", "clip_starts",
                        "motion_tokens" (motion ids per clip), "keyframe_lengths" (keyframe ids per clip, or
                        null without keyframe codes), "codes": {"fingerprint", "motion_codes", "visual_codes"
                        (null without keyframe codes)}}``
    ``ids.npy``         one packed 1-D uint16 array (int32 above 65536 codes): the clips' motion ids (clips x
                        ``motion_tokens``, clip by clip), then every clip's keyframe ids, concatenated
                        (variable length per clip: ``keyframe_lengths`` are the offsets)
    ==================  ======================================================================================
    """
    motions = np.asarray(motions)
    if motions.ndim != 2 or motions.shape[0] != len(clip_starts) or motions.shape[1] == 0:
        raise ValueError(f"{key}: motion ids {motions.shape} for {len(clip_starts)} clips")
    if keyframes is not None and len(keyframes) != len(clip_starts):
        raise ValueError(f"{key}: {len(keyframes)} keyframes for {len(clip_starts)} clips")
    record = {name: meta.get(name) for name in META_KEYS}
    record.update(clip_starts=[int(s) for s in clip_starts], motion_tokens=int(motions.shape[1]),
                  keyframe_lengths=[int(len(k)) for k in keyframes] if keyframes is not None else None,
                  codes={"fingerprint": fingerprint, "motion_codes": int(motion_codes),
                         "visual_codes": int(visual_codes) if keyframes is not None else None})
    parts = [motions.reshape(-1).astype(np.int64)] + [np.asarray(k, dtype=np.int64) for k in keyframes or []]
    dtype = code_dtype(max(motion_codes, visual_codes or 0))
    return {"__key__": key, CAPTION: caption.encode("utf-8"),
            META: json.dumps(record, sort_keys=True).encode("utf-8"), IDS: _npy(np.concatenate(parts).astype(dtype))}


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
    missing = [name for name in (CAPTION, META) if name not in raw]
    if missing:
        raise TokenSampleSkip(errors.CORRUPT_SAMPLE, f"{key}: missing member(s) {missing}")
    if IDS not in raw:
        raise TokenSampleSkip(MISSING_MOTION_IDS, f"{key}: no {IDS} member")
    try:
        meta = json.loads(raw[META])
        caption = raw[CAPTION].decode("utf-8")
        ids = np.load(io.BytesIO(raw[IDS]), allow_pickle=False)
        codes, starts = meta["codes"], [int(s) for s in meta["clip_starts"]]
        per_clip, lengths = int(meta["motion_tokens"]), meta["keyframe_lengths"]
    except (ValueError, UnicodeDecodeError, OSError, EOFError, KeyError, TypeError) as exc:
        raise TokenSampleSkip(errors.CORRUPT_SAMPLE, f"{key}: {type(exc).__name__}: {exc}") from None
    _check_codes(codes, vocabulary, fingerprints, need_keyframes, key)
    if not starts or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TokenSampleSkip(errors.CORRUPT_SAMPLE, f"{key}: ids {ids.shape} {ids.dtype} for clips {starts}")
    if per_clip <= 0:
        raise TokenSampleSkip(MISSING_MOTION_IDS, f"{key}: clips without motion ids")
    motion_size = len(starts) * per_clip
    keyframe_size = sum(lengths) if lengths is not None else 0
    if ids.size != motion_size + keyframe_size or (lengths is not None and len(lengths) != len(starts)):
        raise TokenSampleSkip(errors.CORRUPT_SAMPLE, f"{key}: {ids.size} ids for {len(starts)} clips of {per_clip} "
                                                     f"motion ids and keyframes of {lengths}")
    motions = ids[:motion_size].reshape(len(starts), per_clip)
    if int(motions.min()) < 0 or int(motions.max()) >= vocabulary.motion_codes:
        raise TokenSampleSkip(IDS_OUT_OF_RANGE, f"{key}: motion ids outside [0, {vocabulary.motion_codes})")
    keyframes = None
    if need_keyframes:
        if lengths is None:
            raise TokenSampleSkip(MISSING_KEYFRAME_IDS, f"{key}: tokenized without keyframe ids")
        if min(lengths) <= 0:
            raise TokenSampleSkip(MISSING_KEYFRAME_IDS, f"{key}: a clip without keyframe ids")
        flat = ids[motion_size:]
        if int(flat.min()) < 0 or int(flat.max()) >= vocabulary.visual_codes:
            raise TokenSampleSkip(IDS_OUT_OF_RANGE, f"{key}: keyframe ids outside [0, {vocabulary.visual_codes})")
        keyframes = np.split(flat, np.cumsum(lengths)[:-1])
    return TokenSample(key, caption, meta, starts, motions, keyframes)


__all__ = ["encode_token_sample", "decode_token_sample", "TokenSample", "TokenSampleSkip", "TokenizerMismatchError",
           "code_dtype", "TOKEN_FIELDS", "IDS_OUT_OF_RANGE", "MISSING_MOTION_IDS", "MISSING_KEYFRAME_IDS",
           "MISSING_TOKENS"]
