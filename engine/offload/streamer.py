"""ParameterStreamer: a model's large weights live in the TensorStore and visit DRAM one module at a time.

This module wires the parts; each has its own file:

* :mod:`~engine.offload.params` - which parameters are streamed, the *units* (modules owning
  them directly), placeholders.
* :mod:`~engine.offload.module_hooks` - forward: a unit's pre-hook makes its weights real,
  its forward hook puts the placeholders back; fetch on access for weights used outside
  their own module.
* :mod:`~engine.offload.saved_tensors` - backward: views of streamed weights that autograd
  saves become handles, re-fetched when backward unpacks them.
* :mod:`~engine.offload.order` - the recorded execution order and the prediction of the next
  events (what to prefetch).
* :mod:`~engine.offload.residency` - the staged weights and their states (reading, ready, in
  use, evicted while still viewed, stale); :mod:`~engine.offload.device_copy` - CPU: the slot
  is the weight; "separate" (``copies=True`` on the CPU): a synchronous copy out of the slot;
  CUDA: a copy on a side stream ordered with an event.
* :mod:`~engine.offload.buffers` - the staging slots and their plan (:func:`plan_staging`).

One step
    Every unit call (``F``) and every first unpack of a unit call's handles in a backward
    (``B``) is an *event*: the order tracker observes it, predicts the next ``prefetch_depth``
    events, and the residency evicts what left that window, reads the event's weights now
    (a *miss* unless already read or in flight) and prefetches the predicted ones. The
    sequence of events from one root forward to the next is recorded on the first step and
    replayed on later ones, separately for grad-enabled/disabled and train/eval passes; when
    the step differs, heuristics take over and the step re-records (``stats()["order_changes"]``).

Memory: at most the tensors of ``prefetch_depth + 1`` consecutive units are staged,
independent of the number of layers, in slots from the PinnedPool (:mod:`.buffers`).
Gradients: autograd accumulates into ``param.grad`` as usual, unless ``on_grad`` is given
(or the runtime's :class:`~engine.offload.grad_hooks.GradientHooks` take them).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .._log import logger
from ..distributed import Partition
from ..errors import PoolExhaustedError, StreamingError
from ..memory.pool import PinnedPool
from ..units import format_bytes
from ..validate import BufferPool, PinnedAlloc, check_choice
from .buffers import (
    BufferPlan,
    StagingBuffers,
    StagingExhaustedError,
    plan_for_params,
    plan_staging,
)
from .device_copy import Copies, H2DCopies, SeparateCopies
from .grad_hooks import GradCallback, GradientHooks
from .materialize import Homes, give_back, offload_parameters
from .module_hooks import ModuleHooks
from .order import OrderTracker, predict
from .params import (
    DEFAULT_RESIDENT_THRESHOLD,
    KEY_ATTR,
    STREAMER_ATTR,
    ModelParams,
    StreamedParam,
    Unit,
    discover,
    is_placeholder,
)
from .residency import Residency
from .saved_tensors import SavedTensors, Tape

__all__ = ["ParameterStreamer", "plan_staging"]


def _zero_stats() -> dict:
    return dict(reads=0, bytes_read=0, read_seconds=0.0, stall_seconds=0.0, hits=0, misses=0,
                prefetches=0, prefetch_skipped=0, prefetch_unused=0, zombie_hits=0, events=0,
                bytes_written=0, fetched_on_access=0, h2d_copies=0, h2d_bytes=0, h2d_wait_s=0.0,
                gathers=0, gather_seconds=0.0)


class ParameterStreamer:
    """Streams a model's large parameters from a :class:`~engine.storage.TensorStore` through pinned staging slots.

    Args:
        model: the module to stream (Hugging Face ``PreTrainedModel``s and plain modules). Its
            parameters are on the CPU, or are placeholders already in ``store``
            (:func:`~engine.offload.initialize_into_store`, for models built on the meta device).
        store: where streamed parameters live (key ``("param", name)``).
        pool: PinnedPool the staging slots are carved from; by default the streamer makes one of
            exactly the planned size (:func:`plan_staging`). Pass the pool registered with the
            store's AsyncIO to get io_uring fixed buffers.
        prefetch_depth: units whose weights are read ahead of the one running (0: read on demand).
        resident_threshold_bytes: parameters of at most this many bytes stay resident.
        buffer_pool: ``"adaptive"`` (size classes from the model's tensor sizes) or ``"uniform"``
            (``buffer_count`` slots as large as the largest tensor; the ZeRO-Infinity ablation).
        buffer_count: slots of the uniform pool (default: most tensors live at once + 1). Ignored
            by the adaptive pool, whose counts come from the prefetch depth.
        pinned_alloc: ``"exact"`` (PinnedPool) or ``"torch"`` (``tensor.pin_memory()``, ablation).
        device: compute device, ``"cpu"`` or ``"cuda[:n]"``. On CUDA weights are copied to the device
            on a side stream; resident parameters and buffers are moved there on attach.
        copies: weights are copied out of their staging slot into tensors of their own (None:
            exactly when ``device`` is CUDA, which always copies). ``device="cpu", copies=True`` is
            the "separate" test mode (:mod:`engine.devices`): a synchronous copy on the CPU.
        borrow: adaptive pool: a request may use a free slot of a larger class.
        restore_on_exit: leaving the ``with`` block detaches with ``restore=True`` (weights back in
            memory); set False for models that do not fit in DRAM.
        resident_trainable: parameters with ``requires_grad`` stay resident whatever their size
            (PEFT: adapters and their optimizer state live in memory; only the frozen base streams).
        owns_store, owns_pool: :meth:`close` (and leaving a ``with`` block) closes the store / the
            given pool too (:func:`~engine.offload.standalone.open_streamer` hands both over). A pool
            the streamer makes is its own.
        partition: several ranks with partitioned state: the store holds this rank's shard of each
            streamed tensor, gathered at its first use (:mod:`engine.offload.residency`).
        on_grad: ``on_grad(name, grad)`` receives every gradient contribution of every trainable
            parameter instead of ``param.grad`` while attached (:class:`~engine.offload.grad_hooks.GradientHooks`).

    Use as a context manager (attach on enter, detach on exit) or call :meth:`attach` /
    :meth:`detach`. :meth:`stats` reports staging memory, I/O and prefetch hits/misses.
    """

    def __init__(self, model: nn.Module, store, pool: Optional[PinnedPool] = None, *, prefetch_depth: int = 1,
                 resident_threshold_bytes: int = DEFAULT_RESIDENT_THRESHOLD, buffer_pool: BufferPool = "adaptive",
                 buffer_count: Optional[int] = None, pinned_alloc: PinnedAlloc = "exact",
                 device: Union[str, torch.device] = "cpu", borrow: bool = True, restore_on_exit: bool = True,
                 resident_trainable: bool = False, owns_store: bool = False, owns_pool: bool = False,
                 on_grad: Optional[GradCallback] = None, copies: Optional[bool] = None,
                 partition: Optional[Partition] = None):
        # the streamer is also built without a Config (tests, benchmarks): its switches are checked here
        check_choice("buffer_pool", buffer_pool, BufferPool)
        check_choice("pinned_alloc", pinned_alloc, PinnedAlloc)
        if pinned_alloc == "torch" and pool is not None:
            raise ValueError("pinned_alloc='torch' pins through PyTorch (the ablation); do not pass a PinnedPool")
        if not isinstance(prefetch_depth, int) or prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be an int >= 0, got {prefetch_depth!r}")
        self.model = model
        self.store = store
        self.prefetch_depth = prefetch_depth
        self.resident_threshold_bytes = int(resident_threshold_bytes)
        self.buffer_pool = buffer_pool
        self.buffer_count = buffer_count
        self.pinned_alloc = pinned_alloc
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {device!r}")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device='cuda' but torch.cuda.is_available() is False")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        if copies is None:
            copies = self.device.type == "cuda"
        if self.device.type == "cuda" and not copies:
            raise ValueError("copies=False on a CUDA device: a staging slot cannot be the weight there")
        self.copies = bool(copies)
        self.restore_on_exit = restore_on_exit
        self.partition = partition
        self.params: ModelParams = discover(model, self.resident_threshold_bytes, resident_trainable=resident_trainable,
                                            partition=partition)
        self.plan: BufferPlan = plan_for_params(self.params, prefetch_depth, buffer_pool, buffer_count)
        self._pool = pool
        self._owns_pool = owns_pool and pool is not None  # a given pool handed over
        self._made_pool = False  # made by attach (no pool given)
        self._owns_store = owns_store
        self._borrow = borrow
        self._buffers: Optional[StagingBuffers] = None
        self._copies: Optional[Copies] = None  # the copy strategy (CUDA: its stream), kept across attaches
        self._attached = False
        self._stats = _zero_stats()
        # CUDA backward runs in autograd's device thread; CPU parts of a mixed graph may run beside it
        self._lock = threading.RLock()
        self._order = OrderTracker()
        self._residency = Residency(self.params.streamed, store, self.plan, self.device, self._stats)
        event = _weak_event(self)  # the parts must not keep their streamer alive (no cycle)
        self._saved = SavedTensors(self._residency, event, self._lock)
        self._hooks = ModuleHooks(model, self.params, self._residency, self._saved, self._order, event,
                                  self._lock, self._stats)
        self._grad_hooks = GradientHooks(model, on_grad) if on_grad is not None else None
        self._homes = Homes(model, self.params)  # recorded again at each attach

    def _reset_state(self) -> None:
        """Forgets everything of one attach (staged weights, frames, tapes, the recorded order)."""
        self._order.reset()
        self._residency.reset()
        self._saved.reset()
        self._hooks.reset()

    def reset_stats(self) -> None:
        """Zeroes the I/O and prefetch counters (and the staging peak)."""
        self._stats.clear()
        self._stats.update(_zero_stats())  # in place: the parts count into this dict
        if self._buffers is not None:
            self._buffers.peak_held_bytes = self._buffers.held_bytes

    # ------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return self._attached

    def attach(self) -> "ParameterStreamer":
        """Moves streamed parameters into the store (placeholders in the model) and installs the hooks."""
        if self._attached:
            return self
        self._make_buffers()
        # Weights in memory before attach, held until it succeeds: a failure part-way (e.g. ENOSPC)
        # gives them back, so the model loses nothing (the memory was the model's anyway).
        in_memory = {key: sp.param.data for key, sp in self.params.streamed.items()
                     if not is_placeholder(sp.param.data)}
        self._homes = Homes(self.model, self.params)
        try:
            offload_parameters(self.model, self.params, self.store, self.device, partition=self.partition,
                               acquire=lambda nbytes: self._residency.slot_for(nbytes, demand=True),
                               release=self._buffers.release, mark=self._mark_streamed, stats=self._stats)
            self._hooks.install()
            if self._grad_hooks is not None:
                self._grad_hooks.install()
        except BaseException:
            self._hooks.remove()
            if self._grad_hooks is not None:
                self._grad_hooks.remove()
            give_back(self.params, in_memory)
            self._homes.restore_residents()
            raise
        self._attached = True
        logger.info("ParameterStreamer: %d tensors (%s) streamed, %d resident (%s); %s",
                    len(self.params.streamed), format_bytes(self.params.streamed_bytes), len(self.params.resident),
                    format_bytes(self.params.resident_bytes), self.plan.describe())
        return self

    def _make_buffers(self) -> None:
        if self._buffers is not None:
            return
        if self.pinned_alloc == "exact" and self._pool is None:
            self._pool = PinnedPool(max(self.plan.total_bytes, 4096))
            self._made_pool = True
        try:
            self._buffers = StagingBuffers(self.plan, self._pool if self.pinned_alloc == "exact" else None,
                                           self.pinned_alloc, borrow=self._borrow)
        except PoolExhaustedError as exc:
            raise StagingExhaustedError(
                f"the staging plan needs {format_bytes(self.plan.total_bytes)} ({self.plan.describe()}); "
                f"the PinnedPool has {format_bytes(exc.free_bytes)} free of {format_bytes(exc.capacity)}") from exc
        if self.copies and self._copies is None:
            self._copies = H2DCopies(self.device, self._stats) if self.device.type == "cuda" \
                else SeparateCopies(self._stats)
        self._residency.bind(self._buffers, self._copies)

    def _mark_streamed(self, sp: StreamedParam) -> None:
        sp.set_placeholder(self.device)
        setattr(sp.param, STREAMER_ATTR, weakref.ref(self))  # weak: a parameter must not keep the streamer alive

    def detach(self, restore: bool = True) -> None:
        """Removes the hooks; with ``restore`` the streamed parameters get their data back in memory
        and the model its tensors where they lived before attach (a CPU model is on the CPU again);
        the store entries stay until freed. Without it they stay placeholders backed by the store."""
        if not self._attached:
            return
        if self._grad_hooks is not None:
            self._grad_hooks.remove()
        self._hooks.remove()
        self._hooks.close_frames()  # waits for reads in flight and drops every staged weight
        self._residency.drain()
        if restore:  # the model as it was given: streamed weights read back, residents moved home
            for key, sp in self.params.streamed.items():
                # the parameter's own memory again (host), not staging; partitioned: gathered (collective)
                data = self.store.get(sp.key) if sp.partition is None else \
                    sp.partition.full_from_store(self.store, sp.key, sp.shape, sp.dtype)
                home = self._homes.streamed.get(key, data.device)
                sp.set_data(data if home == data.device else data.to(home))
                for attr in (KEY_ATTR, STREAMER_ATTR):
                    if hasattr(sp.param, attr):
                        delattr(sp.param, attr)
            self._homes.restore_residents()
        self._attached = False
        self._reset_state()
        self._buffers.close()
        self._buffers = None
        if self._made_pool and not self._owns_store:  # attach makes it again
            self._pool.close()
            self._pool = None
            self._made_pool = False

    def close(self) -> None:
        """Detaches (keeping placeholders) and closes the store and pool if the streamer owns them."""
        self.detach(restore=False)
        if self._owns_store:
            self.store.close()
        if (self._owns_pool or self._made_pool) and self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "ParameterStreamer":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach(restore=self.restore_on_exit)
        if self._owns_store:
            self.close()

    # ------------------------------------------------------------------ events
    def _event(self, kind: str, unit: Unit, keys: tuple, tape: Optional[Tape]) -> None:
        """A unit call (``F``) or a first unpack in backward (``B``): observe, predict, stage."""
        self._stats["events"] += 1
        self._residency.reclaim()
        self._residency.poll()
        self._order.observe((kind, unit.index, keys))
        k = self.prefetch_depth
        window = predict(self._order, k, kind,
                         next_units=(u.keys for u in self.params.units[unit.index + 1:unit.index + 1 + k]),
                         unconsumed=self._saved.unconsumed_before(tape) if tape is not None else ())
        self._residency.advance(keys, window)

    def call_with_weights(self, func: Callable, args: tuple, kwargs: dict, params: list[nn.Parameter]) -> Any:
        """Runs ``func`` on streamed parameters whose data is a placeholder (called by
        :class:`~engine.offload.params.StreamedParameter`): a weight used outside its own module's
        forward, e.g. ``F.linear(x, self.child.weight)`` in a parent.

        The weight is fetched for this op only, as if its module were called (an ``F`` event of its
        unit: recorded and prefetched like one), and is a placeholder again right after. Inside the
        model's forward the innermost hooked module running is the op's *scope*: until the scope
        ends, autograd saves views of the weight (``w.t()`` made by this op and used by a later
        one) as handles, so backward re-fetches it and no staging slot stays pinned by the graph."""
        return self._hooks.call_with_weights(func, args, kwargs, params)

    def invalidate(self) -> None:
        """Forgets every cached, prefetched or evicted-but-still-viewed weight because the store's
        values changed (an optimizer step wrote new weights): the next use reads them again.
        Call between steps, outside forward and backward."""
        with self._lock:
            if self._hooks.frames:
                raise RuntimeError("ParameterStreamer.invalidate() called inside a forward pass")
            self._residency.invalidate()

    # ------------------------------------------------------------------ reporting
    @property
    def staging(self) -> Optional[StagingBuffers]:
        """The staging slots (None while detached)."""
        return self._buffers

    def is_streamed(self, param: torch.Tensor) -> bool:
        """True if ``param`` is one of the streamed parameters."""
        return any(sp.param is param for sp in self.params.streamed.values())

    def resident_bytes(self) -> int:
        """Bytes the model's parameters hold in memory now (placeholders count as zero)."""
        total, seen = 0, set()
        for p in self.model.parameters():
            if id(p) in seen or is_placeholder(p.data):
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
        return total

    @property
    def execution_order(self) -> Optional[list[tuple[str, str]]]:
        """The recorded order of the current mode as ``(kind, unit name)``; None before the first step."""
        trace = self._order.trace
        if trace is None:
            return None
        return [(kind, self.params.units[i].name) for kind, i, _ in trace]

    def stats(self) -> dict:
        """Counters since attach (or :meth:`reset_stats`).

        ``streamed_tensors``/``streamed_bytes``, ``resident_tensors``/``resident_bytes``;
        ``pool``: staging slots (``reserved_bytes``, ``peak_held_bytes``, ``classes``, ``grown_slots``,
        ``borrowed``); ``reads``, ``bytes_read``, ``read_seconds`` (time with at least one read in
        flight, as observed at events: an upper bound), ``read_bandwidth`` (bytes/s, a lower bound),
        ``stall_seconds`` (compute waiting for reads); ``hits``/``misses`` (weights found in flight or
        staged vs read on demand), ``prefetches``, ``prefetch_skipped`` (no free slot),
        ``prefetch_unused`` (evicted before use); ``order_changes``, ``traces_recorded``;
        ``h2d_copies``/``h2d_bytes``/``h2d_wait_s``: weights copied out of staging to the compute
        device and the host time compute waited for them (:mod:`~engine.offload.device_copy`; 0 on the CPU).
        """
        s = dict(self._stats)
        s["read_bandwidth"] = s["bytes_read"] / s["read_seconds"] if s["read_seconds"] > 0 else 0.0
        s.update(streamed_tensors=len(self.params.streamed), streamed_bytes=self.params.streamed_bytes,
                 resident_tensors=len(self.params.resident), resident_bytes=self.params.resident_bytes,
                 units=len(self.params.units), prefetch_depth=self.prefetch_depth,
                 order_changes=self._order.changes, traces_recorded=self._order.recorded,
                 plan_bytes=self.plan.total_bytes, device=str(self.device) if not self.copies or
                 self.device.type == "cuda" else "separate (cpu)")
        s["pool"] = self._buffers.stats() if self._buffers is not None else None
        if self._pool is not None and self.pinned_alloc == "exact":
            ps = self._pool.stats()
            s["pinned_pool"] = dict(capacity=ps["capacity"], in_use=ps["in_use"], locked=ps["locked"])
        return s

    def __repr__(self) -> str:
        return (f"ParameterStreamer({len(self.params.streamed)} streamed tensors, depth={self.prefetch_depth}, "
                f"{self.buffer_pool}/{self.pinned_alloc}, device={self.device}, attached={self._attached})")


def _weak_event(streamer: "ParameterStreamer") -> Callable[..., None]:
    method = weakref.WeakMethod(streamer._event)

    def event(*args: Any) -> None:
        target = method()
        if target is None:
            raise StreamingError("a streamed weight was used after its ParameterStreamer was garbage-collected")
        target(*args)

    return event
