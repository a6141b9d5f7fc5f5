"""The shard sample contract between ``prepare`` (writer) and the DataModule (reader); docs/design.md §3.

One sample per source video:

==============  =================================================================================
``__key__``     sanitised source id (no dots: WebDataset splits member names at the first dot)
``txt``         caption, UTF-8
``json``        metadata: source id, size, fps, frame count, I-frame indices, clip starts, source info
``mp4``         the normalised 6 fps MPEG-4 Part 2 re-encode
``motion.npy``  per-frame macroblock motion grid, float16 [T, 2, rows, cols] (standardised, ×1)
==============  =================================================================================

``decode_sample`` checks the contract before any view sees a sample: a sample that breaks it is a counted
skip naming the key (one NaN in a motion grid would train a NaN model), never a KeyError deep in a view.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np

from videolavit.video import errors

CAPTION, META, VIDEO, MOTION = "txt", "json", "mp4", "motion.npy"
FIELDS = (CAPTION, META, VIDEO, MOTION)

NON_FINITE = "non_finite"  # skip reason: a NaN or infinity in a stored array
BAD_METADATA = "bad_metadata"  # skip reason: the JSON parses but breaks the metadata contract

# Metadata fields every reader relies on, with the types they must have.
REQUIRED_META = {"width": int, "height": int, "fps": (int, float), "num_frames": int, "iframes": list}

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sanitize_key(source_id: str) -> str:
    """A WebDataset-safe key: path separators become ``__``, other unsafe characters ``_``."""
    return _UNSAFE.sub("_", source_id.replace("/", "__"))


def encode_sample(key: str, caption: str, meta: dict, mp4: bytes, motion: np.ndarray) -> dict[str, bytes]:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(motion, dtype=np.float16), allow_pickle=False)
    return {
        "__key__": key,
        CAPTION: caption.encode("utf-8"),
        META: json.dumps(meta, sort_keys=True).encode("utf-8"),
        VIDEO: bytes(mp4),
        MOTION: buffer.getvalue(),
    }


def _check_meta(key: str, meta) -> None:
    """Raise ``VideoSkip(BAD_METADATA)`` naming the first field that breaks the contract."""
    if not isinstance(meta, dict):
        raise errors.VideoSkip(BAD_METADATA, f"{key}: metadata is a {type(meta).__name__}, not an object")
    for name, kinds in REQUIRED_META.items():
        if name not in meta:
            raise errors.VideoSkip(BAD_METADATA, f"{key}: metadata lacks {name!r} (has {sorted(meta)})")
        value = meta[name]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise errors.VideoSkip(BAD_METADATA, f"{key}: metadata {name!r} is {value!r}, not "
                                                 f"{getattr(kinds, '__name__', 'a number')}")
        if name != "iframes" and not value > 0:
            raise errors.VideoSkip(BAD_METADATA, f"{key}: metadata {name!r} is {value!r}, not positive")
    frames = meta["num_frames"]
    bad = [i for i in meta["iframes"] if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < frames]
    if bad:
        raise errors.VideoSkip(BAD_METADATA, f"{key}: metadata 'iframes' holds {bad[:3]}, not frame indices "
                                             f"below num_frames={frames}")
    shape = meta.get("motion_shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 4):
        raise errors.VideoSkip(BAD_METADATA, f"{key}: metadata 'motion_shape' is {shape!r}, not 4 sizes")


def decode_sample(raw: dict, need_video: bool = True) -> dict:
    """Parse a raw WebDataset sample and check it against the contract; raises ``VideoSkip`` with
    ``corrupt_sample`` (missing or unparsable member, motion grid not matching the metadata),
    ``bad_metadata`` (metadata that parses but lacks a field or has the wrong type) or ``non_finite``
    (a NaN or infinity in the motion grid), naming the key and what is wrong.

    Returns ``{"key", "caption", "meta", "mp4" (bytes or None), "motion" (float16 ndarray)}``.
    ``need_video=False`` lets motion-only readers accept samples whose video member is unused.
    """
    key = raw.get("__key__", "?")
    needed = [CAPTION, META, MOTION] + ([VIDEO] if need_video else [])
    missing = [name for name in needed if name not in raw]
    if missing:
        raise errors.VideoSkip(errors.CORRUPT_SAMPLE, f"{key}: missing member(s) {missing}")
    try:
        meta = json.loads(raw[META])
        caption = raw[CAPTION].decode("utf-8")
        motion = np.load(io.BytesIO(raw[MOTION]), allow_pickle=False)
    except (ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise errors.VideoSkip(errors.CORRUPT_SAMPLE, f"{key}: {type(exc).__name__}: {exc}") from None
    _check_meta(key, meta)
    if motion.ndim != 4 or motion.shape[1] != 2 or motion.shape[0] != meta["num_frames"]:
        raise errors.VideoSkip(errors.CORRUPT_SAMPLE, f"{key}: motion grid {motion.shape} does not match "
                                                      f"{meta['num_frames']} frames")
    if meta.get("motion_shape") is not None and list(motion.shape) != meta["motion_shape"]:
        raise errors.VideoSkip(errors.CORRUPT_SAMPLE, f"{key}: motion grid {motion.shape} does not match the "
                                                      f"metadata's motion_shape {meta['motion_shape']}")
    if not np.issubdtype(motion.dtype, np.floating):
        raise errors.VideoSkip(errors.CORRUPT_SAMPLE, f"{key}: motion grid has dtype {motion.dtype}, not float")
    finite = np.isfinite(motion)
    if not finite.all():
        raise errors.VideoSkip(NON_FINITE, f"{key}: motion grid holds {int(finite.size - finite.sum())} "
                                           "non-finite value(s) (NaN/inf)")
    return {"key": key, "caption": caption, "meta": meta, "mp4": raw.get(VIDEO), "motion": motion}
