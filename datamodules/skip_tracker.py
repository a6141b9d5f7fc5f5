"""Counting samples skipped while reading, per process, so nothing is lost silently.

DataLoader workers are separate processes: each keeps its own counts and every batch carries a
snapshot of its worker's counts under ``SKIPS_KEY``; the DataModule merges the snapshots (latest
per worker) and reports totals by reason.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

log = logging.getLogger("datamodules.skips")

SKIPS_KEY = "_skips"


class SkipTracker:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record(self, key: str, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        # webdataset's own warning omits the sample key; log it with the reason.
        log.warning("skipped sample %s: %s%s", key, reason, f" ({detail})" if detail else "")

    def snapshot(self) -> dict:
        return {"source": f"{os.getpid()}", "counts": dict(self.counts)}


SKIPS = SkipTracker()


def merge_snapshots(latest: dict[str, dict[str, int]], snapshot: dict) -> None:
    latest[snapshot["source"]] = dict(snapshot["counts"])


def totals(latest: dict[str, dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for counts in latest.values():
        total.update(counts)
    return dict(total)
