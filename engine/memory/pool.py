"""PinnedPool: the one page-locked arena all host staging memory comes from.

The arena is reserved once (anonymous mmap, optionally transparent huge pages,
mlock'ed) and sub-allocated exactly: a request is rounded up to the I/O alignment
(4 KiB) and no further, unlike PyTorch's caching host allocator which rounds to
a power of two. When CUDA is available the whole arena is registered with CUDA
once, so every block is valid for asynchronous host<->device copies.

Memory safety: a :class:`PoolBlock` returns its memory to the pool only when the
block *and every tensor viewing it* are gone; :meth:`PoolBlock.free` refuses to
free a block that still has live views.
"""
from __future__ import annotations

import math
import os
import resource
import sys
from typing import Optional, Sequence, Union

import torch

from .. import _native, dtypes
from .._log import logger, warn_once
from ..errors import PinnedMemoryError, PoolExhaustedError
from ..units import format_bytes, parse_bytes

IO_ALIGNMENT = 4096


def round_up_io(nbytes: int) -> int:
    """``nbytes`` rounded up to the I/O alignment (what O_DIRECT transfers and pool blocks take)."""
    return -(-nbytes // IO_ALIGNMENT) * IO_ALIGNMENT


class PoolBlock:
    """One exact-size allocation from a :class:`PinnedPool`."""

    __slots__ = ("_native", "__weakref__")

    def __init__(self, native_block: "_native.Block"):
        self._native = native_block

    def _block(self) -> "_native.Block":
        if self._native is None:
            raise ValueError("PoolBlock was freed")
        return self._native

    @property
    def address(self) -> int:
        """Address of the first byte (aligned to the pool's alignment)."""
        return self._block().address

    @property
    def offset(self) -> int:
        """Offset of the block inside the pool's arena."""
        return self._block().offset

    @property
    def size(self) -> int:
        """Bytes owned by the block: the request rounded up to the alignment."""
        return self._block().size

    @property
    def nbytes(self) -> int:
        """Bytes originally requested."""
        return self._block().requested

    @property
    def freed(self) -> bool:
        return self._native is None

    def tensor(self, shape: Union[int, Sequence[int]], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """A CPU tensor of ``shape``/``dtype`` viewing this block's memory from byte ``offset``.

        The tensor keeps the block's memory alive: it is never returned to the pool
        while the tensor (or any view of it) exists.
        """
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = math.prod(shape)
        itemsize = dtype.itemsize
        block = self._block()
        if offset < 0 or offset % itemsize:
            raise ValueError(f"offset {offset} must be a non-negative multiple of the {dtype} item size {itemsize}")
        if offset + numel * itemsize > block.size:
            raise ValueError(
                f"a {dtype} tensor of shape {shape} at offset {offset} needs {offset + numel * itemsize} bytes; "
                f"the block has {block.size}"
            )
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(block, dtype=dtype, count=numel, offset=offset).view(shape)

    def memoryview(self) -> memoryview:
        """A writable byte view of the whole block (keeps the memory alive like a tensor)."""
        return memoryview(self._block())

    def live_views(self) -> int:
        """Number of live references to the memory other than this block itself."""
        if self._native is None:
            return 0
        # 1 for our slot, 1 for getrefcount's argument; the rest are views
        # (memoryviews and tensors hold the exporter while they live).
        return sys.getrefcount(self._native) - 2

    def free(self) -> None:
        """Returns the memory to the pool now. Raises BufferError if views of it are alive."""
        if self._native is None:
            return
        views = self.live_views()
        if views > 0:
            raise BufferError(
                f"PoolBlock at offset {self._native.offset} still has {views} live view(s); "
                "delete them before freeing (or drop the block and the memory is freed with its last view)"
            )
        self._native = None

    def __repr__(self) -> str:
        if self._native is None:
            return "PoolBlock(freed)"
        return f"PoolBlock(offset={self.offset}, size={self.size}, requested={self.nbytes})"


class PinnedPool:
    """A page-locked arena with exact, best-fit, coalescing sub-allocation.

    Args:
        capacity: arena size in bytes (int or a string such as ``"4GiB"``), rounded
            up to ``alignment``.
        alignment: allocation granularity; 4096 matches O_DIRECT.
        hugepages: ask for transparent huge pages (``madvise(MADV_HUGEPAGE)``).
        lock: page-lock the arena with ``mlock``. If that fails (RLIMIT_MEMLOCK),
            the pool warns once and reports ``locked=False`` in :meth:`stats`.
        require_locked: raise :class:`PinnedMemoryError` instead of warning.
        register_cuda: register the arena with CUDA (``cudaHostRegister``); by
            default when ``torch.cuda.is_available()``.
    """

    def __init__(
        self,
        capacity: Union[int, str],
        *,
        alignment: int = IO_ALIGNMENT,
        hugepages: bool = False,
        lock: bool = True,
        require_locked: bool = False,
        register_cuda: Optional[bool] = None,
    ):
        nbytes = parse_bytes(capacity)
        if nbytes <= 0:
            raise ValueError(f"PinnedPool capacity must be positive, got {capacity!r}")
        self._arena: Optional[_native.Arena] = _native.Arena(nbytes, alignment, hugepages, lock)
        self._cuda_registered = False
        stats = self._arena.stats()
        if lock and not stats["locked"]:
            soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else format_bytes(soft)
            message = (
                f"PinnedPool: could not page-lock {format_bytes(self.capacity)} "
                f"({os.strerror(stats['lock_errno'])}; RLIMIT_MEMLOCK is {limit}); "
                "using pageable memory. Raise the limit (ulimit -l) to lock it."
            )
            if require_locked:
                self._arena = None
                raise PinnedMemoryError(stats["lock_errno"], message)
            warn_once("pool-unlocked", message)
        if register_cuda is None:
            register_cuda = torch.cuda.is_available()
        if register_cuda:
            self._register_cuda()

    def _register_cuda(self) -> None:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.base, self.capacity, 0)
        if int(err) != 0:
            warn_once("pool-cuda", f"PinnedPool: cudaHostRegister of {format_bytes(self.capacity)} failed ({err}); "
                      "host-device copies from the pool will be synchronous")
            return
        self._cuda_registered = True
        logger.info("PinnedPool: %s registered with CUDA", format_bytes(self.capacity))

    def _live(self) -> "_native.Arena":
        if self._arena is None:
            raise ValueError("PinnedPool is closed")
        return self._arena

    @property
    def base(self) -> int:
        """Address of the arena's first byte."""
        return self._live().base

    @property
    def capacity(self) -> int:
        return self._live().capacity

    @property
    def alignment(self) -> int:
        return self._live().alignment

    @property
    def locked(self) -> bool:
        return bool(self._live().stats()["locked"])

    @property
    def cuda_registered(self) -> bool:
        return self._cuda_registered

    def alloc(self, nbytes: int) -> PoolBlock:
        """Allocates ``nbytes`` (rounded up to the alignment); raises :class:`PoolExhaustedError`."""
        arena = self._live()
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise ValueError(f"PinnedPool.alloc: nbytes must be a positive int, got {nbytes!r}")
        result = arena.try_alloc(nbytes)
        if isinstance(result, tuple):
            requested, free_bytes, largest = result
            raise PoolExhaustedError(requested, free_bytes, largest, arena.capacity)
        return PoolBlock(result)

    def alloc_tensor(self, shape: Union[int, Sequence[int]], dtype: torch.dtype) -> torch.Tensor:
        """Allocates a block just large enough for ``shape``/``dtype`` and returns its tensor view.

        The block is freed when the tensor and all its views are gone.
        """
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = dtypes.nbytes(shape, dtype)
        return self.alloc(max(nbytes, 1)).tensor(shape, dtype)

    def stats(self) -> dict:
        """capacity, in_use, requested, peak_in_use, live/total allocations, free bytes,
        largest free block, fragmentation, locked, hugepages, cuda_registered."""
        stats = self._live().stats()
        stats["cuda_registered"] = self._cuda_registered
        return stats

    def free_blocks(self) -> dict:
        """Free blocks as ``{offset: size}`` (diagnostics)."""
        return self._live().free_blocks()

    def close(self) -> None:
        """Releases the pool. Memory still viewed by live blocks stays mapped until they go."""
        if self._arena is None:
            return
        if self._cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.base)
            self._cuda_registered = False
        self._arena = None

    def __enter__(self) -> "PinnedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._arena is None:
            return "PinnedPool(closed)"
        s = self.stats()
        return (f"PinnedPool(capacity={format_bytes(s['capacity'])}, in_use={format_bytes(s['in_use'])}, "
                f"locked={s['locked']})")
