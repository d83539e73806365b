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
"""
from __future__ import annotations

import ctypes
import errno
import math
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Optional, Sequence, Union

import crc32c
import torch

from . import cleanup
from .aio import AsyncFile, AsyncIO, Buffer, IORequest, _buffer_span
from .extents import ExtentAllocator
from ..errors import AsyncIOError, IntegrityError, StoreCapacityError
from ..memory.pool import IO_ALIGNMENT, PinnedPool, round_up_io
from ..units import format_bytes, parse_bytes

PathLike = Union[str, "os.PathLike[str]"]


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
        return torch.empty((), dtype=self.dtype).element_size()

    def segment_range(self, offset: int, end: int) -> range:
        """Indices of the segments overlapping bytes ``[offset, end)``."""
        return range(len(self.segments)) if not self.segments else range(
            next(i for i, s in enumerate(self.segments) if s.tensor_end > offset),
            next((i for i, s in enumerate(self.segments) if s.tensor_offset >= end), len(self.segments)))


class _Backing:
    """One NVMe path: its private directory and, in the direct layout, its swap file/device."""

    def __init__(self, root: str, directory: Optional[str], file: Optional[AsyncFile], allocator: Optional[ExtentAllocator],
                 is_device: bool):
        self.root = root
        self.directory = directory
        self.file = file
        self.allocator = allocator
        self.is_device = is_device


class StoreRequest:
    """An in-flight ``read_into``/``write_from``. :meth:`wait` raises I/O and integrity errors."""

    def __init__(self, store: "TensorStore", meta: TensorMeta, op: str, parts: list[tuple[IORequest, int, Segment, bool]],
                 address: int, file: Optional[AsyncFile], span: tuple[int, int]):
        self._store = store
        self._meta = meta
        self.op = op
        self.span = span  # bytes [lo, hi) of the tensor it covers
        self._parts = parts  # (request, buffer offset of the part, segment, verify whole segment)
        self._address = address
        self._file = file  # files layout: closed once the request completes
        self._finished = False
        self._error: Optional[BaseException] = None

    @property
    def key(self) -> Hashable:
        return self._meta.key

    def done(self) -> bool:
        return self._finished or all(r.done() for r, *_ in self._parts)

    def wait(self) -> None:
        """Blocks until done; raises its I/O or integrity error (again on every later call)."""
        if not self._finished:
            self._finished = True
            try:
                self._complete()
            except BaseException as exc:
                self._error = exc
            finally:
                self._store._retire(self)
        if self._error is not None:
            raise self._error

    def _complete(self) -> None:
        error: Optional[BaseException] = None
        for request, *_ in self._parts:
            try:
                request.wait()
            except AsyncIOError as exc:
                error = error or exc
        if self._file is not None:
            self._file.close()
        if error is not None:
            raise error
        if self.op == "read":
            self._verify()

    def _verify(self) -> None:
        meta, store = self._meta, self._store
        for _request, buffer_offset, seg, whole in self._parts:
            if not whole:
                continue
            expected = meta.crcs[meta.segments.index(seg)]
            if expected is None:
                continue
            actual = store._crc(self._address + buffer_offset, seg.length)
            if actual != expected:
                raise IntegrityError(meta.key, store._segment_path(meta, seg), seg.file_offset, seg.length, expected, actual)


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
                 grow_step: Union[int, str] = "1GiB", stripe_size: Union[int, str] = "16MiB",
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
        # Elements per segment: a multiple of 4096 keeps every dtype's segments 4 KiB-aligned.
        self.segment_elements = round_up_io(parse_bytes(stripe_size) // 4)
        if self.segment_elements <= 0:
            raise ValueError("stripe_size must be positive")
        self.allow_raw_device = allow_raw_device
        self._owns_io = io is None
        self._io = io if io is not None else AsyncIO(backend, pool=pool)
        self._meta: dict[Hashable, TensorMeta] = {}
        self._backings: list[_Backing] = []
        self._next_path = 0  # where the round-robin among equally loaded paths goes next
        self._files_used = [0] * len(roots)  # files layout: bytes of the tensors on each path
        self._file_counter = 0
        self._closed = False
        # Requests in flight per key: a read waits for the key's writes, a write for its reads
        # and writes, so the data seen is always the last data written.
        self._inflight: dict[Hashable, list[StoreRequest]] = {}
        self._stats = dict(bytes_written=0, bytes_read=0, crc_seconds=0.0)
        try:
            for root in roots:
                self._backings.append(self._open_backing(root))
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- backing stores
    def _open_backing(self, root: str) -> _Backing:
        try:
            st = os.stat(root)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"NVMe path {root!r} does not exist", root) from None
        if stat.S_ISBLK(st.st_mode):
            return self._open_device(root, st)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, f"NVMe path {root!r} is not a directory or block device", root)
        cleanup.reclaim(root)  # swap directories of processes that died without removing them
        try:
            directory, lock_fd = cleanup.make_swap_dir(root)  # 0700, named and locked by this process
        except PermissionError:
            raise PermissionError(errno.EACCES, f"NVMe path {root!r} is not writable", root) from None
        cleanup.register(directory, lock_fd)
        if self.layout == "files":
            return _Backing(root, directory, None, None, False)
        file = self._io.open(os.path.join(directory, "swap.bin"), "rw", create=True)
        backing = _Backing(root, directory, file, None, False)
        backing.allocator = ExtentAllocator(0, IO_ALIGNMENT, grow=lambda size: self._grow(backing, size),
                                            grow_step=lambda: self._grow_step(backing))
        return backing

    def _open_device(self, root: str, st: os.stat_result) -> _Backing:
        if not self.allow_raw_device:
            raise ValueError(f"NVMe path {root!r} is a block device; pass allow_raw_device=True to use it raw "
                             "(everything on it will be overwritten)")
        if self.layout != "direct":
            raise ValueError("a raw block device needs the 'direct' layout")
        _refuse_mounted_device(root, st)
        file = self._io.open(root, "rw")
        fd = os.open(root, os.O_RDONLY)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        return _Backing(root, None, file, ExtentAllocator(size, IO_ALIGNMENT), True)

    def _grow_step(self, backing: _Backing) -> int:
        """Growth beyond what was reserved: ``grow_step``, but at most the file's current size
        (geometric growth: a small store stays small) and an eighth of the free space left (a
        small file system is not asked for more than the tensors need)."""
        return min(self.grow_step, max(backing.allocator.capacity, IO_ALIGNMENT), _available_bytes(backing.root) // 8)

    def _grow(self, backing: _Backing, new_size: int) -> None:
        current = backing.allocator.capacity if backing.allocator else 0
        available = _available_bytes(backing.root)
        if new_size - current > available:
            raise StoreCapacityError(new_size - current, available, backing.root)
        fd = os.open(backing.file.path, os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, new_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreCapacityError(new_size - current, _available_bytes(backing.root), backing.root) from None
            raise
        finally:
            os.close(fd)

    def ensure_capacity(self, nbytes: int, largest_extent: Optional[int] = None) -> None:
        """Makes room for ``nbytes`` more of allocations, none larger than ``largest_extent`` bytes
        (default: one segment of 4-byte elements): raises :class:`StoreCapacityError` unless every
        path can hold its share (:func:`path_share`, checked before writing), then grows each swap
        file by exactly that share, so those allocations need no further growth."""
        self._check_open()
        largest = self.segment_elements * 4 if largest_extent is None else largest_extent
        shares = self._shares(nbytes, largest)
        self._check_room(shares)
        for b, share in zip(self._backings, shares):
            if b.allocator is not None and not b.is_device:
                b.allocator.reserve(share)

    def _shares(self, nbytes: int, largest_extent: int) -> list[int]:
        """Free bytes each path needs for ``nbytes`` more, placed on the least-used path: the
        paths' final loads are bounded by the share of everything stored (what is there plus
        ``nbytes``); a path already above it receives nothing."""
        used = [self._used_on(i) for i in range(len(self._backings))]
        target = path_share(sum(used) + nbytes, len(self._backings), largest_extent)
        return [max(0, target - u) for u in used]

    def _check_room(self, shares: list[int]) -> None:
        """Raises :class:`StoreCapacityError` for the first file system (or device) that cannot
        hold the shares of its paths (paths on one file system share its free space)."""
        groups: dict[int, list[tuple[_Backing, int]]] = {}
        for b, share in zip(self._backings, shares):
            if b.is_device:  # fixed size: only its free extents count
                if share > b.allocator.free_bytes:
                    raise StoreCapacityError(share, b.allocator.free_bytes, b.root)
                continue
            groups.setdefault(os.stat(b.root).st_dev, []).append((b, share))
        for members in groups.values():
            needed = sum(b.allocator.growth_for(share) if b.allocator is not None else share for b, share in members)
            available = _available_bytes(members[0][0].root)
            if needed > available:
                raise StoreCapacityError(needed, available, ", ".join(b.root for b, _ in members))

    def _used_on(self, index: int) -> int:
        """Bytes allocated on path ``index``."""
        allocator = self._backings[index].allocator
        return allocator.used_bytes if allocator is not None else self._files_used[index]

    def _least_used_path(self) -> int:
        """The path for the next extent: the one with the fewest bytes allocated, ties going
        round-robin (so a tensor's segments still alternate over equally loaded paths). Greedy
        least-used placement keeps every path within :func:`path_share` of what is stored."""
        n = len(self._backings)
        index = min(((self._next_path + k) % n for k in range(n)), key=self._used_on)
        self._next_path = (index + 1) % n
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
        itemsize = torch.empty((), dtype=dtype).element_size()
        meta = TensorMeta(key, shape, dtype, math.prod(shape) * itemsize)
        step = self.segment_elements * itemsize
        pieces = [(o, min(step, meta.padded_nbytes - o)) for o in range(0, meta.padded_nbytes, step)]
        if self.layout == "files":
            index = self._least_used_path()
            self._files_used[index] += meta.padded_nbytes
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
                self._files_used[meta.segments[0].path_index] -= meta.padded_nbytes
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
        self._order_after(key, ("read", "write"), offset, offset + span)
        file = self._tensor_file(meta, "write")
        parts = []
        try:
            for index in indices:
                seg = meta.segments[index]
                if self.checksum:
                    meta.crcs[index] = self._crc(address + seg.tensor_offset - offset, seg.length)
                target = file if file is not None else self._backings[seg.path_index].file
                parts.append((target.write(seg.file_offset, buffer, seg.length, buffer_offset=seg.tensor_offset - offset),
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
        return self._track(StoreRequest(self, meta, "write", parts, address, file, (offset, offset + span)))

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
        self._order_after(key, ("write",), offset, end)
        file = self._tensor_file(meta, "read")
        parts = []
        for seg in meta.segments:
            lo, hi = max(seg.tensor_offset, offset), min(seg.tensor_end, end)
            if lo >= hi:
                continue
            target = file if file is not None else self._backings[seg.path_index].file
            request = target.read(seg.file_offset + lo - seg.tensor_offset, buffer, hi - lo, buffer_offset=lo - offset)
            parts.append((request, lo - offset, seg, self.checksum and lo == seg.tensor_offset and hi == seg.tensor_end))
        self._stats["bytes_read"] += span
        return self._track(StoreRequest(self, meta, "read", parts, address, file, (offset, end)))

    def _track(self, request: StoreRequest) -> StoreRequest:
        self._inflight.setdefault(request.key, []).append(request)
        return request

    def _retire(self, request: StoreRequest) -> None:
        pending = self._inflight.get(request.key)
        if pending is not None:
            try:
                pending.remove(request)
            except ValueError:
                pass
            if not pending:
                del self._inflight[request.key]

    def _order_after(self, key: Hashable, ops: tuple[str, ...], lo: int, hi: int) -> None:
        """Waits for the key's in-flight requests of the given kinds that overlap bytes [lo, hi)
        (their owners still see their errors)."""
        for request in [r for r in self._inflight.get(key, ()) if r.op in ops and r.span[0] < hi and lo < r.span[1]]:
            try:
                request.wait()
            except Exception:
                pass

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
        staging = _aligned_bytes(meta.padded_nbytes)
        if meta.nbytes:
            staging[: meta.nbytes].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
        self.write_from(key, staging).wait()
        return meta

    def get(self, key: Hashable) -> torch.Tensor:
        """Reads a tensor synchronously into a new CPU tensor."""
        meta = self.meta(key)
        staging = _aligned_bytes(meta.padded_nbytes)
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


def _aligned_bytes(nbytes: int) -> torch.Tensor:
    """A 4 KiB-aligned uint8 CPU tensor of ``nbytes`` (for the synchronous convenience path)."""
    raw = torch.empty(nbytes + IO_ALIGNMENT, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % IO_ALIGNMENT
    return raw[skip: skip + nbytes]


def _available_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _refuse_mounted_device(path: str, st: os.stat_result) -> None:
    """Raises if the block device (or a partition of it) is mounted or held by another user."""
    mount = cleanup.find_mount(st.st_rdev)
    if mount is not None:
        raise ValueError(f"block device {path!r} is mounted at {mount[0]!r}; refusing to use it as raw storage")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)  # the kernel refuses this while the device is mounted or held
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ValueError(f"block device {path!r} is in use (mounted, or a partition of it is); refusing it") from None
        raise
    os.close(fd)
