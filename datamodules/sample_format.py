"""The shard sample contract between ``prepare`` (writer) and the DataModule (reader); DESIGN §3.

One sample per source video:

==============  =================================================================================
``__key__``     sanitised source id (no dots: WebDataset splits member names at the first dot)
``txt``         caption, UTF-8
``json``        metadata: source id, size, fps, frame count, I-frame indices, clip starts, source info
``mp4``         the normalised 6 fps MPEG-4 Part 2 re-encode
``motion.npy``  per-frame macroblock motion grid, float16 [T, 2, rows, cols] (standardised, ×1)
==============  =================================================================================
"""

from __future__ import annotations

import io
import json
import re

import numpy as np

from videolavit.video import errors

CAPTION, META, VIDEO, MOTION = "txt", "json", "mp4", "motion.npy"
FIELDS = (CAPTION, META, VIDEO, MOTION)

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


def decode_sample(raw: dict, need_video: bool = True) -> dict:
    """Parse a raw WebDataset sample; raises ``VideoSkip(CORRUPT_SAMPLE)`` naming what is wrong.

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
    if motion.ndim != 4 or motion.shape[1] != 2 or motion.shape[0] != meta.get("num_frames"):
        raise errors.VideoSkip(errors.CORRUPT_SAMPLE, f"{key}: motion grid {motion.shape} does not match "
                                                      f"{meta.get('num_frames')} frames")
    return {"key": key, "caption": caption, "meta": meta, "mp4": raw.get(VIDEO), "motion": motion}
