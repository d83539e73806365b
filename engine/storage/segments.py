"""What the TensorStore records about one stored tensor, and how extents spread over paths.

:class:`Segment` (one aligned piece of a tensor on one backing path), :class:`TensorMeta`
(a tensor's key, shape, dtype, segments and checksums) and :func:`path_share` (the bytes each
path must hold under least-used placement, shared by the store and the planner). Pure data
and arithmetic: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch

from ..memory.pool import IO_ALIGNMENT, round_up_io

# Segments hold ``stripe_size / 4`` elements of any dtype (4: the bytes of an fp32 element), so a
# parameter's fp32 master, its low-precision weights and its moments split at the same indices.
STRIPE_ELEMENT_BYTES = 4
DEFAULT_STRIPE_SIZE = 16 << 20


def segment_elements(stripe_size: int) -> int:
    """Elements per segment for ``stripe_size`` bytes: a multiple of 4096 keeps every dtype's segments 4 KiB-aligned."""
    return round_up_io(stripe_size // STRIPE_ELEMENT_BYTES)


DEFAULT_SEGMENT_ELEMENTS = segment_elements(DEFAULT_STRIPE_SIZE)  # 4 Mi elements


def least_used(used: list[int], start: int) -> int:
    """The path for the next extent: the one with the fewest bytes allocated, ties going
    round-robin from ``start`` (so a tensor's segments still alternate over equally loaded paths).
    Greedy least-used placement keeps every path within :func:`path_share` of what is stored."""
    n = len(used)
    return min(((start + k) % n for k in range(n)), key=used.__getitem__)


def room_needed(used: list[int], nbytes: int, largest_extent: int) -> list[int]:
    """Free bytes each path needs for ``nbytes`` more, placed on the least-used path: the paths'
    final loads are bounded by the share of everything stored (what is there plus ``nbytes``);
    a path already above it receives nothing."""
    target = path_share(sum(used) + nbytes, len(used), largest_extent)
    return [max(0, target - u) for u in used]


@dataclass(frozen=True)
class Segment:
    """A piece of a tensor on disk: ``length`` bytes (aligned) at ``file_offset`` of backing
    ``path_index``, holding the tensor's bytes from ``tensor_offset``."""

    path_index: int
    file_offset: int
    tensor_offset: int
    length: int

    @property
    def tensor_end(self) -> int:
        return self.tensor_offset + self.length


@dataclass
class TensorMeta:
    """Where and what one stored tensor is."""

    key: Hashable
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    segments: list[Segment] = field(default_factory=list)
    crcs: list[Optional[int]] = field(default_factory=list)
    written: list[bool] = field(default_factory=list)  # per segment
    file: Optional[str] = None  # the tensor's own file in the ``files`` layout

    @property
    def padded_nbytes(self) -> int:
        return round_up_io(self.nbytes)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def segment_range(self, offset: int, end: int) -> range:
        """Indices of the segments overlapping bytes ``[offset, end)``."""
        return range(len(self.segments)) if not self.segments else range(
            next(i for i, s in enumerate(self.segments) if s.tensor_end > offset),
            next((i for i, s in enumerate(self.segments) if s.tensor_offset >= end), len(self.segments)))


def largest_extent(nbytes: int, itemsize: int, segment_elements: int, layout: str) -> int:
    """The largest extent the store gives a tensor of ``nbytes``: one segment (``direct``), or the
    whole (aligned) tensor, its own file (``files``)."""
    padded = round_up_io(nbytes)
    return padded if layout == "files" else min(padded, segment_elements * itemsize)


def path_share(nbytes: int, npaths: int, largest_extent: int) -> int:
    """Bytes each of ``npaths`` paths must hold so that ``nbytes`` of extents, none larger than
    ``largest_extent``, fit when each extent goes to the least-used path (the store's placement):
    the even share plus ``(npaths - 1) / npaths`` of the largest extent, aligned. Why: the path
    that ends fullest was the least used (at most the average of the rest) when it received its
    last extent. The planner's check, the store's check and its reservation all use this figure."""
    if npaths <= 1:
        return round_up_io(nbytes)
    spill = (npaths - 1) * min(round_up_io(largest_extent), round_up_io(nbytes))
    return round_up_io(-(-(nbytes + spill) // npaths))


def aligned_bytes(nbytes: int) -> torch.Tensor:
    """A 4 KiB-aligned uint8 CPU tensor of ``nbytes`` (for the synchronous convenience path)."""
    raw = torch.empty(nbytes + IO_ALIGNMENT, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % IO_ALIGNMENT
    return raw[skip: skip + nbytes]
