"""Line-oriented side corpora (text-only documents, image-text JSONL) streamed by every rank x worker reader.

A 100 GB text corpus is never held in memory: each reader (``reader_slot``: its index among all ranks x
DataLoader workers) streams its share of the lines (every ``slots``-th line) from the file, in training
endlessly, shuffled within a bounded buffer and pass by pass, in validation once, in file order. A reader whose
share is empty (fewer lines than readers) reads the whole file instead of none.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch


def reader_slot() -> tuple[int, int]:
    """(index, count) of this reader among all ranks x DataLoader workers.

    The rank comes from ``torch.distributed`` (forked workers inherit it) or the ``RANK``/``WORLD_SIZE``
    environment; without either the process is alone.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


def read_text_lines(path: str | Path, slot: int = 0, slots: int = 1) -> Iterator[str]:
    """Non-empty lines (stripped) of a UTF-8 text file, the ``slot``-th of every ``slots`` lines, streamed."""
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if index % slots != slot:
                continue
            line = line.strip()
            if line:
                yield line


def shuffled_passes(path: str | Path, rng: random.Random, buffer: int = 1000, slot: int = 0,
                    slots: int = 1) -> Iterator[str]:
    """This reader's lines without end, pass after pass, each pass shuffled within ``buffer`` lines.

    Every pass emits each of its lines exactly once (the buffer is emptied at the end of a pass), so a small
    file cycles evenly; memory is ``buffer`` lines whatever the file's size. Raises ``ValueError`` for a file
    without a non-empty line.
    """
    size = max(1, int(buffer))
    share = (slot, slots)
    while True:
        held: list[str] = []
        seen = False
        for line in read_text_lines(path, *share):
            seen = True
            held.append(line)
            if len(held) >= size:
                pick = rng.randrange(len(held))
                held[pick], held[-1] = held[-1], held[pick]
                yield held.pop()
        rng.shuffle(held)
        yield from held
        if not seen:
            if share == (0, 1):
                raise ValueError(f"{path} has no non-empty line")
            share = (0, 1)  # fewer lines than readers: this reader draws from the whole file


def reader_lines(path: str | Path, train: bool, rng: random.Random, buffer: int = 1000) -> Iterator[str]:
    """This reader's share of a line file: ``shuffled_passes`` in training, one pass in file order otherwise."""
    slot, slots = reader_slot()
    if train:
        return shuffled_passes(path, rng, buffer, slot, slots)
    return read_text_lines(path, slot, slots)


__all__ = ["reader_slot", "read_text_lines", "shuffled_passes", "reader_lines"]
