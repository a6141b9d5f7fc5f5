"""RGB frames from a stored 6 fps re-encode, converting only the frames a consumer asks for.

Keyframes are I-frames, so a keyframe-only read tells the decoder to skip every other frame
(``skip_frame = NONKEY``) and converts just those; a clip read decodes from the clip's I-frame and
stops after its last frame.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from videolavit.video import errors


def _frame_index(frame: av.VideoFrame, fps: int) -> int:
    return int(round(float(frame.time) * fps)) if frame.time is not None else -1


def decode_frames(mp4: bytes, indices: Sequence[int], fps: int = 6, size: tuple[int, int] | None = None,
                  keyframes_only: bool = False) -> np.ndarray:
    """uint8 RGB frames [len(indices), H, W, 3] at the given 6 fps frame indices.

    ``size`` is (height, width) to resize to during conversion. ``keyframes_only`` promises that all
    ``indices`` are I-frames, which lets the decoder skip the P-frames entirely.
    """
    wanted = sorted(set(int(i) for i in indices))
    if not wanted:
        raise ValueError("no frame indices requested")
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(io.BytesIO(mp4)) as container:
            stream = container.streams.video[0]
            if keyframes_only:
                stream.codec_context.skip_frame = "NONKEY"
            last = wanted[-1]
            if wanted[0] > 0 and stream.time_base:
                # Land on the I-frame at or before the first wanted frame instead of decoding from 0.
                container.seek(int(wanted[0] / fps / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                index = _frame_index(frame, fps)
                if index in found or index not in wanted:
                    if index > last:
                        break
                    continue
                kwargs = {"format": "rgb24"}
                if size is not None:
                    kwargs.update(height=size[0], width=size[1], interpolation="BICUBIC")
                found[index] = frame.to_ndarray(**kwargs)
                if len(found) == len(wanted):
                    break
    except (av.error.FFmpegError, ValueError) as exc:
        raise errors.VideoSkip(errors.CORRUPT_SAMPLE, f"cannot decode stored video: {exc}") from None
    missing = [i for i in wanted if i not in found]
    if missing:
        raise errors.VideoSkip(errors.CORRUPT_SAMPLE, f"stored video lacks frames {missing[:4]}")
    return np.stack([found[int(i)] for i in indices])


def decode_keyframes(mp4: bytes, indices: Sequence[int], fps: int = 6,
                     size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 RGB keyframes [N, H, W, 3]; ``indices`` must be I-frames of the re-encode."""
    return decode_frames(mp4, indices, fps=fps, size=size, keyframes_only=True)


def decode_clip(mp4: bytes, start: int, num_frames: int = 24, fps: int = 6,
                size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 RGB frames [num_frames, H, W, 3] of the clip starting at I-frame ``start``."""
    return decode_frames(mp4, range(start, start + num_frames), fps=fps, size=size)


def decode_all_frames(source: str | Path | bytes) -> np.ndarray:
    """Every frame of a (small, e.g. generated) video as uint8 RGB [T, H, W, 3]."""
    with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no decodable frames in {source if not isinstance(source, (bytes, bytearray)) else 'bytes'}")
    return np.stack(frames)
