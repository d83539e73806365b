"""Chunked copies between the TensorStore and safetensors files, through pinned pool blocks.

Saving reads a tensor from the store one segment at a time into a pool block
(whole segments, so the store's CRC32C is verified) and writes it to the file
while the next segment is read; loading reads a segment from the file into a
block and writes it to the store while the next one is read. Host memory is two
blocks of one segment (16 MiB of fp32 by default), whatever the model size.
Every byte written gets a CRC32C (per tensor and per file), checked on load.
"""
from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Union

import crc32c
import torch

from ..dtypes import itemsize
from ..memory.pool import PoolBlock, round_up_io
from ..storage.aio import AsyncIO
from ..storage.segments import STRIPE_ELEMENT_BYTES
from ..storage.staging import STAGING_BLOCKS
from ..storage.store import TensorStore
from .atomic import pause_point
from .format import (
    CheckpointError,
    SafetensorsFile,
    TensorInfo,
    build_header,
    named_write_error,
    open_regular,
    pread_into,
)
from .sinks import open_sink

# A tensor computed only when it is written (a merged LoRA weight): one exists at a time.
Producer = Callable[[], torch.Tensor]


@dataclass
class StoreSource:
    """A tensor to save that lives in the store under ``key``."""

    key: Hashable


@dataclass
class Entry:
    """One tensor of a file being written: from the store, from a (small) CPU tensor, or from a
    :data:`Producer` called when the tensor's turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: Union[StoreSource, torch.Tensor, Producer]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def chunk_elements(store: TensorStore, dtype: torch.dtype, block_bytes: int, numel: int, name: str) -> int:
    """Elements per chunk of a ``numel``-element tensor: one store segment (whole segments are the
    unit of the store's partial writes and of its CRC checks). A tensor smaller than a segment is
    one chunk, so the block only has to hold the tensor: e.g. an 89x48 fp32 embedding (17088
    bytes) in a 20480-byte block."""
    seg = store.segment_elements
    if min(seg, numel) * itemsize(dtype) > block_bytes:
        raise CheckpointError(f"tensor {name!r}: a {block_bytes}-byte staging block cannot hold one store segment "
                              f"({min(seg, numel)} {dtype} elements); this is an engine bug, please report it")
    return seg


def staging_bytes_for(store: TensorStore, largest_nbytes: int) -> int:
    """Block size for chunked copies: one fp32 segment, or less when every tensor is smaller
    (``largest_nbytes``: the largest tensor as fp32, so every dtype up to 4 bytes fits)."""
    return round_up_io(max(1, min(store.segment_elements * STRIPE_ELEMENT_BYTES, largest_nbytes)))


# ---------------------------------------------------------------------------------------------- save
def write_safetensors(path: str, entries: list[Entry], store: Optional[TensorStore], blocks: list[PoolBlock],
                      metadata: Optional[dict] = None, io: Optional[AsyncIO] = None,
                      dir_fd: Optional[int] = None) -> dict:
    """Writes ``entries`` to a new file ``path`` (0600, fsync'ed before returning); with ``dir_fd``
    the file is ``path``'s name opened in that directory (``path`` names it in errors).

    Store tensors are read segment by segment into ``blocks`` while the previous segment is
    written to the file. With ``io``, half of ``blocks`` carry the file's byte stream and it is
    written with O_DIRECT (page cache bypassed), otherwise through the page cache. Returns
    ``bytes``, ``crc32c`` of the whole file and per-tensor ``tensors`` CRCs."""
    header, infos = build_header([(e.name, e.dtype, e.shape) for e in entries], metadata)
    tensor_crcs = {e.name: 0 for e in entries}
    file_crc = crc32c.crc32c(header)
    total = len(header) + sum(e.nbytes for e in entries)
    if io is not None and len(blocks) >= 2 * STAGING_BLOCKS:
        blocks, stream_blocks = blocks[:STAGING_BLOCKS], blocks[STAGING_BLOCKS:]
    else:
        stream_blocks = []
    block_bytes = blocks[0].size if blocks else 0
    free = list(blocks)
    inflight: deque = deque()
    sink = open_sink(path, total, io, stream_blocks, dir_fd)
    try:
        sink.append(memoryview(header))
        written = 0

        def emit(name: str, data: memoryview) -> None:
            nonlocal file_crc, written
            sink.append(data)
            tensor_crcs[name] = crc32c.crc32c(data, tensor_crcs[name])
            file_crc = crc32c.crc32c(data, file_crc)
            written += len(data)
            if written == len(data):
                pause_point("file-data")

        def complete() -> None:
            entry, block, view, request, nbytes = inflight.popleft()
            if request is not None:
                request.wait()
                source = store.meta(entry.source.key).dtype
                if source != entry.dtype:  # explicit export conversion, one chunk at a time
                    converted = view[:nbytes].view(source).to(entry.dtype)
                    emit(entry.name, memoryview(converted.view(torch.uint8).numpy()))
                    del converted
                else:
                    emit(entry.name, memoryview(view.numpy())[:nbytes])
                del view
                free.append(block)
            else:
                emit(entry.name, memoryview(view.numpy()))

        for entry in entries:
            if entry.nbytes == 0:
                continue
            if isinstance(entry.source, StoreSource):
                meta = store.meta(entry.source.key)
                if tuple(meta.shape) != tuple(entry.shape):
                    raise CheckpointError(f"{entry.name}: the store holds {meta.dtype}{list(meta.shape)}, "
                                          f"expected {entry.dtype}{list(entry.shape)}")
                size = itemsize(meta.dtype)  # chunks in the store's dtype; converted when written
                step = chunk_elements(store, meta.dtype, block_bytes, math.prod(meta.shape), entry.name) * size
                for offset in range(0, meta.nbytes, step):
                    nbytes = min(step, meta.nbytes - offset)
                    while not free:
                        complete()
                    block = free.pop()
                    view = block.tensor(round_up_io(nbytes), torch.uint8)
                    inflight.append((entry, block, view, store.read_into(entry.source.key, view, offset, nbytes),
                                     nbytes))
            elif isinstance(entry.source, torch.Tensor):
                tensor = entry.source.detach().to("cpu", entry.dtype).contiguous()
                if tuple(tensor.shape) != tuple(entry.shape):
                    raise CheckpointError(f"{entry.name}: got {tensor.dtype}{list(tensor.shape)}, "
                                          f"expected {entry.dtype}{list(entry.shape)}")
                inflight.append((entry, None, tensor.reshape(-1).view(torch.uint8), None, entry.nbytes))
            else:  # a producer: the reads before it are written first, then its tensor, then it is dropped
                while inflight:
                    complete()
                tensor = entry.source()
                if tuple(tensor.shape) != tuple(entry.shape) or tensor.dtype != entry.dtype:
                    raise CheckpointError(f"{entry.name}: produced {tensor.dtype}{list(tensor.shape)}, "
                                          f"expected {entry.dtype}{list(entry.shape)}")
                emit(entry.name, memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                del tensor
        while inflight:
            complete()
        sink.finish()
    except BaseException as exc:
        for _entry, _block, _view, request, _n in inflight:
            if request is not None:
                try:
                    request.wait()
                except Exception:  # the first error is already propagating
                    pass
        inflight.clear()
        if isinstance(exc, OSError):
            raise named_write_error(path, exc) from exc  # e.g. ENOSPC from write(2): no file name
        raise
    finally:
        sink.close()
    return dict(bytes=total, crc32c=file_crc, tensors=tensor_crcs, infos=infos)


# ---------------------------------------------------------------------------------------------- load
@dataclass
class StoreTarget:
    """Load a tensor into the store under ``key`` (converting to the key's dtype when ``convert``).
    ``start``: the key holds elements ``[start, start + its numel)`` of the flattened tensor (a
    rank's part of a partitioned tensor; 0 for a whole one)."""

    key: Hashable
    start: int = 0


@dataclass
class TensorTarget:
    """Load a (small) tensor whole and hand it to ``accept``."""

    accept: Callable[[torch.Tensor], None]


Target = Union[StoreTarget, TensorTarget, None]  # None: read only to check the file's CRC


def load_safetensors(parsed: SafetensorsFile, targets: dict[str, list[Target]], store: Optional[TensorStore],
                     blocks: list[PoolBlock], tensor_crcs: Optional[dict[str, int]] = None,
                     file_crc: Optional[int] = None) -> None:
    """Streams every tensor of ``parsed`` named in ``targets`` to its targets, in file order (a tensor
    with several targets, e.g. an fp32 weight that becomes both a bf16 weight and an fp32 master
    when converting, is read once per target).

    With ``tensor_crcs`` each tensor's CRC32C is checked (a whole tensor is handed to a
    :class:`TensorTarget` only after that); with ``file_crc`` every byte of the file is read
    (tensors without a target too) and the whole file is checked. Mismatches raise
    :class:`CheckpointError` naming the file and the tensor."""
    path = parsed.path
    full = file_crc is not None
    fd = open_regular(path)
    size = os.fstat(fd).st_size
    if size != parsed.file_size:
        os.close(fd)
        raise CheckpointError(f"{path}: the file changed while it was being loaded ({parsed.file_size} bytes when its "
                              f"header was read, {size} now)")
    free = list(blocks)
    inflight: deque = deque()  # (store request, block)

    def reclaim() -> None:
        request, block = inflight.popleft()
        request.wait()
        free.append(block)

    def to_store(info: TensorInfo, key: Hashable, running: Optional[int]) -> tuple[int, Optional[int]]:
        """Streams ``info`` into store tensor ``key`` one segment at a time; returns its CRC and
        ``running`` (the file CRC so far) extended by its bytes."""
        meta = store.meta(key)
        if tuple(meta.shape) != info.shape:
            raise CheckpointError(f"{path}: tensor {info.name!r} has shape {list(info.shape)}, "
                                  f"the model expects {list(meta.shape)}")
        src_size, dst_size = itemsize(info.dtype), itemsize(meta.dtype)
        # The block holds only the store's bytes (a converted source chunk is read aside).
        elems = chunk_elements(store, meta.dtype, blocks[0].size, info.numel, f"{path}: {info.name}")
        crc = 0
        for start in range(0, info.numel, elems):
            n = min(elems, info.numel - start)
            while not free:
                reclaim()
            block = free.pop()
            if meta.dtype == info.dtype:
                src = memoryview(block.tensor(round_up_io(n * src_size), torch.uint8).numpy())[: n * src_size]
            else:  # explicit conversion: the source chunk is read aside and cast into the block
                raw = torch.empty(n, dtype=info.dtype)
                src = memoryview(raw.view(torch.uint8).numpy())
            pread_into(fd, src, parsed.offset(info) + start * src_size, path, info.name)
            crc = crc32c.crc32c(src, crc)
            if running is not None:
                running = crc32c.crc32c(src, running)
            if meta.dtype != info.dtype:
                block.tensor(n, meta.dtype).copy_(raw)
                del raw
            del src
            inflight.append((store.write_from(key, block.tensor(round_up_io(n * dst_size), torch.uint8),
                                              start * dst_size, n * dst_size), block))
        return crc, running

    def check(info: TensorInfo, crc: int) -> None:
        if tensor_crcs is not None and info.name in tensor_crcs and crc != tensor_crcs[info.name]:
            raise CheckpointError(f"{path}: tensor {info.name!r} is corrupt (CRC32C 0x{crc:08x}, the manifest "
                                  f"says 0x{tensor_crcs[info.name]:08x})")

    try:
        running = 0
        if full:
            head = bytearray(parsed.header_bytes)
            pread_into(fd, memoryview(head), 0, path, "(header)")
            running = crc32c.crc32c(bytes(head))
        for info in sorted(parsed.tensors.values(), key=lambda t: t.begin):
            wanted = list(targets.get(info.name) or [])
            if not wanted and not full:
                continue
            for i, target in enumerate(wanted or [None]):
                track = full and i == 0  # the file checksum takes the bytes once, in file order
                whole = None
                if isinstance(target, StoreTarget):
                    crc, after = to_store(info, target.key, running if track else None)
                else:
                    crc, after, whole = _read_whole(fd, parsed, info, target is not None, running if track else 0)
                if track:
                    running = after
                check(info, crc)
                if whole is not None:
                    target.accept(whole)  # only once its checksum is known good
                del whole
        while inflight:
            reclaim()
        if full and running != file_crc:
            raise CheckpointError(f"{path}: file checksum mismatch (CRC32C 0x{running:08x}, the manifest says "
                                  f"0x{file_crc:08x}); the header is corrupt")
    finally:
        while inflight:
            request, _block = inflight.popleft()
            try:
                request.wait()
            except Exception:  # the first error is already propagating
                pass
        free.clear()
        os.close(fd)


def _read_whole(fd: int, parsed: SafetensorsFile, info: TensorInfo, keep: bool,
                running: int) -> tuple[int, int, Optional[torch.Tensor]]:
    """Reads one tensor whole (``keep``: small tensors, returned) or only checksums it in
    16 MiB pieces. Returns (tensor CRC, running file CRC, tensor or None)."""
    crc = 0
    if not keep:
        piece = bytearray(min(max(info.nbytes, 1), 16 << 20))
        view = memoryview(piece)
        for start in range(0, info.nbytes, len(piece)):
            n = min(len(piece), info.nbytes - start)
            pread_into(fd, view[:n], parsed.offset(info) + start, parsed.path, info.name)
            crc = crc32c.crc32c(view[:n], crc)
            running = crc32c.crc32c(view[:n], running)
        return crc, running, None
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        data = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        pread_into(fd, data, parsed.offset(info), parsed.path, info.name)
        crc = crc32c.crc32c(data, crc)
        running = crc32c.crc32c(data, running)
    return crc, running, out
