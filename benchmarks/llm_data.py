"""LLM data path throughput and memory: the stage-2 view over token shards, and the tokenize job on CPU.

    python benchmarks/llm_data.py            # full: 10k / 500k-video corpora (written once, cached in /tmp)
    python benchmarks/llm_data.py --quick    # seconds-scale check of the same code

Run it on an otherwise idle machine. The last line is one JSON object:

* ``tokens_per_s_per_core``: non-padding tokens of packed rows per CPU-second of one loader process, through the
  real ``VideoDataModule`` + ``PretrainSequenceView`` (decode token samples, select clips, build ids, tokenise the
  caption, pack into 2048-token rows, collate; timed after a warm-up), on synthetic token shards shaped like WebVid: 8 clips x (90
  keyframe + 135 motion) ids and a ~15-token caption per video, release vocabulary;
* ``rss_mb_small`` / ``rss_mb_large``: peak RSS of a fresh loader process after reading ``--read`` samples from a
  corpus of ``--small`` and of ``--large`` videos (each in its own process); their ratio (``rss_ratio``) shows
  whether memory grows with the corpus;
* ``tokenize_clips_per_s``: clips per wall-clock second of ``python -m videolavit tokenize`` on CPU (one process,
  ``--tokenize-workers`` decoders) with tiny random exports over prepared synthetic videos.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

CLIPS, KEYFRAME_IDS, MOTION_IDS = 8, 90, 135
WORDS = [f"{a}{b}" for a in ("red", "blue", "tall", "small", "old", "new", "green", "dark", "bright", "slow")
         for b in ("cat", "dog", "car", "tree", "road", "sky", "man", "woman", "ball", "city", "river", "bird")]


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 16)))


def text_tokenizer(cache: Path) -> Path:
    from videolavit.llm.text_tokenizer import build_tiny_tokenizer

    path = cache / "text_tokenizer"
    if not (path / "tokenizer.json").is_file():
        rng = random.Random(0)
        build_tiny_tokenizer(path, [caption(rng) for _ in range(2000)] + WORDS, vocab_size=32000)
    return path


def token_corpus(cache: Path, videos: int, per_shard: int = 1000) -> Path:
    """Synthetic WebVid-shaped token shards (written once; ``done`` marks a finished corpus)."""
    import webdataset as wds

    from videolavit.llm.token_shards import encode_token_sample
    from videolavit.llm.vocabulary import Vocabulary

    out = cache / f"tokens_{videos}"
    if (out / "done").is_file():
        names = sorted(p.name for p in out.glob("tok-*.tar"))
        write_manifest(out, names, videos, per_shard)  # caches written before manifests were checked
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab, rng, np_rng = Vocabulary.release(), random.Random(videos), np.random.default_rng(videos)
    frames = 12 * (2 * CLIPS + 1) + 12  # I-frames every 12 frames: select_clip_starts takes 8 clips
    meta = {"source_id": "", "width": 320, "height": 180, "fps": 6, "num_frames": frames,
            "iframes": list(range(0, frames, 12))}
    from videolavit.video.clips import select_clip_starts

    starts = select_clip_starts(meta["iframes"], frames, 24, CLIPS)
    assert len(starts) == CLIPS
    names = []
    for shard in range(0, videos, per_shard):
        name = f"tok-{shard // per_shard:06d}.tar"
        with wds.TarWriter(str(out / name), mtime=0) as sink:
            for n in range(shard, min(videos, shard + per_shard)):
                keyframes = [np_rng.integers(0, vocab.visual_codes, np_rng.integers(70, 111)) for _ in starts]
                motions = np_rng.integers(0, vocab.motion_codes, (CLIPS, MOTION_IDS))
                sink.write(encode_token_sample(f"v{n:08d}", caption(rng), {**meta, "source_id": f"v{n}"}, starts,
                                               motions, keyframes, "synthetic", vocab.motion_codes, vocab.visual_codes))
        names.append(name)
    write_manifest(out, names, videos, per_shard)
    (out / "done").write_text("ok")
    return out


def write_manifest(out: Path, names: list[str], videos: int, per_shard: int) -> None:
    """A finished token job's manifest: the DataModule reads only the shards a complete manifest lists."""
    counts = {name: min(per_shard, videos - i * per_shard) for i, name in enumerate(names)}
    (out / "manifest.json").write_text(json.dumps({"complete": True, "shards": names, "written": videos,
                                                   "shard_samples": counts}))


def loader(shards: Path, tokenizer: Path, batch: int = 8):
    from datamodules.llm_views import PretrainSequenceView
    from datamodules.token_source import TokenSource
    from datamodules.video_datamodule import VideoDataModule
    from videolavit.llm.vocabulary import Vocabulary

    tokens = TokenSource(tokenizer_path=str(tokenizer), vocabulary=Vocabulary.release(), seq_len=2048, open_rows=8)
    view = PretrainSequenceView(tokens, weights={"video_text": 1.0})
    dm = VideoDataModule(train_shards=str(shards), view=view, batch_size=batch, samples_per_epoch=10 ** 9,
                         shuffle_buffer=1000, num_workers=0)
    return dm.train_dataloader(), view


def read_samples(shards: Path, tokenizer: Path, samples: int, warmup: int = 0) -> dict:
    """One loader process: read ``warmup`` then ``samples`` videos through the view; tokens per CPU-second of the
    ``samples`` (after the text tokenizer is loaded and the shuffle buffers are full) and peak RSS."""
    batches, view = loader(shards, tokenizer)
    tokens, timed, start, wall = 0, None, time.process_time(), time.perf_counter()
    for batch in batches:
        if timed is None and view.stats.documents >= warmup:
            timed, start, wall = view.stats.documents, time.process_time(), time.perf_counter()
            continue
        if timed is not None:
            tokens += int((batch["document_ids"] >= 0).sum())
        if view.stats.documents >= warmup + samples:
            break
    cpu = time.process_time() - start
    return {"tokens": tokens, "documents": view.stats.documents - (timed or 0), "cpu_s": cpu,
            "wall_s": time.perf_counter() - wall, "tokens_per_cpu_s": tokens / cpu,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_fresh_process(shards: Path, tokenizer: Path, samples: int, warmup: int = 0) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(shards), str(tokenizer), str(samples), str(warmup)],
                          capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def tokenize_rate(cache: Path, videos: int, workers: int) -> dict:
    """Clips per second of the tokenize job on CPU with tiny random exports over prepared synthetic videos."""
    import shutil
    import warnings

    from datamodules.prepare import PrepareConfig, run_prepare
    from datamodules.tokenize_shards import TokenizeConfig, run_tokenize
    from tests.tiny_tokenizers import build_tokenizer_exports
    from videolavit.synth.moving_shapes import generate_corpus

    root = cache / f"videos_{videos}"
    if not (root / "shards" / "manifest.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        generate_corpus(root / "corpus", num_videos=videos, seed=0, size=(96, 96), fps=12, seconds=10.0)
        run_prepare(PrepareConfig(videos=str(root / "corpus" / "videos"), out=str(root / "shards"),
                                  captions=str(root / "corpus" / "captions.csv"), workers=max(1, workers),
                                  max_shard_samples=16, progress=False))
        build_tokenizer_exports(root / "exports")
    out = root / "tokens"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest, _ = run_tokenize(TokenizeConfig(shards=str(root / "shards"), exports=str(root / "exports"),
                                                  out=str(out), workers=workers, progress=False))
    seconds = time.perf_counter() - start
    return {"clips": manifest["clips"], "videos": manifest["written"], "seconds": seconds,
            "clips_per_s": manifest["clips"] / seconds}


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(read_samples(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpora and reads (a check, not a measurement)")
    parser.add_argument("--cache", default="/tmp/videolavit_llm_data_bench", help="where synthetic data is kept")
    parser.add_argument("--small", type=int, default=10_000, help="videos in the small corpus")
    parser.add_argument("--large", type=int, default=500_000, help="videos in the large corpus")
    parser.add_argument("--read", type=int, default=20_000, help="samples each RSS process reads")
    parser.add_argument("--throughput-samples", type=int, default=5_000,
                        help="samples timed for tokens/s (after a warm-up that fills the shuffle buffers)")
    parser.add_argument("--tokenize-videos", type=int, default=64)
    parser.add_argument("--tokenize-workers", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.small, args.large, args.read, args.throughput_samples, args.tokenize_videos = 500, 3000, 1000, 300, 4
        args.tokenize_workers = 0
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = text_tokenizer(cache)
    small, large = token_corpus(cache, args.small), token_corpus(cache, args.large)
    throughput = in_fresh_process(small, tokenizer, args.throughput_samples, warmup=1500 if not args.quick else 200)
    print(f"view: {throughput['tokens']} tokens of {throughput['documents']} videos in {throughput['cpu_s']:.2f} "
          f"CPU-s", flush=True)
    rss_small = in_fresh_process(small, tokenizer, args.read)
    rss_large = in_fresh_process(large, tokenizer, args.read)
    print(f"rss after {args.read} samples: {rss_small['rss_mb']:.0f} MB ({args.small} videos), "
          f"{rss_large['rss_mb']:.0f} MB ({args.large} videos)", flush=True)
    tokenize = tokenize_rate(cache, args.tokenize_videos, args.tokenize_workers)
    print(f"tokenize: {tokenize['clips']} clips of {tokenize['videos']} videos in {tokenize['seconds']:.1f} s",
          flush=True)
    print(json.dumps({"tokens_per_s_per_core": round(throughput["tokens_per_cpu_s"]),
                      "rss_mb_small": round(rss_small["rss_mb"], 1), "rss_mb_large": round(rss_large["rss_mb"], 1),
                      "rss_ratio": round(rss_large["rss_mb"] / rss_small["rss_mb"], 3),
                      "tokenize_clips_per_s": round(tokenize["clips_per_s"], 2), "quick": args.quick,
                      "corpora": [args.small, args.large], "read": args.read}))


if __name__ == "__main__":
    main()
