"""An in-flight TensorStore read or write: its native requests, completion and CRC check.

A :class:`StoreRequest` groups the AsyncIO requests of one ``read_into``/``write_from``
(one per segment piece). :meth:`StoreRequest.wait` surfaces the first I/O error, closes the
tensor's own file in the ``files`` layout, verifies the CRC32C of every whole segment read,
and tells the store it is finished (the store orders later I/O on the key after it).
"""
from __future__ import annotations

from typing import Callable, Hashable, Optional

from ..errors import AsyncIOError, IntegrityError
from .aio import AsyncFile, IORequest
from .segments import Segment, TensorMeta

# (request, buffer offset of the part, segment, verify the whole segment's CRC)
Part = tuple[IORequest, int, Segment, bool]


class StoreRequest:
    """An in-flight ``read_into``/``write_from``. :meth:`wait` raises I/O and integrity errors.

    ``crc(address, length)`` checksums buffer bytes, ``segment_path(meta, segment)`` names the
    file a segment lives in (for the error), ``retire(request)`` tells the store it is done."""

    def __init__(self, meta: TensorMeta, op: str, parts: list[Part], address: int, file: Optional[AsyncFile],
                 span: tuple[int, int], *, crc: Callable[[int, int], int],
                 segment_path: Callable[[TensorMeta, Segment], str], retire: Callable[["StoreRequest"], None]):
        self._meta = meta
        self.op = op
        self.span = span  # bytes [lo, hi) of the tensor it covers
        self._parts = parts
        self._address = address
        self._file = file  # files layout: closed once the request completes
        self._crc = crc
        self._segment_path = segment_path
        self._retire = retire
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
                self._retire(self)
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
        meta = self._meta
        for _request, buffer_offset, seg, whole in self._parts:
            if not whole:
                continue
            expected = meta.crcs[meta.segments.index(seg)]
            if expected is None:
                continue
            actual = self._crc(self._address + buffer_offset, seg.length)
            if actual != expected:
                raise IntegrityError(meta.key, self._segment_path(meta, seg), seg.file_offset, seg.length,
                                     expected, actual)


class InFlight(dict):
    """A store's requests in flight, per key (``key -> [StoreRequest]``): later I/O on a key
    waits for the earlier requests it overlaps, so the data seen is the last data written."""

    def track(self, request: StoreRequest) -> StoreRequest:
        self.setdefault(request.key, []).append(request)
        return request

    def retire(self, request: StoreRequest) -> None:
        pending = self.get(request.key)
        if pending is not None:
            try:
                pending.remove(request)
            except ValueError:
                pass
            if not pending:
                del self[request.key]

    def order_after(self, key: Hashable, ops: tuple[str, ...], lo: int, hi: int) -> None:
        """Waits for the key's in-flight requests of the given kinds that overlap bytes [lo, hi)
        (their owners still see their errors)."""
        for request in [r for r in self.get(key, ()) if r.op in ops and r.span[0] < hi and lo < r.span[1]]:
            try:
                request.wait()
            except Exception:
                pass
