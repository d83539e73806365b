"""Where a checkpoint tensor's elements are: whole in one file, or partitioned across per-rank files.

A partitioned checkpoint (saved with ``runtime.partition`` set) stores each store-resident tensor
as the pieces the saving ranks owned: rank r's file holds a 1-D tensor of elements ``[start,
stop)`` of the flattened full tensor, under the tensor's own name. The manifest records the
saving world size and the rule (:func:`owned_range`, :data:`ALIGN_ELEMENTS` of
:mod:`engine.distributed.partition`), so a load with any world size can compute which elements
each file holds - and checks that the pieces the manifest lists are exactly that rule's ranges,
covering the tensor. Pure functions of the manifest: no I/O here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..dtypes import FROM_SAFETENSORS
from .format import CheckpointError

RULE = "chunk = ceil(numel / world_size) rounded up to align_elements; rank r owns [r*chunk, (r+1)*chunk) ∩ [0, numel)"


def chunk_of(numel: int, world_size: int, align: int) -> int:
    """Elements per rank (as :meth:`engine.distributed.partition.Partition.chunk`)."""
    per_rank = math.ceil(numel / world_size)
    return max(align, math.ceil(per_rank / align) * align)


def owned_range(numel: int, world_size: int, rank: int, align: int) -> tuple[int, int]:
    """``[start, stop)`` of the flattened tensor rank ``rank`` of ``world_size`` owns."""
    chunk = chunk_of(numel, world_size, align)
    start = min(rank * chunk, numel)
    return start, min(start + chunk, numel)


@dataclass(frozen=True)
class Layout:
    """How a checkpoint (or a loading run) cuts its store tensors: None world = whole tensors."""

    world_size: Optional[int] = None
    align: int = 0

    @property
    def partitioned(self) -> bool:
        return self.world_size is not None

    def range(self, numel: int, rank: int) -> tuple[int, int]:
        if self.world_size is None:
            return 0, numel
        return owned_range(numel, self.world_size, rank, self.align)


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of a tensor, stored in ``file`` (written by ``rank``)."""

    file: str
    start: int
    stop: int
    crc32c: int
    rank: Optional[int] = None

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class SavedTensor:
    """One tensor of a checkpoint: its full shape and dtype, and the pieces that hold it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    partitioned: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def piece_shape(self, piece: Piece) -> tuple[int, ...]:
        """The shape the piece has in its file: the full shape when whole, else 1-D."""
        return (piece.numel,) if self.partitioned else self.shape

    def overlapping(self, start: int, stop: int) -> list[Piece]:
        return [p for p in self.pieces if p.start < stop and start < p.stop]


def saved_layout(manifest: dict, file: str) -> Layout:
    """The manifest's partition (checked by :func:`engine.checkpoint.manifest.read_manifest`)."""
    part = manifest.get("partition")
    if part is None:
        return Layout()
    return Layout(int(part["world_size"]), int(part["align_elements"]))


def saved_tensors(manifest: dict, file: str) -> dict[str, SavedTensor]:
    """Every tensor of the manifest with its pieces; a partitioned tensor's pieces must be exactly
    the saving layout's non-empty ranges (each by the rank that owns it), which cover the tensor."""
    layout = saved_layout(manifest, file)
    out = {}
    for name, entry in manifest["tensors"].items():
        dtype = FROM_SAFETENSORS[entry["dtype"]]
        shape = tuple(entry["shape"])
        numel = math.prod(shape)
        if not entry.get("partitioned"):
            pieces: tuple[Piece, ...] = (Piece(entry["file"], 0, numel, entry["crc32c"]),)
            out[name] = SavedTensor(name, dtype, shape, pieces, False)
            continue
        if not layout.partitioned:
            raise CheckpointError(f"{file}: tensor {name!r} is partitioned but the manifest records no partition")
        listed = (Piece(s["file"], s["start"], s["stop"], s["crc32c"], s["rank"]) for s in entry["shards"])
        pieces = tuple(sorted(listed, key=lambda p: p.start))
        assert layout.world_size is not None
        expected = [(r, *layout.range(numel, r)) for r in range(layout.world_size)]
        expected = [(r, a, b) for r, a, b in expected if b > a]
        got = [(p.rank, p.start, p.stop) for p in pieces]
        if got != expected:
            raise CheckpointError(f"{file}: tensor {name!r} ({numel} elements) is held in pieces {got[:8]} "
                                  f"(rank, start, stop), but {layout.world_size} ranks (align "
                                  f"{layout.align}) own {expected[:8]}: the pieces do not cover the tensor as "
                                  "the partition rule cuts it")
        out[name] = SavedTensor(name, dtype, shape, pieces, True)
    return out


def files_to_verify(manifest: dict, rank: int, world_size: int, direct: set[str]) -> list[str]:
    """The files this loading rank reads whole (every byte CRC-checked): those it loads whole
    tensors from (``direct``), plus its share of the rest so that every file is verified by some
    rank - a rank's file by the loading rank ``rank % world_size``, other files round-robin."""
    mine = set(direct)
    for index, (fname, info) in enumerate(sorted(manifest["files"].items())):
        owner = info.get("rank")
        if (owner if owner is not None else index) % world_size == rank:
            mine.add(fname)
    return sorted(mine)
