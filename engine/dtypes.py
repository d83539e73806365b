"""The engine's one dtype vocabulary: config names, item sizes, safetensors codes, native kernel names.

Every layer that turns a dtype into bytes, a file code or a kernel argument uses this module,
so a dtype the engine supports is listed once.
"""
from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["fp32", "bf16", "fp16"]
# Config names of the compute / optimizer-state dtypes.
BY_NAME: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES: tuple[str, ...] = tuple(BY_NAME)

# Safetensors dtype codes (the format's spelling) of every dtype a checkpoint or export may hold.
TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
for _name in ("uint16", "uint32", "uint64"):  # present from torch 2.3
    if hasattr(torch, _name):
        TO_SAFETENSORS[getattr(torch, _name)] = "U" + _name[4:]
FROM_SAFETENSORS: dict[str, torch.dtype] = {v: k for k, v in TO_SAFETENSORS.items()}

# fp32 masters, gradients and moments: the engine's accumulation precision.
FP32_BYTES = torch.float32.itemsize

# The native kernels' names (csrc/optim) of the floating dtypes they take.
KERNEL_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                                        torch.float16: "float16"}


def from_name(name: str) -> torch.dtype:
    """The torch dtype of a config name (``"bf16"`` -> ``torch.bfloat16``); ValueError names the choices."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, NAMES))}, got {name!r}") from None


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return dtype.itemsize


def nbytes(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


def kernel_name(dtype: torch.dtype) -> str:
    """The native kernels' name of ``dtype`` ('float32', 'bfloat16' or 'float16')."""
    try:
        return KERNEL_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype} (expected float32, bfloat16 or float16)") from None
