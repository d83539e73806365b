"""CPU optimizers over the native fused kernels.

:class:`CPUAdamW` is a drop-in ``torch.optim.AdamW`` for CPU tensors whose update
(unscale/clip, weight decay, moments, bias correction, optional bf16/fp16 copy of
the new weights) is one pass over memory. :mod:`engine.optim.kernels` exposes the
kernels themselves on torch tensors; ``engine._native`` takes raw addresses.
"""
from __future__ import annotations

from . import kernels
from .adamw import CPUAdamW
from .kernels import adam_step, cast_to, grad_norm, grad_stats

__all__ = ["CPUAdamW", "adam_step", "cast_to", "grad_norm", "grad_stats", "kernels"]
