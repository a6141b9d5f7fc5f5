"""Decompose a video into the Video-LaVIT representation (paper §3.1; docs/design.md §4).

Any FFmpeg-readable video is resampled to 6 fps and re-encoded with MPEG-4 Part 2 (GOP 12, no
B-frames, no scene-cut I-frames), so the stream is I P×11 I P×11 …; decoding the re-encode with
motion-vector export yields the per-frame macroblock motion grid. Nothing is converted to RGB here:
keyframes and frames are decoded from the stored re-encode only when a consumer needs them
(``videolavit.video.frames``), which is what keeps decomposition close to the codec's own cost.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import av
import numpy as np

from videolavit.video import errors
from videolavit.video.clips import CLIP_FRAMES, select_clip_starts
from videolavit.video.motion_grid import aggregate_motion_vectors

VideoSource = Union[str, os.PathLike, bytes, BinaryIO]

I_FRAME = 1  # AVPictureType values as PyAV reports them
P_FRAME = 2


@dataclass(frozen=True)
class DecomposeConfig:
    """Settings of the 6 fps MPEG-4 re-encode; defaults follow the release."""

    fps: int = 6
    gop: int = 12
    bit_rate: int = 8_000_000  # release: -b:v 8000k; high, so vectors follow the content
    max_short_side: int | None = 576  # downscale larger videos (keeps 1024×576 for 16:9)
    min_side: int = 32  # below this the macroblock grid is meaningless
    max_seconds: float | None = 120.0  # long inputs are cut (recorded in the metadata)
    clip_frames: int = CLIP_FRAMES
    max_clips: int = 8
    threads: int = 1  # codec threads per video; parallelism comes from prepare's workers


@dataclass
class DecomposedVideo:
    mp4: bytes  # the 6 fps MPEG-4 Part 2 re-encode
    motion: np.ndarray  # float16 [T, 2, rows, cols]: standardised displacement, I-frames zero
    frame_types: np.ndarray  # uint8 [T]: 1 = I, 2 = P
    width: int
    height: int
    fps: int
    clip_starts: list[int]
    source: dict = field(default_factory=dict)  # codec, size, fps, duration of the input; truncation

    @property
    def num_frames(self) -> int:
        return int(self.frame_types.shape[0])

    @property
    def iframes(self) -> list[int]:
        return np.flatnonzero(self.frame_types == I_FRAME).tolist()

    def metadata(self) -> dict:
        """The JSON metadata stored with a shard sample (docs/design.md §3)."""
        return {
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "num_frames": self.num_frames,
            "iframes": self.iframes,
            "clip_starts": self.clip_starts,
            "motion_shape": list(self.motion.shape),
            "source": self.source,
        }


def output_size(width: int, height: int, max_short_side: int | None) -> tuple[int, int]:
    """Even output size, downscaled so the shorter side is at most ``max_short_side``."""
    scale = 1.0
    if max_short_side is not None and min(width, height) > max_short_side:
        scale = max_short_side / min(width, height)
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def _open_source(source: VideoSource) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise errors.VideoSkip(errors.EMPTY_FILE, "0 bytes")
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"video not found: {path}")
        if path.stat().st_size == 0:
            raise errors.VideoSkip(errors.EMPTY_FILE, str(path))
        source = str(path)
    try:
        return av.open(source, mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise errors.VideoSkip(errors.UNREADABLE, f"{type(exc).__name__}: {exc}") from None


def _build_resampler(stream, width: int, height: int, fps: int) -> av.filter.Graph:
    graph = av.filter.Graph()
    nodes = [
        graph.add_buffer(template=stream),
        graph.add("fps", str(fps)),
        graph.add("scale", f"{width}:{height}:flags=bicubic"),
        graph.add("format", "yuv420p"),
        graph.add("buffersink"),
    ]
    for a, b in zip(nodes, nodes[1:]):
        a.link_to(b)
    graph.configure()
    return graph


def _new_encoder(width: int, height: int, cfg: DecomposeConfig):
    buffer = io.BytesIO()
    container = av.open(buffer, mode="w", format="mp4")
    stream = container.add_stream("mpeg4", rate=cfg.fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.bit_rate = cfg.bit_rate
    ctx = stream.codec_context
    ctx.gop_size = cfg.gop
    ctx.max_b_frames = 0
    ctx.thread_count = cfg.threads
    # No extra I-frames at scene cuts: clips must be exactly I P×11 I P×11.
    ctx.options = {"sc_threshold": "1000000000"}
    return buffer, container, stream


def reencode(source: VideoSource, cfg: DecomposeConfig = DecomposeConfig()) -> tuple[bytes, dict]:
    """Resample ``source`` to ``cfg.fps`` and re-encode it as MPEG-4 Part 2; returns (mp4, info)."""
    container = _open_source(source)
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise errors.VideoSkip(errors.NO_VIDEO_STREAM, f"streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if cfg.threads > 1 else "SLICE"
        stream.codec_context.thread_count = cfg.threads
        src_w, src_h = stream.codec_context.width, stream.codec_context.height
        if not src_w or not src_h or stream.codec_context.format is None:
            raise errors.VideoSkip(errors.UNREADABLE, "video stream without a frame size or pixel format "
                                                      "(truncated or corrupt)")
        if min(src_w, src_h) < cfg.min_side:
            raise errors.VideoSkip(errors.TOO_SMALL, f"{src_w}x{src_h} < {cfg.min_side} px")
        width, height = output_size(src_w, src_h, cfg.max_short_side)
        info = {
            "codec": stream.codec_context.name,
            "width": src_w,
            "height": src_h,
            "fps": float(stream.average_rate) if stream.average_rate else None,
            "duration": float(container.duration / av.time_base) if container.duration else None,
        }
        buffer, out, out_stream = _new_encoder(width, height, cfg)
        try:
            graph = _build_resampler(stream, width, height, cfg.fps)
        except (av.error.FFmpegError, ValueError) as exc:
            raise errors.VideoSkip(errors.UNREADABLE, f"cannot set up resampling: {exc}") from None
        written, first_time, error = 0, None, None
        time_base = Fraction(1, cfg.fps)

        def drain() -> None:
            nonlocal written
            while True:
                try:
                    frame = graph.pull()
                except (av.error.BlockingIOError, av.error.EOFError):
                    return
                frame.pts, frame.time_base = written, time_base
                frame.pict_type = av.video.frame.PictureType.NONE
                for packet in out_stream.encode(frame):
                    out.mux(packet)
                written += 1

        last_pts = -1
        try:
            for frame in container.decode(stream):
                if frame.pts is None:  # raw streams: synthesise monotonic timestamps
                    frame.pts = last_pts + 1
                if frame.pts <= last_pts:  # broken/duplicated timestamps would stall the fps filter
                    continue
                last_pts = frame.pts
                if first_time is None:
                    first_time = frame.time or 0.0
                if cfg.max_seconds is not None and (frame.time or 0.0) - first_time >= cfg.max_seconds:
                    info["truncated_at_seconds"] = cfg.max_seconds
                    break
                graph.push(frame)
                drain()
        except (av.error.FFmpegError, ValueError) as exc:
            # Keep what decoded before the damage; the caller decides whether it is enough.
            error = f"{type(exc).__name__}: {exc}"
            info["decode_error"] = error
        try:
            graph.push(None)
        except (av.error.FFmpegError, ValueError):
            pass
        drain()
        for packet in out_stream.encode(None):
            out.mux(packet)
        out.close()
    if written == 0:
        reason = errors.DECODE_ERROR if error else errors.UNREADABLE
        raise errors.VideoSkip(reason, error or "no decodable video frames")
    info["reencoded_frames"] = written
    return buffer.getvalue(), info


def extract_motion(mp4: bytes) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Decode a re-encode with vector export; returns (motion float16 [T,2,r,c], types, w, h)."""
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        # Must be set before the first decode or FFmpeg exports nothing.
        stream.codec_context.options = {"flags2": "+export_mvs"}
        width, height = stream.codec_context.width, stream.codec_context.height
        grids, types = [], []
        for frame in container.decode(stream):
            side = frame.side_data.get("MOTION_VECTORS")
            vectors = side.to_ndarray() if side is not None else None
            grids.append(aggregate_motion_vectors(vectors, height, width))
            types.append(int(frame.pict_type))
    return np.stack(grids).astype(np.float16), np.asarray(types, dtype=np.uint8), width, height


def decompose_video(source: VideoSource, cfg: DecomposeConfig = DecomposeConfig()) -> DecomposedVideo:
    """Full decomposition; raises ``VideoSkip`` with a named reason for unusable input."""
    mp4, info = reencode(source, cfg)
    motion, types, width, height = extract_motion(mp4)
    starts = select_clip_starts(np.flatnonzero(types == I_FRAME), len(types), cfg.clip_frames, cfg.max_clips)
    if not starts:
        reason = errors.DECODE_ERROR if "decode_error" in info else errors.TOO_SHORT
        raise errors.VideoSkip(reason, f"{len(types)} frames at {cfg.fps} fps hold no full "
                                       f"{cfg.clip_frames}-frame clip starting at an I-frame")
    return DecomposedVideo(mp4=mp4, motion=motion, frame_types=types, width=width, height=height,
                           fps=cfg.fps, clip_starts=starts, source=info)
