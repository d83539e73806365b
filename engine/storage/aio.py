"""AsyncIO: asynchronous O_DIRECT file I/O through io_uring or a thread pool.

Backends:
    ``uring``   liburing, one ring of ``queue_depth`` entries; a registered
                PinnedPool arena is used through READ_FIXED/WRITE_FIXED.
    ``threads`` ``threads`` workers doing pread/pwrite.
``backend="auto"`` (the default) picks ``uring`` when it was compiled in and
``io_uring_setup`` works, else ``threads`` (and says so once). The environment
variable ``MEMASCEND_AIO_BACKEND`` overrides ``auto``. The backend that ran is
always visible as :attr:`AsyncIO.backend`.

Every request is split into ``block_size`` chunks. Every completion result is
checked: a failure raises :class:`~engine.errors.AsyncIOError` naming the file,
offset and byte count when the request is waited; a short transfer is completed
by resubmitting the remainder; reading past end of file is an error.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from .. import _native
from .._log import logger, warn_once
from ..errors import AsyncIOError
from ..memory.pool import IO_ALIGNMENT, PinnedPool, PoolBlock
from ..units import format_bytes
from ..validate import AioBackend, check_choice

BACKEND_ENV = "MEMASCEND_AIO_BACKEND"
Buffer = Union[PoolBlock, torch.Tensor, memoryview, bytearray, Any]


def _buffer_span(buffer: Buffer, writable: bool) -> tuple[int, int]:
    """(address, nbytes) of a buffer the engine may read into (``writable``) or write from."""
    if isinstance(buffer, PoolBlock):
        return buffer.address, buffer.size
    if isinstance(buffer, torch.Tensor):
        if buffer.device.type != "cpu":
            raise ValueError(f"I/O buffers must be CPU tensors, got a tensor on {buffer.device}")
        if not buffer.is_contiguous():
            raise ValueError("I/O buffers must be contiguous tensors")
        return buffer.data_ptr(), buffer.numel() * buffer.element_size()
    try:
        return _native.buffer_address(buffer, writable)
    except BufferError as exc:
        raise ValueError(f"cannot {'read into' if writable else 'write from'} {type(buffer).__name__}: {exc}") from exc
    except TypeError as exc:
        raise TypeError(f"not a buffer: {type(buffer).__name__} "
                        "(use a PoolBlock, a CPU tensor or a bytes-like object)") from exc


class IORequest:
    """A submitted read or write. Holds its buffer alive until it is waited."""

    __slots__ = ("_io", "_id", "_buffer", "op", "path", "offset", "nbytes", "_done")

    def __init__(self, io: "AsyncIO", request_id: int, buffer: Buffer, op: str, path: str, offset: int, nbytes: int):
        self._io = io
        self._id = request_id
        self._buffer = buffer
        self.op = op
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self._done = False

    def done(self) -> bool:
        """True when the request has completed (successfully or not); never blocks."""
        return self._done or self._io._native().poll(self._id)

    def wait(self) -> None:
        """Blocks until the request completes; raises :class:`AsyncIOError` if it failed."""
        if self._done:
            return
        self._io._retire(self)

    def __repr__(self) -> str:
        return f"IORequest({self.op} {self.nbytes} bytes at {self.offset} of {self.path!r}, done={self._done})"


class AsyncFile:
    """A file opened through an :class:`AsyncIO` (O_DIRECT by default)."""

    def __init__(self, io: "AsyncIO", file_id: int, path: str, direct: bool):
        self._io = io
        self.id = file_id
        self.path = path
        self.direct = direct
        self.closed = False

    def read(self, offset: int, buffer: Buffer, nbytes: Optional[int] = None, buffer_offset: int = 0) -> IORequest:
        """Starts reading ``nbytes`` (default: the whole buffer) at ``offset`` into ``buffer``."""
        return self._io.submit("read", self, offset, buffer, nbytes, buffer_offset)

    def write(self, offset: int, buffer: Buffer, nbytes: Optional[int] = None, buffer_offset: int = 0) -> IORequest:
        """Starts writing ``nbytes`` (default: the whole buffer) from ``buffer`` at ``offset``."""
        return self._io.submit("write", self, offset, buffer, nbytes, buffer_offset)

    def size(self) -> int:
        return os.stat(self.path).st_size

    def close(self) -> None:
        """Waits for this file's outstanding I/O, then closes it."""
        if not self.closed:
            self._io._native().close_file(self.id)
            self.closed = True

    def __enter__(self) -> "AsyncFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AsyncFile({self.path!r}, direct={self.direct}, closed={self.closed})"


class AsyncIO:
    """Asynchronous file I/O engine.

    Args:
        backend: ``"auto"``, ``"uring"`` or ``"threads"``.
        queue_depth: io_uring submission queue depth (requests in flight).
        block_size: large requests are split into chunks of this many bytes.
        threads: worker threads of the ``threads`` backend.
        alignment: O_DIRECT alignment of buffers, offsets and lengths.
        pool: a :class:`PinnedPool` whose arena is registered as io_uring fixed buffers.
    """

    def __init__(
        self,
        backend: AioBackend = "auto",
        *,
        queue_depth: int = 32,
        block_size: int = 1 << 20,
        threads: int = 4,
        alignment: int = IO_ALIGNMENT,
        pool: Optional[PinnedPool] = None,
    ):
        if backend == "auto":  # the environment may choose (tests force the fallback this way)
            backend = os.environ.get(BACKEND_ENV, "auto") or "auto"  # type: ignore[assignment]  # checked next
        check_choice("backend", backend, AioBackend, "unknown AsyncIO backend {value!r} (expected {alternatives})")
        args = dict(block_size=block_size, alignment=alignment, queue_depth=queue_depth, threads=threads)
        self._io: Optional[_native.AsyncIO] = None
        if backend == "auto":
            try:
                self._io = _native.AsyncIO("uring", **args)
            except RuntimeError as exc:
                warn_once("aio-fallback", f"AsyncIO: {exc}; using the thread-pool backend")
                self._io = _native.AsyncIO("threads", **args)
        else:
            self._io = _native.AsyncIO(backend, **args)
        self._pending: dict[int, IORequest] = {}
        self._files: list[AsyncFile] = []
        self._pool = pool
        self.fixed_buffers = False
        if pool is not None:
            self._register_pool(pool)
        logger.debug("AsyncIO: backend %s, queue depth %d, block size %d", self.backend, self.queue_depth, block_size)

    def _register_pool(self, pool: PinnedPool) -> None:
        if self.backend != "uring":
            return
        rc = self._native().register_buffers([(pool.base, pool.capacity)])
        if rc == 0:
            self.fixed_buffers = True
        else:
            warn_once("aio-fixed", f"AsyncIO: registering the pool ({format_bytes(pool.capacity)}) as io_uring fixed "
                      f"buffers failed ({os.strerror(-rc)}); using unregistered buffers")

    def _native(self) -> "_native.AsyncIO":
        if self._io is None:
            raise ValueError("AsyncIO is closed")
        return self._io

    @property
    def backend(self) -> str:
        """``"uring"`` or ``"threads"``: the backend actually running."""
        return self._native().backend

    @property
    def queue_depth(self) -> int:
        return self._native().queue_depth

    @property
    def block_size(self) -> int:
        return self._native().block_size

    @property
    def alignment(self) -> int:
        return self._native().alignment

    def open(self, path: Union[str, os.PathLike], mode: str = "r", *, direct: bool = True, create: bool = False,
             size: Optional[int] = None) -> AsyncFile:
        """Opens ``path`` for ``mode`` ``"r"``, ``"w"`` or ``"rw"``.

        ``create`` makes the file (mode 0600) if missing; ``size`` preallocates it
        with fallocate. ``direct`` uses O_DIRECT (buffers, offsets and lengths must
        then be aligned to :attr:`alignment`).
        """
        flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}.get(mode)
        if flags is None:
            raise ValueError(f"mode must be 'r', 'w' or 'rw', got {mode!r}")
        flags |= os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        if direct:
            flags |= os.O_DIRECT
        path = os.fspath(path)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            if direct and exc.errno == 22:  # EINVAL: the file system refuses O_DIRECT (e.g. tmpfs)
                raise OSError(exc.errno, f"the file system of {path!r} does not support O_DIRECT; "
                              "put it on a disk file system or open with direct=False", path) from exc
            raise
        try:
            if size is not None:
                self._preallocate(fd, path, size)
            file_id = self._native().add_file(fd, path, direct)
        except BaseException:
            os.close(fd)
            raise
        f = AsyncFile(self, file_id, path, direct)
        self._files.append(f)
        return f

    @staticmethod
    def _preallocate(fd: int, path: str, size: int) -> None:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            free = os.statvfs(os.path.dirname(os.path.abspath(path)))
            raise OSError(exc.errno, f"cannot preallocate {format_bytes(size)} for {path!r}: {exc.strerror} "
                          f"({format_bytes(free.f_bavail * free.f_frsize)} free)", path) from exc

    def submit(self, op: str, file: AsyncFile, offset: int, buffer: Buffer, nbytes: Optional[int] = None,
               buffer_offset: int = 0) -> IORequest:
        """Starts a ``"read"`` or ``"write"`` of ``nbytes`` (default: the rest of the buffer) between
        ``buffer`` (from byte ``buffer_offset``) and ``file`` at ``offset``."""
        if op not in ("read", "write"):
            raise ValueError(f"op must be 'read' or 'write', got {op!r}")
        if file.closed or file._io is not self:
            raise ValueError(f"{op} on closed file {file.path!r}" if file.closed else "file belongs to another AsyncIO")
        address, size = _buffer_span(buffer, writable=(op == "read"))
        if buffer_offset < 0 or buffer_offset > size:
            raise ValueError(f"buffer offset {buffer_offset} outside the {size}-byte buffer")
        address, size = address + buffer_offset, size - buffer_offset
        if nbytes is None:
            nbytes = size
        if nbytes < 0 or nbytes > size:
            raise ValueError(f"{op} of {nbytes} bytes does not fit the {size}-byte buffer")
        if offset < 0:
            raise ValueError(f"negative file offset {offset}")
        request_id = self._native().submit(op == "write", file.id, offset, address, nbytes)
        request = IORequest(self, request_id, buffer, op, file.path, offset, nbytes)
        self._pending[request_id] = request
        return request

    def _retire(self, request: IORequest) -> None:
        error = self._native().wait(request._id)
        request._done = True
        request._buffer = None
        self._pending.pop(request._id, None)
        if error is not None:
            raise AsyncIOError(*error)

    def wait_all(self) -> None:
        """Waits for every outstanding request; raises the first failure (counting the others)."""
        self._native().wait_idle()
        errors = []
        for request in list(self._pending.values()):
            try:
                self._retire(request)
            except AsyncIOError as exc:
                errors.append(exc)
        if errors:
            first = errors[0]
            if len(errors) > 1:
                first.strerror = f"{first.strerror} (and {len(errors) - 1} more failed requests)"
            raise first

    def stats(self) -> dict:
        """Backend, queue depth, fixed buffers, request/chunk/byte counters, retries, errors."""
        stats = self._native().stats()
        stats.update(backend=self.backend, queue_depth=self.queue_depth, block_size=self.block_size,
                     fixed_buffers=self.fixed_buffers, registered_bytes=self._native().registered_bytes)
        return stats

    def inject_fault(self, nth: int, errno: int) -> None:
        """Test hook: the ``nth`` chunk submitted from now fails with ``errno``, or
        transfers only half of its bytes (a short count) when ``errno`` is 0."""
        self._native().inject_fault(nth, errno)

    def close(self) -> None:
        """Waits for outstanding I/O (its errors are not raised), closes every file, stops the backend."""
        if self._io is None:
            return
        self._io.wait_idle()
        for request in list(self._pending.values()):
            self._io.wait(request._id)
            request._done = True
            request._buffer = None
        self._pending.clear()
        for f in self._files:
            f.closed = True
        self._io.close()
        self._io = None

    def __enter__(self) -> "AsyncIO":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Buffers in flight must outlive the kernel's use of them.
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._io is None:
            return "AsyncIO(closed)"
        return f"AsyncIO(backend={self.backend!r}, queue_depth={self.queue_depth}, fixed_buffers={self.fixed_buffers})"
