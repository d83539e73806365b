"""The planner's GPU side: which device a plan is for, its memory budget, and what the GPU holds.

For a CUDA (or the test-only ``"separate"``) compute device the GPU holds, at its peak:

* the resident parameters (compute dtype; frozen ones in ``frozen_dtype``) and the buffers (their
  own dtype: the engine does not cast buffers);
* the streamed-weight window: device copies of the tensors of ``prefetch_depth + 1`` consecutive
  units - the windows the host staging plan is made from, each copy its own tensor;
* gradient staging: gradients leave the device one at a time as autograd produces them, so the
  largest trainable gradient in fp32 plus its compute-dtype original;
* the activations (given or estimated; not counted in host memory then).

The budget is ``gpu_memory`` when given (plan for a card this machine does not have), else
``Config.gpu_memory``, else the card's free memory (``torch.cuda.mem_get_info``) plus what the
model itself occupies there now (its weights leave the card or are counted again as resident).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from .. import dtypes
from ..devices import check_device, resolve_device
from ..errors import ConfigError
from ..units import format_bytes
from ..validate import MAX_BYTES, check_bytes
from .buffers import unit_order
from .params import ModelParams

CUDA_BLOCK = 512  # the caching allocator's rounding of every block


@dataclass(frozen=True)
class GpuTarget:
    """What a plan is made for: ``kind`` ``"cpu"`` (no GPU figures), ``"cuda"`` or ``"separate"``;
    ``label`` names the device in the table; ``budget_bytes`` None: nothing to check against."""

    kind: str
    label: str
    budget_bytes: Optional[int]

    @property
    def planned(self) -> bool:
        return self.kind != "cpu"


def gpu_target(model: nn.Module, device: str, gpu_memory: Union[int, str, None],
               configured: Union[int, str, None] = None) -> GpuTarget:
    """The device ``Config.device`` names, for planning. With ``gpu_memory`` (the plan's argument)
    no CUDA is needed ("cuda"/"cuda:N"/"auto" plan for that card); without it, "cuda" is resolved
    here and its free memory queried; ConfigError when it is not there (or gpu_memory contradicts
    "cpu"). ``configured`` (``Config.gpu_memory``, the budget of a run on this machine) stands in
    for a missing ``gpu_memory``, except that "auto" then means what it resolves to here: on a
    machine without CUDA the run computes on the CPU, and the budget is ignored with a warning."""
    check_device(device)
    if gpu_memory is None and configured is not None:
        if device == "auto" and resolve_device(device).kind == "cpu":
            warnings.warn(f"gpu_memory={configured!r} is ignored: device 'auto' resolves to the CPU here "
                          "(set device 'cuda' to plan for a card this machine does not have)", stacklevel=3)
            return GpuTarget("cpu", "cpu", None)
        gpu_memory = configured
    if gpu_memory is not None:
        budget = check_bytes("gpu_memory", gpu_memory, 1, MAX_BYTES)
        if device == "cpu":
            raise ConfigError(f"gpu_memory={gpu_memory!r} was given but device='cpu' computes on no GPU; "
                              "use device 'cuda' (or 'auto') to plan for a GPU", "gpu_memory")
        if device == "separate":
            return GpuTarget("separate", "separate (cpu)", budget)
        return GpuTarget("cuda", "cuda" if device == "auto" else device, budget)
    if device == "separate":
        return GpuTarget("separate", "separate (cpu)", None)
    try:
        spec = resolve_device(device)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (to plan for a GPU this machine does not have, give gpu_memory: "
                          "engine.plan(..., gpu_memory='24GiB'), python -m engine plan ... --gpu-memory 24GiB)",
                          exc.field) from None
    if spec.kind == "cpu":
        return GpuTarget("cpu", "cpu", None)
    free, _total = torch.cuda.mem_get_info(spec.device)
    on_card = sum(t.numel() * t.element_size() for t in _tensors(model) if t.device == spec.device)
    return GpuTarget("cuda", str(spec.device), free + on_card)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(t), t)
    return list(seen.values())


def resident_bytes(model: nn.Module, params: ModelParams, dtype_of: Callable[[torch.Tensor], torch.dtype],
                   streams_weights: bool) -> int:
    """Resident parameters in the dtype the trainer gives them, plus every buffer. Without weight
    streaming (``offload_params`` not ``"nvme"``) every parameter is resident."""
    if streams_weights:
        weights = [p for _, p in params.resident]
    else:
        weights = list({id(p): p for p in model.parameters()}.values())
    buffers = {id(b): b for b in model.buffers()}.values()
    return sum(p.numel() * dtypes.itemsize(dtype_of(p)) for p in weights) + \
        sum(b.numel() * b.element_size() for b in buffers)


def window_bytes(params: ModelParams, depth: int) -> int:
    """Device copies of streamed weights alive at once: the most bytes of distinct tensors in any
    ``depth + 1`` consecutive units (with the ancestors whose forwards they run in), each copy
    rounded to the CUDA caching allocator's 512-byte blocks. The same windows as the host staging
    plan (:func:`~engine.offload.buffers.unit_order`), but summed per window: device copies are
    fresh tensors freed after use, not size-class slots (whose per-class maxima would overstate
    it: 604 MiB instead of 422 MiB for a bf16 Llama-7B at depth 2)."""
    units = [{sp.key: sp.nbytes for sp in live} for live in unit_order(params) if live]
    most = 0
    for i in range(len(units)):
        window: dict = {}
        for unit in units[i:i + depth + 1]:
            window.update(unit)
        most = max(most, sum(-(-n // CUDA_BLOCK) * CUDA_BLOCK for n in window.values()))
    return most


def grad_bytes(trainable_shapes: list[tuple[int, ...]], compute: torch.dtype) -> int:
    """The largest trainable gradient in compute dtype and its fp32 copy (statistics, D2H)."""
    largest = max((math.prod(s) for s in trainable_shapes), default=0)
    return largest * (dtypes.FP32_BYTES + dtypes.itemsize(compute))


def shortfall(label: str, needed: int, budget: int, parts: str) -> str:
    """The message part for a GPU budget that a plan exceeds."""
    return (f"GPU memory {format_bytes(budget)} on {label} is too small: the smallest plan needs "
            f"{format_bytes(needed)} ({parts}), {format_bytes(needed - budget)} more")
