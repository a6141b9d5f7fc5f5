"""Counting samples skipped while reading, per process, so nothing is lost silently.

DataLoader workers are separate processes: each keeps its own counts and every batch carries a
snapshot of its counts under ``SKIPS_KEY``. Each pipeline iteration starts a new *stream* (fresh counts,
new id), so counts inherited by forked workers or left from an earlier epoch are never double-counted;
the DataModule keeps the latest snapshot per stream and reports the sums by reason.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter

log = logging.getLogger("datamodules.skips")

SKIPS_KEY = "_skips"


class SkipTracker:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.stream = uuid.uuid4().hex

    def start_stream(self) -> None:
        self.counts = Counter()
        self.stream = uuid.uuid4().hex

    def record(self, key: str, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        # webdataset's own warning omits the sample key; log it with the reason.
        log.warning("skipped sample %s: %s%s", key, reason, f" ({detail})" if detail else "")

    def snapshot(self) -> dict:
        return {"source": self.stream, "counts": dict(self.counts)}


SKIPS = SkipTracker()


def merge_snapshots(latest: dict[str, dict[str, int]], snapshot: dict) -> None:
    latest[snapshot["source"]] = dict(snapshot["counts"])


def totals(latest: dict[str, dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for counts in latest.values():
        total.update(counts)
    return dict(total)
