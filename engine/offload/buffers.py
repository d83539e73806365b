"""Host staging buffers for streamed weights: size-class slots from the PinnedPool.

A *slot* holds one whole tensor between its NVMe read and its last use (on the
CPU the slot *is* the weight; on CUDA it lives until the host-to-device copy has
finished). Slots are carved once, when the streamer attaches, so the staging
memory is fixed and known up front.

``buffer_pool`` (ablation switch, DESIGN.md section 5):

``adaptive`` (ours)
    One size class per distinct tensor size (a class is a size rounded up to 4 KiB,
    so ``gate_proj`` (I, H) and ``down_proj`` (H, I) share one). A class gets as
    many slots as the tensors of that size that can be live at once: the most
    distinct tensors of the class in any ``prefetch_depth + 1`` consecutive units
    of the execution order (:func:`plan_buffers`). When a class has no free slot a
    request may borrow a free slot of a larger class (best fit); the embedding's
    slot is idle while the layers run, so borrowing absorbs the rare extra slot a
    recomputation (activation checkpointing) or a mispredicted order needs.
``uniform`` (ZeRO-Infinity)
    ``buffer_count`` slots, each as large as the largest streamed tensor.

``pinned_alloc`` (ablation switch):

``exact`` (ours)
    Slots are exact-size blocks of a :class:`~engine.memory.pool.PinnedPool`.
``torch``
    Slots come from ``tensor.pin_memory()``, PyTorch's caching host allocator
    (power-of-two rounding). This is the only place the engine pins through torch.
"""
from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence, get_args

import torch
from torch import nn

from .._log import logger, warn_once
from ..errors import EngineError, StagingExhaustedError  # noqa: F401 - re-exported
from ..memory.pool import IO_ALIGNMENT, PinnedPool, PoolBlock
from ..units import format_bytes
from ..validate import BufferPool, PinnedAlloc, check_choice
from .params import DEFAULT_RESIDENT_THRESHOLD, ModelParams, StreamedParam, discover, round_up

# The switches' values, spelled once (engine/validate.py).
BUFFER_POOLS: tuple[str, ...] = get_args(BufferPool)
PINNED_ALLOCS: tuple[str, ...] = get_args(PinnedAlloc)


@dataclass(frozen=True)
class BufferPlan:
    """How many staging slots of which sizes.

    Attributes:
        mode: ``"adaptive"`` or ``"uniform"``.
        classes: slot size in bytes -> number of slots.
        prefetch_depth: the depth the plan was made for.
        window_tensors: most distinct tensors live at once (in ``prefetch_depth + 1`` units).
    """

    mode: BufferPool
    classes: dict[int, int]
    prefetch_depth: int
    window_tensors: int

    @property
    def total_bytes(self) -> int:
        """Bytes of all slots (what the PinnedPool must hold)."""
        return sum(size * count for size, count in self.classes.items())

    @property
    def slots(self) -> int:
        return sum(self.classes.values())

    def describe(self) -> str:
        parts = ", ".join(f"{n} x {format_bytes(s)}" for s, n in sorted(self.classes.items(), reverse=True))
        return f"{self.mode} staging: {parts} = {format_bytes(self.total_bytes)}"


def plan_buffers(order: Sequence[Sequence[tuple[Hashable, int]]], prefetch_depth: int, mode: BufferPool = "adaptive",
                 buffer_count: Optional[int] = None) -> BufferPlan:
    """Plans staging slots for an execution order.

    Args:
        order: the units in execution order, each as ``(key, slot_bytes)`` of its streamed tensors.
            The backward visits them in reverse, which has the same windows.
        prefetch_depth: units prefetched ahead of the one running (k).
        mode: ``"adaptive"`` (a class per distinct slot size, counts from the windows) or
            ``"uniform"`` (``buffer_count`` slots of the largest size).
        buffer_count: uniform slots; default: the most tensors live at once plus one spare
            (a spare that, in adaptive mode, borrowing from larger classes provides).
    """
    check_choice("buffer_pool", mode, BufferPool)
    if prefetch_depth < 0:
        raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
    width = prefetch_depth + 1
    counts: dict[int, int] = {}
    most = 0
    units = [list(dict.fromkeys(u)) for u in order if u]
    for i in range(len(units)):
        window: dict[Hashable, int] = {}
        for unit in units[i:i + width]:
            window.update(unit)
        most = max(most, len(window))
        per_class: dict[int, int] = {}
        for size in window.values():
            per_class[size] = per_class.get(size, 0) + 1
        for size, n in per_class.items():
            counts[size] = max(counts.get(size, 0), n)
    if mode == "uniform" and counts:
        if buffer_count is not None and buffer_count < 1:
            raise ValueError(f"buffer_count must be >= 1, got {buffer_count}")
        count = buffer_count if buffer_count is not None else most + 1
        counts = {max(counts): count}
    return BufferPlan(mode, counts, prefetch_depth, most)


def plan_staging(model: nn.Module, *, prefetch_depth: int = 1,
                 resident_threshold_bytes: int = DEFAULT_RESIDENT_THRESHOLD, buffer_pool: BufferPool = "adaptive",
                 buffer_count: Optional[int] = None, resident_trainable: bool = False,
                 dtype_of: Optional[Callable[[nn.Parameter], torch.dtype]] = None) -> BufferPlan:
    """The staging plan a :class:`~engine.offload.ParameterStreamer` with these settings would use for ``model``.

    Use ``plan.total_bytes`` to size the PinnedPool (and register that pool with the
    TensorStore's io_uring) before building the store. Works on meta-device models.
    ``dtype_of(param)``: the dtype each parameter will be streamed in (default: its own).
    """
    params = discover(model, resident_threshold_bytes, resident_trainable=resident_trainable, dtype_of=dtype_of)
    return plan_for_params(params, prefetch_depth, buffer_pool, buffer_count)


def plan_for_params(params: ModelParams, prefetch_depth: int, buffer_pool: BufferPool,
                    buffer_count: Optional[int]) -> BufferPlan:
    """:func:`plan_buffers` over the units of ``params`` in registration order."""
    order = [[(sp.key, sp.slot_nbytes) for sp in live] for live in unit_order(params)]
    return plan_buffers(order, prefetch_depth, buffer_pool, buffer_count)


def unit_order(params: ModelParams) -> list[list[StreamedParam]]:
    """Each unit's streamed tensors in registration order, with its ancestors' (a unit runs inside
    its ancestors' forwards: their weights are live at the same time). The planner's GPU window uses it too."""
    order = []
    for unit in params.units:
        live = [u for u in params.units
                if u is unit or u.name == "" or unit.name.startswith(u.name + ".")]
        order.append([sp for u in live for _, sp in u.params])
    return order


class StagingSlot:
    """One staging buffer: a PinnedPool block, or (ablation) a torch pinned tensor."""

    __slots__ = ("size", "held", "_block", "_base", "_raw", "_exporter", "_baseline")

    def __init__(self, size: int, block: Optional[PoolBlock] = None, base: Optional[torch.Tensor] = None,
                 raw: Optional[torch.Tensor] = None):
        self.size = size
        self.held = False
        self._block = block
        self._base = base
        self._raw = raw  # the whole allocation ``base`` is an aligned slice of
        # Tensors handed out view the memory through this buffer-protocol object, so (as with a
        # PoolBlock) its reference count tells whether any of them is alive.
        self._exporter = (ctypes.c_char * size).from_address(base.data_ptr()) if base is not None else None
        self._baseline = sys.getrefcount(self._exporter) if base is not None else 0

    @property
    def io_buffer(self):
        """What ``TensorStore.read_into``/``write_from`` take: the PoolBlock or the aligned uint8 tensor."""
        return self._block if self._block is not None else self._base

    @property
    def address(self) -> int:
        return self._block.address if self._block is not None else self._base.data_ptr()

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor of ``shape``/``dtype`` over the slot's first bytes."""
        if self._block is not None:
            return self._block.tensor(shape, dtype)
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        return torch.frombuffer(self._exporter, dtype=dtype, count=numel).view(tuple(shape))

    def busy(self) -> bool:
        """True while tensors viewing the slot are alive (it must not be overwritten)."""
        if self._block is not None:
            return self._block.live_views() > 0
        return sys.getrefcount(self._exporter) > self._baseline

    def close(self) -> None:
        self._block = None
        self._base = None
        self._raw = None
        self._exporter = None


class StagingBuffers:
    """The streamer's slots, carved from a PinnedPool (``exact``) or pinned by torch (``torch``).

    Args:
        plan: slot sizes and counts.
        pool: the PinnedPool to carve from (``exact``); must have room for ``plan.total_bytes``.
        pinned_alloc: ``"exact"`` or ``"torch"``.
        borrow: let a request use a free slot of a larger class (adaptive mode).
    """

    def __init__(self, plan: BufferPlan, pool: Optional[PinnedPool], pinned_alloc: PinnedAlloc = "exact", *,
                 borrow: bool = True):
        if pinned_alloc == "exact" and pool is None:
            raise ValueError("pinned_alloc='exact' needs a PinnedPool")
        self.plan = plan
        self.pool = pool
        self.pinned_alloc = pinned_alloc
        self.borrow = borrow
        self.slots: list[StagingSlot] = []
        self.grown = 0
        self.borrowed = 0
        self.peak_held_bytes = 0
        self.torch_pinned: Optional[bool] = None
        for size, count in sorted(plan.classes.items(), reverse=True):
            for _ in range(count):
                self.slots.append(self._new_slot(size))

    def _new_slot(self, size: int) -> StagingSlot:
        if self.pinned_alloc == "exact":
            return StagingSlot(size, block=self.pool.alloc(size))
        # ablation: pinned_alloc="torch" (ZeRO-Infinity's baseline) pins through PyTorch's caching host
        # allocator, which rounds each request up to a power of two. This ablation path is the only
        # place in the engine that may call tensor.pin_memory().
        raw = torch.empty(size + IO_ALIGNMENT, dtype=torch.uint8)
        try:
            raw = raw.pin_memory()  # ablation
            self.torch_pinned = True
        except RuntimeError as exc:
            self.torch_pinned = False
            warn_once("staging-torch-pin", f"pinned_alloc='torch': tensor.pin_memory() is unavailable ({exc}); "
                      "the ablation uses pageable torch CPU memory instead")
        skip = (-raw.data_ptr()) % IO_ALIGNMENT
        return StagingSlot(size, base=raw[skip:skip + size], raw=raw)

    # ------------------------------------------------------------------ allocation
    def acquire(self, nbytes: int) -> Optional[StagingSlot]:
        """A free slot of at least ``nbytes`` (its own class first, else the smallest larger one), or None."""
        best: Optional[StagingSlot] = None
        for slot in self.slots:
            if slot.held or slot.size < nbytes or (best is not None and slot.size >= best.size):
                continue
            if slot.busy():
                continue
            best = slot
            if slot.size == round_up(nbytes):
                break
        if best is None:
            return None
        if self.plan.mode == "adaptive" and best.size != round_up(nbytes):
            if not self.borrow:
                return None
            self.borrowed += 1
        best.held = True
        self._note_peak()
        return best

    def grow(self, nbytes: int) -> Optional[StagingSlot]:
        """Carves one more slot (beyond the plan) if the pool has room; None otherwise."""
        size = round_up(nbytes) if self.plan.mode == "adaptive" else max(self.plan.classes, default=round_up(nbytes))
        size = max(size, round_up(nbytes))
        if self.pinned_alloc == "exact":
            if self.pool.stats()["largest_free"] < size:
                return None
            try:
                slot = self._new_slot(size)
            except MemoryError:  # PoolExhaustedError
                return None
        else:
            slot = self._new_slot(size)
        self.slots.append(slot)
        self.grown += 1
        logger.info("staging: grew a %s slot beyond the plan (%d slots now)", format_bytes(size), len(self.slots))
        slot.held = True
        self._note_peak()
        return slot

    def release(self, slot: StagingSlot) -> None:
        slot.held = False

    def _note_peak(self) -> None:
        held = sum(s.size for s in self.slots if s.held)
        if held > self.peak_held_bytes:
            self.peak_held_bytes = held

    def touch(self) -> None:
        """Writes every free slot once, so its pages are resident now (what page-locking does)."""
        for slot in self.slots:
            if not slot.held and not slot.busy():
                slot.tensor((slot.size,), torch.uint8).zero_()

    # ------------------------------------------------------------------ reporting
    @property
    def reserved_bytes(self) -> int:
        return sum(s.size for s in self.slots)

    @property
    def held_bytes(self) -> int:
        return sum(s.size for s in self.slots if s.held)

    def classes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.slots:
            out[s.size] = out.get(s.size, 0) + 1
        return out

    def stats(self) -> dict:
        return dict(mode=self.plan.mode, pinned_alloc=self.pinned_alloc, slots=len(self.slots),
                    classes=self.classes(), reserved_bytes=self.reserved_bytes, held_bytes=self.held_bytes,
                    peak_held_bytes=self.peak_held_bytes, grown_slots=self.grown, borrowed=self.borrowed,
                    torch_pinned=self.torch_pinned)

    def close(self) -> None:
        for s in self.slots:
            s.close()
        self.slots.clear()
