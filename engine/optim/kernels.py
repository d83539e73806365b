"""Torch-tensor front ends of the native fused optimizer kernels.

The native functions (``engine._native.adam_step``, ``grad_stats``, ``cast_fp32``)
take integer addresses, an element count and dtype names, so the offload stepper
can run them directly on PinnedPool blocks. These wrappers check torch tensors
(CPU, contiguous, matching sizes, supported dtypes) and pass their addresses.
Every kernel releases the GIL and runs OpenMP over fixed-size blocks.

Numerics: ``adam_step`` applies torch's ``_single_tensor_adam`` operation by
operation in fp32, with the same fp32 constants and the same fused multiply-adds,
so its result equals torch's formula bit for bit given an IEEE square root (the
scalar, AVX2 and AVX-512 paths also agree bit for bit). PyTorch builds that use
MKL compute ``Tensor.sqrt`` with MKL's vectorized sqrt, which is not always
correctly rounded; against those builds results differ by an ulp now and then.

Set ``MEMASCEND_OPTIM_ISA`` to ``scalar``, ``avx2`` or ``avx512`` to pin the
instruction set (the best one the CPU supports is the default).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _native, dtypes
from .._log import logger, warn_once

__all__ = [
    "active_isa", "adam_step", "cast_to", "dtype_name", "grad_norm", "grad_stats", "set_isa", "supported_isas",
]

_DTYPE_NAMES = dtypes.KERNEL_NAMES  # the native kernels' dtype names (one table: engine.dtypes)
_GRAD_DTYPES = tuple(dtypes.KERNEL_NAMES)
_STATE_DTYPES = (torch.float32, torch.bfloat16)
_LOW_DTYPES = (torch.bfloat16, torch.float16)


dtype_name = dtypes.kernel_name  # kept importable from here: the kernels' name of a dtype


def _check(t: torch.Tensor, what: str, dtypes: tuple, numel: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what} must be a CPU tensor, got device {t.device}")
    if t.layout != torch.strided:
        raise ValueError(f"{what} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{what} has dtype {t.dtype}; expected one of {names}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{what} has {t.numel()} elements, expected {numel}")


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    adamw_mode: bool = True,
    grad_scale: float = 1.0,
    out: Optional[torch.Tensor] = None,
) -> None:
    """One fused Adam/AdamW step, in place, in a single pass over memory.

    param: contiguous fp32 master weights. grad: fp32, bf16 or fp16; it is first
    multiplied by ``grad_scale`` (pass clip_coef / loss_scale to unscale and clip
    in the same pass). exp_avg, exp_avg_sq: fp32, or bf16 to halve optimizer I/O
    (the update uses the fp32 moments of this step, which are then stored rounded
    to nearest even). ``step`` is the step being taken (1 on the first call).
    ``adamw_mode=False`` is Adam with L2 (grad += weight_decay * param). ``out``
    (bf16 or fp16, optional) receives the updated weights in the same pass,
    rounded exactly like ``param.to(out.dtype)``.
    """
    _check(param, "param", (torch.float32,))
    n = param.numel()
    _check(grad, "grad", _GRAD_DTYPES, n)
    _check(exp_avg, "exp_avg", _STATE_DTYPES, n)
    _check(exp_avg_sq, "exp_avg_sq", (exp_avg.dtype,), n)
    out_addr, out_dtype = 0, "bfloat16"
    if out is not None:
        _check(out, "out", _LOW_DTYPES, n)
        out_addr, out_dtype = out.data_ptr(), _DTYPE_NAMES[out.dtype]
    _native.adam_step(
        n, param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
        step=int(step), lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
        weight_decay=float(weight_decay), adamw=bool(adamw_mode), grad_scale=float(grad_scale),
        grad_dtype=_DTYPE_NAMES[grad.dtype], state_dtype=_DTYPE_NAMES[exp_avg.dtype],
        out=out_addr, out_dtype=out_dtype,
    )


def grad_stats(grad: torch.Tensor) -> tuple[float, bool]:
    """(sum of squares, any element inf/NaN) of a contiguous fp32/bf16/fp16 CPU tensor.

    One pass, no temporaries; squares are accumulated in fp64 in a fixed order, so
    the result does not depend on the thread count or instruction set. When the
    flag is set the sum is inf or NaN.
    """
    _check(grad, "grad", _GRAD_DTYPES)
    return _native.grad_stats(grad.numel(), grad.data_ptr(), _DTYPE_NAMES[grad.dtype])


def grad_norm(grads: "list[torch.Tensor] | torch.Tensor") -> tuple[float, bool]:
    """(L2 norm over all tensors, any element inf/NaN), one pass over each tensor."""
    if isinstance(grads, torch.Tensor):
        grads = [grads]
    total, nonfinite = 0.0, False
    for g in grads:
        s, bad = grad_stats(g)
        total += s
        nonfinite |= bad
    return total ** 0.5, nonfinite


def cast_to(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Writes ``src`` (contiguous fp32) into ``dst`` (bf16 or fp16) and returns ``dst``.

    Bit-identical to ``src.to(dst.dtype)`` on x86 PyTorch: round to nearest even,
    overflow to inf, subnormals, signed zeros; NaN is 0xFFFF in bf16 and keeps its
    sign and top payload bits (made quiet) in fp16.
    """
    _check(src, "src", (torch.float32,))
    _check(dst, "dst", _LOW_DTYPES, src.numel())
    _native.cast_fp32(src.numel(), src.data_ptr(), dst.data_ptr(), _DTYPE_NAMES[dst.dtype])
    return dst


def active_isa() -> str:
    """The instruction set the kernels run on: 'scalar', 'avx2' or 'avx512'."""
    return _native.optim_isa()


def supported_isas() -> list[str]:
    """Instruction sets this CPU supports, slowest first."""
    return list(_native.optim_isas())


def set_isa(name: str) -> None:
    """Pins the kernels' instruction set; ValueError when the CPU lacks it."""
    _native.set_optim_isa(name)


def _apply_env() -> None:
    name = os.environ.get("MEMASCEND_OPTIM_ISA")
    if name:
        try:
            set_isa(name)
        except ValueError as e:
            warn_once("optim-isa", f"MEMASCEND_OPTIM_ISA ignored: {e}; using '{active_isa()}'")
    logger.debug("optimizer kernels: %s", active_isa())


_apply_env()
