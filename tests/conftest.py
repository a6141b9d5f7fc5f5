"""Shared fixtures: a small synthetic corpus and its prepared shards, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One intra-op thread in every test: the ops are tiny, and on the 2 shared CPU cores of CI two threads per
# process spin against the DataLoader workers and each other (steps 10-40x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> Path:
    """8 moving-shapes videos (96×96, 10 s at 12 fps → 60 frames and 2 clips each at 6 fps)."""
    from videolavit.synth.moving_shapes import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, num_videos=8, seed=11, size=(96, 96), fps=12, seconds=10.0)
    return out


@pytest.fixture(scope="session")
def prepared_shards(synthetic_corpus, tmp_path_factory) -> Path:
    """The corpus prepared into 4 shards of 2 samples."""
    from datamodules.prepare import PrepareConfig, run_prepare

    out = tmp_path_factory.mktemp("shards")
    run_prepare(PrepareConfig(videos=str(synthetic_corpus / "videos"), out=str(out),
                              captions=str(synthetic_corpus / "captions.csv"), workers=1, max_shard_samples=2,
                              progress=False))
    return out
