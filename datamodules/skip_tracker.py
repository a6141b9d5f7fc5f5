"""Counting samples skipped while reading, per process, so nothing is lost silently.

DataLoader workers are separate processes: each keeps its own counts, and every batch carries a
snapshot of its counts under ``SKIPS_KEY``; so does a last skips-only item (``is_skips_report``) that
each pipeline yields when it ends, so skips after a worker's last batch still reach the main process
(the DataModule takes those items out of the stream). Each pipeline iteration starts a new *stream*
(fresh counts, new id), so counts inherited by forked workers or left from an earlier epoch are never
double-counted; the DataModule keeps the latest snapshot per stream and reports the sums by reason.

A stream that only skips must not spin forever (an endless resampled training stream over shards that
are all bad): with ``max_consecutive`` set, that many skips in a row without a delivered sample raise
``TooManySkips``. Warnings are rate-limited: the first ``WARN_FIRST`` skips of each reason are logged
with their key, after that one summary line every ``SUMMARY_EVERY`` skips of that reason.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter

log = logging.getLogger("datamodules.skips")

SKIPS_KEY = "_skips"
REPORT_KEY = "_skips_report"  # marks an item that carries only a skips snapshot, not a batch

WARN_FIRST = 10
SUMMARY_EVERY = 1000


class TooManySkips(RuntimeError):
    """Every recent sample was skipped: the data is broken (or the wrong data), not one bad sample."""


class SkipTracker:
    def __init__(self) -> None:
        self.start_stream()

    def start_stream(self, max_consecutive: int | None = None) -> None:
        """Fresh counts under a new stream id; ``max_consecutive`` bounds skips in a row (None: no bound)."""
        self.counts: Counter[str] = Counter()
        self.events: Counter[str] = Counter()  # skip records per reason (a record may count many samples)
        self.stream = uuid.uuid4().hex
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def record(self, key: str, reason: str, detail: str = "", count: int = 1) -> None:
        """Count ``count`` samples lost for ``reason`` (one event); log it rate-limited with its key."""
        self.counts[reason] += count
        self.events[reason] += 1
        self.consecutive += 1
        seen = self.events[reason]
        # webdataset's own warning omits the sample key; log it with the reason.
        if seen <= WARN_FIRST:
            lost = f" ({count} samples)" if count != 1 else ""
            log.warning("skipped sample %s: %s%s%s", key, reason, lost, f" ({detail})" if detail else "")
            if seen == WARN_FIRST:
                log.warning("further '%s' skips are summarised every %d", reason, SUMMARY_EVERY)
        elif seen % SUMMARY_EVERY == 0:
            log.warning("skipped %d samples so far for '%s' in this reader (latest: %s)",
                        self.counts[reason], reason, key)
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise TooManySkips(f"{self.consecutive} samples in a row were skipped (so far {dict(self.counts)}), "
                               f"the latest {key}: {reason}; the shards look broken or are not this view's data. "
                               "Check the shards (or raise data.max_consecutive_skips)")

    def delivered(self) -> None:
        """A sample was used: the run of consecutive skips ends."""
        self.consecutive = 0

    def snapshot(self) -> dict:
        return {"source": self.stream, "counts": dict(self.counts)}

    def report(self) -> dict:
        """A skips-only stream item: the final snapshot of a pipeline that has ended."""
        return {SKIPS_KEY: self.snapshot(), REPORT_KEY: True}


SKIPS = SkipTracker()


def is_skips_report(item) -> bool:
    return isinstance(item, dict) and item.get(REPORT_KEY) is True


def merge_snapshots(latest: dict[str, dict[str, int]], snapshot: dict) -> None:
    latest[snapshot["source"]] = dict(snapshot["counts"])


def totals(latest: dict[str, dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for counts in latest.values():
        total.update(counts)
    return dict(total)
