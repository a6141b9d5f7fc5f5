"""Hugging Face safetensors weights read into (and written from) FSDP2 shards one tensor at a time.

Why: loading a 7B LLM with ``from_pretrained`` on every rank holds a full fp32 copy per rank (tens of GB
of host memory each, times the ranks of a node) before FSDP2 keeps 1/N of it. Here the model is built on
the meta device, sharded, given empty local storage, and each rank reads only the rows of its own shard
(safetensors slices are memory-mapped reads). The export goes the other way: one parameter is gathered
at a time, rank 0 keeps it in the export dtype and writes safetensors files of bounded size as they fill.

Only ``Shard(0)`` and ``Replicate`` placements are supported (FSDP2 / HSDP over data parallel).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class WeightsError(ValueError):
    """A weights directory that cannot be read as the model expects."""


class SafetensorsDirectory:
    """The tensors of a Hugging Face directory (``model.safetensors`` or a sharded index), read lazily."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise WeightsError(f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights "
                               "are read; convert .bin checkpoints with transformers' save_pretrained first)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {}
        for name in files:
            path = (self.directory / name).resolve()
            if path.parent != self.directory.resolve() or not path.is_file():
                raise WeightsError(f"{index} names a weights file outside the directory or missing: {name}")
            self._handles[name] = safe_open(str(path), framework="pt", device="cpu")
        if weight_map is None:
            weight_map = {key: SINGLE_FILE for key in self._handles[SINGLE_FILE].keys()}
        self._file_of = weight_map

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def _slice(self, key: str):
        if key not in self._file_of:
            raise WeightsError(f"{self.directory} has no tensor {key!r}")
        return self._handles[self._file_of[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 (only those are read from disk)."""
        return self._slice(key)[start:stop]

    def full(self, key: str) -> torch.Tensor:
        return self._slice(key)[:]


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local storage of ``param`` and the global index of its first row (dim 0).

    A plain tensor is all rows from 0; an FSDP2 ``DTensor`` sharded ``Shard(0)`` holds rows
    ``[rank * ceil(n / W), ...)`` like ``torch.chunk`` (the last ranks may hold fewer or none)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(param, DTensor):
        return param.data, 0
    local, offset, rows = param.to_local(), 0, param.shape[0]
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if not (isinstance(placement, Shard) and placement.dim == 0):
            raise NotImplementedError(f"placement {placement} is not supported (Shard(0) or Replicate only)")
        size, coordinate = param.device_mesh.size(dim), param.device_mesh.get_local_rank(dim)
        chunk = -(-rows // size)
        offset += coordinate * chunk
        rows = max(0, min(chunk, rows - coordinate * chunk))
    if local.shape[0] != rows:
        raise RuntimeError(f"local shard has {local.shape[0]} rows, expected {rows} (unexpected sharding)")
    return local, offset


@torch.no_grad()
def load_rows_into(param: torch.Tensor, fetch: Callable[[int, int], torch.Tensor]) -> None:
    """Fill ``param`` (plain or sharded) with ``fetch(start, stop)``: the global rows it holds."""
    local, start = local_rows(param)
    if local.shape[0] == 0:
        return
    values = fetch(start, start + local.shape[0])
    if tuple(values.shape) != tuple(local.shape):
        raise WeightsError(f"weights of shape {tuple(values.shape)} for a shard of shape {tuple(local.shape)}")
    local.copy_(values.to(device=local.device, dtype=local.dtype))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a ``DTensor``; every rank must call it)."""
    from torch.distributed.tensor import DTensor

    value = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return value.detach()


class SafetensorsShardWriter:
    """Writes named tensors into ``model-0000i-of-0000n.safetensors`` files of about ``max_bytes`` each,
    plus ``model.safetensors.index.json`` (one ``model.safetensors`` when everything fits in one file).

    The tensors' names and byte sizes are known up front (``plan``), so each file is written as soon as
    its last tensor arrives and at most one file's tensors are held in memory."""

    def __init__(self, directory: str | Path, plan: Iterable[tuple[str, int]], max_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        groups: list[list[str]] = [[]]
        filled = 0
        self.total_bytes = 0
        for name, nbytes in plan:
            if groups[-1] and filled + nbytes > max_bytes:
                groups.append([])
                filled = 0
            groups[-1].append(name)
            filled += nbytes
            self.total_bytes += nbytes
        count = len(groups)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._file_of = {tensor: names[i] for i, group in enumerate(groups) for tensor in group}
        self._pending = {name: set(group) for name, group in zip(names, groups)}
        self._held: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in [*self.directory.glob("model*.safetensors"), self.directory / INDEX_FILE]:
            stale.unlink(missing_ok=True)  # a previous export's files would mix with these

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        file = self._file_of[name]
        self._held[file][name] = tensor.contiguous()
        self._pending[file].discard(name)
        if not self._pending[file]:
            save_file(self._held.pop(file), str(self.directory / file), metadata={"format": "pt"})

    def close(self) -> None:
        missing = sorted(n for group in self._pending.values() for n in group)
        if missing:
            raise RuntimeError(f"export incomplete: tensors never written: {missing[:5]}")
        files = set(self._file_of.values())
        if files != {SINGLE_FILE}:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self._file_of}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
