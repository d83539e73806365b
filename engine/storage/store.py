"""TensorStore: named tensors on NVMe.

Keys (any hashable, e.g. ``("param", name)``, ``("exp_avg", name)``) map to
extents with a dtype and shape. Two layouts:

``direct`` (default)
    One preallocated swap file per NVMe path, grown to what the caller reserves
    (:meth:`TensorStore.ensure_capacity`) and beyond that in steps of at most
    ``grow_step``, the file's size and an eighth of the free space,
    with 4 KiB-aligned extents from a best-fit allocator that reuses freed space.
    With several paths, tensors larger than ``stripe_size`` are striped
    across them: each segment goes to the least-used path (round-robin among equals),
    which bounds what any path holds (:func:`path_share`). A raw block device can be the backing store with
    ``allow_raw_device=True``; a mounted (or otherwise held) device is refused.
``files``
    The ZeRO-Infinity baseline for ablations: one file per tensor, opened on
    every I/O and closed when it completes.

Every tensor is stored as segments of ``stripe_size / 4`` *elements* (16 MiB
of fp32), whatever its dtype: the segment boundaries of a parameter's fp32
master, its bf16 weights and its optimizer states then fall on the same element
indices, so the optimizer can read, update and write back whole segments of
huge tensors. Each segment has a CRC32C computed when it is written and
verified when it is read back whole (a partial read verifies the segments it
covers completely). A mismatch raises :class:`~engine.errors.IntegrityError`
naming the key, file and offset. ``checksum=False`` turns this off.

Swap files live in a private directory (0700; files 0600) under each path and
are removed when the store closes, at process exit, and on SIGTERM. The directory's
name records its owner (see :mod:`engine.storage.cleanup`): when a store opens on a
path it reclaims the directories of processes that died without removing theirs.

This module keeps the store's tensor table, placement and I/O; the pieces it uses live beside
it: :mod:`.segments` (Segment, TensorMeta, path_share), :mod:`.backing` (one path's swap
directory and file, growth, capacity checks), :mod:`.request` (in-flight requests, CRC check).
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import time
from typing import Hashable, Iterable, Optional, Sequence, Union

import crc32c
import torch

from ..errors import AsyncIOError
from ..memory.pool import IO_ALIGNMENT, PinnedPool, round_up_io
from ..units import parse_bytes
from ..validate import AioBackend, StoreLayout, check_choice
from . import cleanup
from .aio import AsyncFile, AsyncIO, Buffer, _buffer_span
from .backing import Backing, check_room, open_backing
from .request import InFlight, Part, StoreRequest
from .segments import (
    DEFAULT_STRIPE_SIZE,
    STRIPE_ELEMENT_BYTES,
    Segment,
    TensorMeta,
    aligned_bytes,
    least_used,
    path_share,
    room_needed,
    segment_elements,
)

__all__ = ["TensorStore", "StoreRequest", "TensorMeta", "Segment", "path_share"]

PathLike = Union[str, "os.PathLike[str]"]


class TensorStore:
    """Named tensors on one or more NVMe paths.

    Args:
        paths: a directory (or block device, see ``allow_raw_device``) or a list of them.
        layout: ``"direct"`` or ``"files"`` (the ablation baseline).
        pool: a PinnedPool to register with io_uring (when the store makes its own AsyncIO).
        io: an AsyncIO to share; by default the store makes one and closes it with itself.
        checksum: CRC32C per segment, verified on read.
        grow_step: swap files grow by at least this much at a time.
        stripe_size: segment size in bytes for 4-byte elements (segments hold ``stripe_size / 4``
            elements of any dtype); with several paths, each segment goes to the least-used path.
        allow_raw_device: allow a raw block device as a path (its contents are overwritten).
        backend: AsyncIO backend when the store makes its own.
    """

    def __init__(self, paths: Union[PathLike, Sequence[PathLike]], *, layout: StoreLayout = "direct",
                 pool: Optional[PinnedPool] = None, io: Optional[AsyncIO] = None, checksum: bool = True,
                 grow_step: Union[int, str] = "1GiB", stripe_size: Union[int, str] = DEFAULT_STRIPE_SIZE,
                 allow_raw_device: bool = False, backend: AioBackend = "auto"):
        check_choice("layout", layout, StoreLayout, "store layout must be {alternatives}, got {value!r}")
        roots = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
        if not roots:
            raise ValueError("TensorStore needs at least one NVMe path")
        if len(set(map(os.path.realpath, roots))) != len(roots):
            raise ValueError(f"NVMe paths must be distinct: {roots}")
        self.layout = layout
        self.checksum = checksum
        self.grow_step = parse_bytes(grow_step)
        self.segment_elements = segment_elements(parse_bytes(stripe_size))
        if self.segment_elements <= 0:
            raise ValueError("stripe_size must be positive")
        self.allow_raw_device = allow_raw_device
        self._owns_io = io is None
        self._io = io if io is not None else AsyncIO(backend, pool=pool)
        self._meta: dict[Hashable, TensorMeta] = {}
        self._backings: list[Backing] = []
        self._next_path = 0  # where the round-robin among equally loaded paths goes next
        self._file_counter = 0
        self._closed = False
        # Requests in flight per key: a read waits for the key's writes, a write for its reads
        # and writes, so the data seen is always the last data written.
        self._inflight = InFlight()
        self._stats = dict(bytes_written=0, bytes_read=0, crc_seconds=0.0)
        try:
            for root in roots:
                self._backings.append(open_backing(root, self._io, layout=layout, grow_step=self.grow_step,
                                                   allow_raw_device=allow_raw_device))
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- capacity
    def ensure_capacity(self, nbytes: int, largest_extent: Optional[int] = None) -> None:
        """Makes room for ``nbytes`` more of allocations, none larger than ``largest_extent`` bytes
        (default: one segment of 4-byte elements): raises :class:`StoreCapacityError` unless every
        path can hold its share (:func:`path_share`, checked before writing), then grows each swap
        file by exactly that share, so those allocations need no further growth."""
        self._check_open()
        largest = self.segment_elements * STRIPE_ELEMENT_BYTES if largest_extent is None else largest_extent
        shares = room_needed([b.used_bytes for b in self._backings], nbytes, largest)
        check_room(self._backings, shares)
        for b, share in zip(self._backings, shares):
            if b.allocator is not None and not b.is_device:
                b.allocator.reserve(share)

    def _least_used_path(self) -> int:
        index = least_used([b.used_bytes for b in self._backings], self._next_path)
        self._next_path = (index + 1) % len(self._backings)
        return index

    # ----------------------------------------------------------------- tensors
    def allocate(self, key: Hashable, shape: Iterable[int], dtype: torch.dtype) -> TensorMeta:
        """Reserves space for a tensor; returns its metadata (the existing one if identical)."""
        self._check_open()
        shape = tuple(int(s) for s in shape)
        existing = self._meta.get(key)
        if existing is not None:
            if existing.shape != shape or existing.dtype != dtype:
                raise ValueError(f"{key!r} is already stored as {existing.dtype}{list(existing.shape)}, "
                                 f"not {dtype}{list(shape)}")
            return existing
        itemsize = dtype.itemsize
        meta = TensorMeta(key, shape, dtype, math.prod(shape) * itemsize)
        step = self.segment_elements * itemsize
        pieces = [(o, min(step, meta.padded_nbytes - o)) for o in range(0, meta.padded_nbytes, step)]
        if self.layout == "files":
            index = self._least_used_path()
            self._backings[index].files_used += meta.padded_nbytes
            self._file_counter += 1
            meta.file = os.path.join(self._backings[index].directory, f"tensor-{self._file_counter:08d}.bin")
            meta.segments = [Segment(index, o, o, n) for o, n in pieces]
        elif len(self._backings) == 1:
            offset = self._backings[0].allocator.allocate(meta.padded_nbytes) if pieces else 0
            meta.segments = [Segment(0, offset + o, o, n) for o, n in pieces]
        else:
            try:
                for o, n in pieces:
                    index = self._least_used_path()
                    meta.segments.append(Segment(index, self._backings[index].allocator.allocate(n), o, n))
            except BaseException:
                self._release_segments(meta)
                raise
        meta.crcs = [None] * len(meta.segments)
        meta.written = [False] * len(meta.segments)
        self._meta[key] = meta
        return meta

    def meta(self, key: Hashable) -> TensorMeta:
        try:
            return self._meta[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the store") from None

    def buffer_nbytes(self, key: Hashable) -> int:
        """Bytes a staging buffer needs to hold the whole tensor (its size rounded up to 4 KiB)."""
        return self.meta(key).padded_nbytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self._meta

    def keys(self) -> list[Hashable]:
        return list(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def free(self, key: Hashable) -> None:
        """Forgets a tensor and returns its space for reuse."""
        self._check_open()
        meta = self._meta.pop(key, None)
        if meta is None:
            raise KeyError(f"{key!r} is not in the store")
        self._release_segments(meta)

    def _release_segments(self, meta: TensorMeta) -> None:
        if self.layout == "files":
            if meta.segments:
                self._backings[meta.segments[0].path_index].files_used -= meta.padded_nbytes
            if meta.file is not None and os.path.exists(meta.file):
                os.unlink(meta.file)
            return
        if len(self._backings) == 1:
            if meta.segments:
                self._backings[0].allocator.free(meta.segments[0].file_offset)
            return
        for seg in meta.segments:
            self._backings[seg.path_index].allocator.free(seg.file_offset)

    # ----------------------------------------------------------------- I/O
    def write_from(self, key: Hashable, buffer: Buffer, offset: int = 0, nbytes: Optional[int] = None) -> StoreRequest:
        """Starts writing bytes ``[offset, offset + nbytes)`` of tensor ``key`` (default: all of it)
        from the start of ``buffer`` (4 KiB-aligned, holding the range rounded up to 4 KiB).

        A partial write covers whole segments: ``offset`` is a segment boundary and the range
        ends at a segment boundary or at the end of the tensor.
        """
        self._check_open()
        meta = self.meta(key)
        if nbytes is None:
            nbytes = meta.nbytes - offset
        end = offset + nbytes
        if offset < 0 or nbytes < 0 or end > meta.nbytes:
            raise ValueError(f"range [{offset}, {end}) is outside {key!r} ({meta.nbytes} bytes)")
        indices = meta.segment_range(offset, end) if nbytes else range(0)
        if indices and (meta.segments[indices[0]].tensor_offset != offset or
                        (end != meta.nbytes and meta.segments[indices[-1]].tensor_end != end)):
            raise ValueError(f"a partial write of {key!r} must cover whole segments of "
                             f"{self.segment_elements} elements, got bytes [{offset}, {end})")
        span = round_up_io(nbytes)
        address, size = _buffer_span(buffer, writable=False)
        if size < span:
            raise ValueError(f"writing {key!r} needs a {span}-byte buffer, got {size} bytes")
        self._inflight.order_after(key, ("read", "write"), offset, offset + span)
        file = self._tensor_file(meta, "write")
        parts = []
        try:
            for index in indices:
                seg = meta.segments[index]
                if self.checksum:
                    meta.crcs[index] = self._crc(address + seg.tensor_offset - offset, seg.length)
                target = file if file is not None else self._backings[seg.path_index].file
                parts.append((target.write(seg.file_offset, buffer, seg.length,
                                           buffer_offset=seg.tensor_offset - offset),
                              seg.tensor_offset - offset, seg, False))
                meta.written[index] = True
        except BaseException:
            for request, *_ in parts:
                try:
                    request.wait()
                except AsyncIOError:
                    pass
            if file is not None:
                file.close()
            raise
        self._stats["bytes_written"] += span
        return self._inflight.track(self._request(meta, "write", parts, address, file, (offset, offset + span)))

    def read_into(self, key: Hashable, buffer: Buffer, offset: int = 0, nbytes: Optional[int] = None) -> StoreRequest:
        """Starts reading bytes ``[offset, offset + nbytes)`` of tensor ``key`` into the start of ``buffer``.

        ``offset`` must be a multiple of 4 KiB; the read covers whole 4 KiB pages, so the
        buffer needs ``nbytes`` rounded up to 4 KiB.
        """
        self._check_open()
        meta = self.meta(key)
        if nbytes is None:
            nbytes = meta.nbytes - offset
        if offset < 0 or nbytes < 0 or offset + nbytes > meta.nbytes:
            raise ValueError(f"range [{offset}, {offset + nbytes}) is outside {key!r} ({meta.nbytes} bytes)")
        if nbytes and not all(meta.written[i] for i in meta.segment_range(offset, offset + nbytes)):
            raise ValueError(f"{key!r} was allocated but never written (bytes [{offset}, {offset + nbytes}))")
        if offset % IO_ALIGNMENT:
            raise ValueError(f"partial reads start at multiples of {IO_ALIGNMENT} bytes, got offset {offset}")
        address, size = _buffer_span(buffer, writable=True)
        span = round_up_io(nbytes)
        if size < span:
            raise ValueError(f"reading {nbytes} bytes of {key!r} needs a {span}-byte buffer, got {size} bytes")
        end = offset + span
        self._inflight.order_after(key, ("write",), offset, end)
        file = self._tensor_file(meta, "read")
        parts = []
        for seg in meta.segments:
            lo, hi = max(seg.tensor_offset, offset), min(seg.tensor_end, end)
            if lo >= hi:
                continue
            target = file if file is not None else self._backings[seg.path_index].file
            request = target.read(seg.file_offset + lo - seg.tensor_offset, buffer, hi - lo, buffer_offset=lo - offset)
            parts.append((request, lo - offset, seg,
                          self.checksum and lo == seg.tensor_offset and hi == seg.tensor_end))
        self._stats["bytes_read"] += span
        return self._inflight.track(self._request(meta, "read", parts, address, file, (offset, end)))

    def _request(self, meta: TensorMeta, op: str, parts: list[Part], address: int, file: Optional[AsyncFile],
                 span: tuple[int, int]) -> StoreRequest:
        return StoreRequest(meta, op, parts, address, file, span, crc=self._crc, segment_path=self._segment_path,
                            retire=self._inflight.retire)

    def _tensor_file(self, meta: TensorMeta, op: str) -> Optional[AsyncFile]:
        """The files layout opens the tensor's own file for every I/O, as ZeRO-Infinity does."""
        if self.layout != "files":
            return None
        if op == "write":
            return self._io.open(meta.file, "rw", create=True)
        return self._io.open(meta.file, "r")

    def _segment_path(self, meta: TensorMeta, seg: Segment) -> str:
        return meta.file if meta.file is not None else self._backings[seg.path_index].file.path

    def _crc(self, address: int, length: int) -> int:
        start = time.perf_counter()
        value = crc32c.crc32c((ctypes.c_char * length).from_address(address))
        self._stats["crc_seconds"] += time.perf_counter() - start
        return value

    # ----------------------------------------------------------------- convenience
    def put(self, key: Hashable, tensor: torch.Tensor) -> TensorMeta:
        """Stores a CPU tensor synchronously (allocating its space if needed)."""
        meta = self.allocate(key, tensor.shape, tensor.dtype)
        staging = aligned_bytes(meta.padded_nbytes)
        if meta.nbytes:
            staging[: meta.nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        self.write_from(key, staging).wait()
        return meta

    def get(self, key: Hashable) -> torch.Tensor:
        """Reads a tensor synchronously into a new CPU tensor."""
        meta = self.meta(key)
        staging = aligned_bytes(meta.padded_nbytes)
        if meta.nbytes:
            self.read_into(key, staging).wait()
        return staging[: meta.nbytes].view(meta.dtype).view(meta.shape)

    def stats(self) -> dict:
        """Layout, paths, bytes reserved/used on disk, tensors, bytes moved, checksum time, I/O backend."""
        reserved = sum(b.allocator.capacity for b in self._backings if b.allocator is not None)
        used = sum(b.allocator.used_bytes for b in self._backings if b.allocator is not None)
        if self.layout == "files":
            used = reserved = sum(m.padded_nbytes for m in self._meta.values())
        return dict(layout=self.layout, paths=[b.root for b in self._backings], tensors=len(self._meta),
                    disk_reserved=reserved, disk_used=used, checksum=self.checksum,
                    backend=self._io.backend if self._io is not None else None, **self._stats)

    @property
    def directories(self) -> list[str]:
        """The private directories holding the swap files (empty for raw devices)."""
        return [b.directory for b in self._backings if b.directory is not None]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("TensorStore is closed")

    def close(self) -> None:
        """Waits for outstanding I/O, closes and removes the swap files and private directories.
        Every step runs even when an earlier one fails (a failed I/O must not leave the swap
        directory behind); the first error is raised once, after all of them."""
        if self._closed:
            return
        self._closed = True
        steps = [b.file.close for b in self._backings if b.file is not None and not b.file.closed]
        if self._owns_io and self._io is not None:
            steps.append(self._io.close)
        steps += [lambda d=b.directory: self._remove_directory(d) for b in self._backings if b.directory is not None]
        first: Optional[BaseException] = None
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - reported below, after every resource is released
                first = first or exc
        self._meta.clear()
        if first is not None:
            raise first

    @staticmethod
    def _remove_directory(directory: str) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        cleanup.unregister(directory)

    def __enter__(self) -> "TensorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
