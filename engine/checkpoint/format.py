"""The safetensors file format, streamed: one tensor (or one chunk of one) at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``)
and the raw little-endian tensor data, tensors packed back to back. The
``safetensors`` library writes a whole state dict held in memory and reads
through ``mmap`` (whose touched pages count in the process's RSS until the file
is closed); here the header is written first from shapes alone and the data
follows chunk by chunk, and reads are ``pread`` into a caller's buffer, so a
file far larger than DRAM goes in and out through a bounded buffer.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

import torch

from ..dtypes import FROM_SAFETENSORS, TO_SAFETENSORS, itemsize
from ..errors import CheckpointError, CheckpointWriteError, EngineError, LatestNotDurableError, LatestNotUpdatedError  # noqa: F401

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# Deeper JSON is refused before parsing (json's recursive parser would raise RecursionError, or
# overflow the C stack under a raised recursion limit); checkpoint JSON nests a few levels.
MAX_JSON_DEPTH = 100

# The safetensors dtype codes: engine.dtypes' table, under the names this package has always used.
DTYPE_TO_ST: dict[torch.dtype, str] = TO_SAFETENSORS
ST_TO_DTYPE: dict[str, torch.dtype] = FROM_SAFETENSORS


T = TypeVar("T")


def named_write_error(path: str, exc: OSError) -> OSError:
    """``exc`` if it already names a file, else a :class:`CheckpointWriteError` naming ``path``."""
    return exc if exc.filename is not None or isinstance(exc, EngineError) else CheckpointWriteError(path, exc)


def open_regular(path: str, what: str = "file") -> int:
    """Opens ``path`` read-only and returns the descriptor, refusing anything but a regular file.
    O_NONBLOCK: opening a FIFO does not wait for a writer (a hang, otherwise); the check is an
    fstat of the open descriptor, so the file checked is the file read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open {what}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: refusing {what}: it is not a regular file (a FIFO, device, socket or "
                                  "directory); replace it with the file itself")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(data: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of JSON text (brackets inside strings do not count); stops counting past ``limit``."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', data)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def parse_json(data: bytes, path: str, what: str) -> object:
    """``json.loads`` of a checkpoint's JSON, with its nesting depth bounded first."""
    if json_depth(data) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{path}: {what} is nested more than {MAX_JSON_DEPTH} levels deep; refusing it "
                              "(a corrupt or hostile file)")
    try:
        return json.loads(data)
    except RecursionError:  # belt and braces: the depth check should have caught it
        raise CheckpointError(f"{path}: {what} is nested too deeply; refusing it") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc})") from None


def read_json_file(path: str, what: str, max_bytes: int) -> object:
    """Reads and parses a small JSON file: a regular file of at most ``max_bytes``."""
    with os.fdopen(open_regular(path, what), "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: {what} is larger than {max_bytes} bytes; refusing it")
    return parse_json(data, path, what)


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return DTYPE_TO_ST[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: data at bytes ``[begin, end)`` after the header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Optional[dict] = None,
                 align: int = 8) -> tuple[bytes, list[TensorInfo]]:
    """The 8-byte length plus JSON header for tensors stored in the given order, padded with
    spaces so the data starts at a multiple of ``align`` bytes (as the safetensors library does)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    infos, pos = [], 0
    for name, dtype, shape in entries:
        if name in header or name == "__metadata__":
            raise CheckpointError(f"tensor name {name!r} appears twice")
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": st_dtype(dtype), "shape": [int(s) for s in shape], "data_offsets": [pos, pos + nbytes]}
        infos.append(TensorInfo(name, dtype, tuple(int(s) for s in shape), pos, pos + nbytes))
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)
    return struct.pack("<Q", len(text)) + text, infos


@dataclass
class SafetensorsFile:
    """A parsed safetensors header: where each tensor's bytes are."""

    path: str
    header_bytes: int  # 8 + the JSON header length: file offset of the data
    tensors: dict[str, TensorInfo]
    metadata: dict
    file_size: int

    @property
    def data_bytes(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)

    def offset(self, info: TensorInfo) -> int:
        return self.header_bytes + info.begin


def read_header(path: str) -> SafetensorsFile:
    """Parses and validates the header of ``path``. A truncated file (data ending before the
    header says) raises :class:`CheckpointError` naming the tensors that are cut off."""
    with os.fdopen(open_regular(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {length}, "
                                  f"file size {size})")
        text = f.read(length)
    header = parse_json(text, path, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header ('__metadata__' must map strings to strings)")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = ST_TO_DTYPE[entry["dtype"]]
            shape = tuple(_index(s) for s in entry["shape"])
            begin, end = (_index(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {str(entry)[:200]}") from None
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * itemsize(dtype) or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not hold "
                                  f"{entry['dtype']}{list(shape)}")
        tensors[name] = TensorInfo(name, dtype, shape, begin, end)
    pos = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            raise CheckpointError(f"{path}: tensor {info.name!r} starts at data offset {info.begin}, expected {pos} "
                                  "(overlapping or gapped tensors)")
        pos = info.end
    parsed = SafetensorsFile(path, 8 + length, tensors, metadata, size)
    if parsed.header_bytes + pos > size:
        cut = [t.name for t in sorted(tensors.values(), key=lambda t: t.begin) if parsed.offset(t) + t.nbytes > size]
        raise CheckpointError(f"{path}: file is truncated ({size} bytes, "
                              f"the header needs {parsed.header_bytes + pos}); "
                              f"tensor(s) cut off: {', '.join(cut[:8])}{' ...' if len(cut) > 8 else ''}")
    if parsed.header_bytes + pos < size:
        raise CheckpointError(f"{path}: {size - parsed.header_bytes - pos} unexpected bytes after the last tensor")
    return parsed


def _index(value: object) -> int:
    """A JSON integer (not a bool, not a float that would be truncated)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def pread_into(fd: int, view: memoryview, offset: int, path: str, tensor: str) -> None:
    """Fills ``view`` from file offset ``offset``; a short read names the file and tensor."""
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: tensor {tensor!r}: file ends at byte {offset + done}, "
                                  f"{total - done} more bytes expected (truncated)")
        done += n


def write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def read_tensor(parsed: SafetensorsFile, name: str, fd: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """Reads one whole tensor into a new CPU tensor (for small tensors and one-at-a-time imports).

    With ``dtype`` the result has that dtype, converted ``chunk_bytes`` of the file at a time (no
    second full-size copy)."""
    info = parsed.tensors[name]
    dtype = dtype or info.dtype
    out = torch.empty(info.shape, dtype=dtype)
    if not info.nbytes:
        return out
    own = fd is None
    fd = open_regular(parsed.path) if own else fd
    try:
        if dtype == info.dtype:
            pread_into(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), parsed.offset(info), parsed.path, name)
            return out
        flat, size = out.view(-1), itemsize(info.dtype)
        step = max(1, chunk_bytes // size)
        raw = torch.empty(min(step, info.numel), dtype=info.dtype)
        for start in range(0, info.numel, step):
            n = min(step, info.numel - start)
            pread_into(fd, memoryview(raw[:n].view(torch.uint8).numpy()), parsed.offset(info) + start * size,
                       parsed.path, name)
            flat[start:start + n].copy_(raw[:n])
        return out
    finally:
        if own:
            os.close(fd)


def split_shards(entries: Sequence[T], limit: int) -> list[list[T]]:
    """Consecutive entries (anything with ``nbytes``) into shards of at most ``limit`` bytes;
    a larger entry gets a shard of its own."""
    shards: list[list[T]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards
