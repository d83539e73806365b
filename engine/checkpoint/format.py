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
import struct
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

import torch

from ..errors import EngineError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        DTYPE_TO_ST[getattr(torch, _name)] = "U" + _name[4:]
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}


T = TypeVar("T")


class CheckpointError(EngineError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and tensor."""


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {length}, "
                                      f"file size {size})")
            text = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = ST_TO_DTYPE[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {entry!r}") from None
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
        raise CheckpointError(f"{path}: file is truncated ({size} bytes, the header needs {parsed.header_bytes + pos}); "
                              f"tensor(s) cut off: {', '.join(cut[:8])}{' ...' if len(cut) > 8 else ''}")
    if parsed.header_bytes + pos < size:
        raise CheckpointError(f"{path}: {size - parsed.header_bytes - pos} unexpected bytes after the last tensor")
    return parsed


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
    fd = os.open(parsed.path, os.O_RDONLY) if own else fd
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
