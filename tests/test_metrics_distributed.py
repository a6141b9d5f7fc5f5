"""Two CPU processes (gloo) must give the same metric values as one process on the same data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from videolavit.metrics.frechet import FrechetDistance
from videolavit.metrics.inception_score import VideoInceptionScore

WORLD = 2
DIM = 5
SPLITS = 3


def make_data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
    return {
        "real": torch.randn(41, DIM, generator=generator, dtype=torch.float64) @ mixing,
        "fake": torch.randn(37, DIM, generator=generator, dtype=torch.float64) @ mixing + 0.7,
        "probs": torch.softmax(3 * torch.randn(29, 7, generator=generator, dtype=torch.float64), dim=1),
    }


def feed(metric, x: torch.Tensor, batch: int, **kwargs) -> None:
    for chunk in x.split(batch):
        metric.update(chunk, **kwargs)


def run_metrics(data: dict[str, torch.Tensor], rank: int, world: int, stats_path: Path) -> dict[str, float]:
    """Each rank gets samples g ≡ rank (mod world), DistributedSampler-style, in odd batch sizes."""
    shard = {k: v[rank::world] for k, v in data.items()}
    results = {}

    fd = FrechetDistance(num_features=DIM)
    feed(fd, shard["real"], batch=4 + rank, real=True)
    feed(fd, shard["fake"], batch=3, real=False)
    results["fd"] = float(fd.compute())
    fd.save_real_statistics(stats_path)  # collective; rank 0 writes

    if world > 1:
        dist.barrier()
    # Loaded real statistics must count once, not once per rank.
    loaded = FrechetDistance(num_features=DIM, real_statistics_path=stats_path)
    feed(loaded, shard["fake"], batch=5, real=False)
    results["fd_loaded"] = float(loaded.compute())
    results["real_n"] = loaded.real_statistics().n

    score = VideoInceptionScore(classifier=nn.Identity(), num_classes=7, splits=SPLITS)
    feed(score, shard["probs"], batch=2 + rank)
    mean, std = score.compute()
    results["is_mean"], results["is_std"] = float(mean), float(std)
    return results


def worker(rank: int, world: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        results = run_metrics(make_data(), rank, world, Path(directory) / "real_stats_2proc.npz")
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    single = run_metrics(make_data(), rank=0, world=1, stats_path=tmp_path / "real_stats_1proc.npz")
    mp.spawn(worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        multi = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert multi["real_n"] == single["real_n"] == 41
        for key in ("fd", "fd_loaded", "is_mean", "is_std"):
            assert multi[key] == pytest.approx(single[key], rel=1e-10, abs=1e-12), (rank, key)
    assert single["fd"] > 0.1 and single["is_std"] > 0  # non-trivial values
    assert single["fd_loaded"] == pytest.approx(single["fd"], rel=1e-12)
