"""Where a safetensors file's byte stream goes: appended through the page cache, or with O_DIRECT.

:func:`open_sink` picks the direct sink when an AsyncIO engine and pinned blocks are given and
the file system supports O_DIRECT (tmpfs does not: a one-time warning, then the page cache).
Both create the file private (0600, O_EXCL | O_NOFOLLOW) and fsync it in ``finish``.
"""
from __future__ import annotations

import errno
import os
from typing import Optional, Union

from .._log import warn_once
from ..memory.pool import IO_ALIGNMENT, PoolBlock, round_up_io
from ..storage.aio import AsyncIO
from .format import write_all
from .private import open_private


class BufferedSink:
    """Appends to a new file through the page cache (file systems without O_DIRECT, e.g. tmpfs)."""

    def __init__(self, path: str, dir_fd: Optional[int] = None):
        self.path = path
        self.fd = open_private(_name(path, dir_fd), dir_fd)

    def append(self, data: memoryview) -> None:
        write_all(self.fd, data)

    def finish(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirectSink:
    """Appends to a new file with O_DIRECT through the AsyncIO engine: the byte stream is packed
    into pinned blocks (one fills while the other is written), the file is preallocated and cut
    to its exact size at the end. Bypasses the page cache, whose write-back throttling otherwise
    limits a large checkpoint to a single stream's bandwidth."""

    def __init__(self, io: AsyncIO, path: str, total: int, blocks: list[PoolBlock], dir_fd: Optional[int] = None):
        os.close(open_private(_name(path, dir_fd), dir_fd))
        self.path, self.total = path, total
        # The native engine opens by path: through the directory's descriptor when there is one.
        where = path if dir_fd is None else f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
        self.file = io.open(where, "w", direct=True, size=max(round_up_io(total), IO_ALIGNMENT))
        self.blocks = blocks
        self.views = [b.memoryview() for b in blocks]
        self.pending: list = [None] * len(blocks)
        self.index = self.fill = self.offset = 0

    def _wait(self, i: int) -> None:
        request, self.pending[i] = self.pending[i], None
        if request is not None:
            request.wait()

    def append(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" else data
        while len(data):
            if self.fill == 0:
                self._wait(self.index)  # the block's previous write must be done before refilling it
            view = self.views[self.index]
            n = min(len(data), len(view) - self.fill)
            view[self.fill:self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == len(view):
                self._flush()

    def _flush(self) -> None:
        if self.fill:
            nbytes = round_up_io(self.fill)  # the tail beyond the data is cut off by finish()
            self.pending[self.index] = self.file.write(self.offset, self.blocks[self.index], nbytes)
            self.offset += nbytes
            self.index = (self.index + 1) % len(self.blocks)
            self.fill = 0

    def finish(self) -> None:
        self._flush()
        for i in range(len(self.blocks)):
            self._wait(i)
        self.file.close()
        os.truncate(self.path, self.total)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        for i in range(len(self.blocks)):
            try:
                self._wait(i)
            except Exception:  # the first error is already propagating
                pass
        if not self.file.closed:
            self.file.close()
        self.views.clear()


def _name(path: str, dir_fd: Optional[int]) -> str:
    """What to open: ``path``, or its file name relative to ``dir_fd``."""
    return path if dir_fd is None else os.path.basename(path)


def open_sink(path: str, total: int, io: Optional[AsyncIO], stream_blocks: list[PoolBlock],
              dir_fd: Optional[int] = None) -> Union[BufferedSink, DirectSink]:
    """A sink for the new file ``path`` (with ``dir_fd``: ``path``'s file name in that directory,
    ``path`` naming it in errors)."""
    if io is None or not stream_blocks:
        return BufferedSink(path, dir_fd)
    try:
        return DirectSink(io, path, total, stream_blocks, dir_fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        try:
            os.unlink(_name(path, dir_fd), dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        warn_once("checkpoint-buffered", f"checkpoint: {os.path.dirname(path)!r} does not support O_DIRECT; "
                  "writing through the page cache")
        return BufferedSink(path, dir_fd)
