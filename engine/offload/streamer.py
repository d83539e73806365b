"""ParameterStreamer: a model's large weights live in the TensorStore and visit DRAM one module at a time.

How it works
------------
*Units* are the modules that own streamed parameters directly (``nn.Linear``,
``nn.Embedding``, GPT-2's ``Conv1D``, ...); see :mod:`engine.offload.params`.
While attached, a streamed parameter's ``.data`` is a placeholder (shape, dtype
and device kept, no memory).

Forward
    A forward pre-hook on each unit makes its weights real: it waits for the
    NVMe read that was prefetched (or reads now, a *miss*), sets ``param.data``
    to the staging slot (CPU: the pinned buffer is the weight, no copy) or to the
    device copy (CUDA: copied on a side stream, ordered with an event), and
    prefetches the weights of the next ``prefetch_depth`` units. The forward
    hook (``always_call``, so exceptions and checkpoint early-stops clean up)
    puts the placeholder back; the slot is reused once the window moves on.

Weights used outside their own module's forward
    A parent may compute with a child's weight (``F.linear(x, self.child.weight)``,
    Mamba's mixer handing ``conv1d.weight`` to a function). While its data is a
    placeholder a streamed parameter's class is ``StreamedParameter``, whose
    ``__torch_function__`` asks the streamer to fetch it for that one op
    (:meth:`ParameterStreamer.call_with_weights`): an ``F`` event of its unit, so
    it is recorded and prefetched like a module call. Every module above a unit
    is hooked too (a stack of running modules); the innermost one running is the
    op's scope, whose saved-tensor hooks make views of the weight that later ops
    save into handles. Inside its unit the parameter is a plain ``nn.Parameter``:
    the hot path pays nothing. Writing into a placeholder (an in-place op, ``out=``,
    ``load_state_dict``) is refused: it would only change a staging copy.

Backward: ``saved_tensors_hooks`` that save a handle instead of the weight
    During a unit's forward the streamer installs a pair of
    ``torch.autograd.graph.saved_tensors_hooks``. A tensor autograd saves that
    views a streamed weight (``nn.Linear`` saves ``weight.t()``, ``Conv1D``'s
    ``addmm`` the weight itself) is packed as a *handle* (store key, dtype,
    size, stride, offset) and holds no memory; other tensors pass through (to the
    hooks that were active before, e.g. those of non-reentrant activation
    checkpointing, so checkpointing still drops them). Unpacking a handle in
    backward re-fetches the weight from the store, and the first unpack of a
    unit's handles is a step in the execution order that drives prefetching for
    the backward just as module calls drive it for the forward.

    Why not module backward pre-hooks that swap ``param.data`` back in, as
    ZeRO-3 does? Because ``F.linear`` saves ``weight.t()``, a *view* holding the
    staging buffer's storage: the buffer of every layer would stay pinned by the
    autograd graph until backward (peak = the whole model), unless every op
    that saves a weight is replaced (DeepSpeed re-implements ``linear`` for this).
    Saved-tensor hooks see every saved tensor of every op, so no op needs
    wrapping, and they fire exactly when autograd needs the data, including in
    recomputations of activation checkpointing (reentrant or not), where module
    backward hooks do not.

Execution order
    Every unit call (``F``) and every first unpack of a unit call's handles in a
    backward (``B``) is an event. The sequence of events from one root forward
    to the next (forward, backward and checkpoint recomputations) is recorded
    on the first step and replayed for prefetching on later ones, separately
    for grad-enabled/disabled and train/eval passes. When an event differs from
    the recording, prefetching falls back to heuristics (registration order
    forward, the unconsumed forward calls in reverse backward) and the step's
    events replace the recording (``stats()["order_changes"]``).

Memory
    Staging slots are planned from the order (:mod:`engine.offload.buffers`):
    at most the tensors of ``prefetch_depth + 1`` consecutive units are held,
    independent of the number of layers. Every slot comes from the PinnedPool
    (or, in the ``pinned_alloc="torch"`` ablation, from ``pin_memory()``).

Gradients
    Autograd accumulates a streamed parameter's gradient in ``param.grad``
    (an ordinary tensor on the compute device) by default. ``on_grad(name,
    grad)`` replaces that: it receives each gradient contribution as autograd
    finishes accumulating it (``register_post_accumulate_grad_hook``) and
    ``param.grad`` stays ``None`` - the hook point for gradient offload. With
    reentrant checkpointing a parameter's gradient may arrive in several
    contributions per backward; add them up.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Hashable, Optional, Union

import torch
from torch import nn

from .._log import logger, warn_once
from ..errors import PoolExhaustedError
from ..memory.pool import PinnedPool
from ..units import format_bytes
from .buffers import BUFFER_POOLS, PINNED_ALLOCS, BufferPlan, StagingBuffers, StagingExhaustedError, StagingSlot, plan_buffers
from .params import (DEFAULT_RESIDENT_THRESHOLD, KEY_ATTR, STREAMER_ATTR, ModelParams, StreamedParam, StreamedParameter,
                     StreamingError, Unit, discover, is_placeholder, is_structural, write_error)

GradCallback = Callable[[str, torch.Tensor], None]

_MAX_RECORDED_EVENTS = 1_000_000


# ---------------------------------------------------------------------- small records
class _Entry:
    """A streamed tensor being read or resident in a staging slot (and on CUDA, on the device)."""

    __slots__ = ("sp", "slot", "request", "weight", "event", "prefetched", "used")

    def __init__(self, sp: StreamedParam, slot: Optional[StagingSlot], prefetched: bool):
        self.sp = sp
        self.slot = slot
        self.request = None
        self.weight: Optional[torch.Tensor] = None
        self.event = None  # CUDA: the H2D copy's completion
        self.prefetched = prefetched
        self.used = False


class _Tape:
    """One call of a unit whose forward saved weight views (that backward will unpack)."""

    __slots__ = ("unit", "keys", "task", "index", "__weakref__")

    def __init__(self, unit: Unit, index: int):
        self.unit = unit
        self.keys: dict[Hashable, None] = {}
        self.task: Optional[int] = None  # graph task of the last backward that unpacked it
        self.index = index


class _Handle:
    """What autograd stores instead of a tensor viewing a streamed weight."""

    __slots__ = ("tape", "key", "dtype", "size", "stride", "offset")

    def __init__(self, tape: _Tape, key: Hashable, t: torch.Tensor):
        self.tape = tape
        self.key = key
        self.dtype = t.dtype
        self.size = tuple(t.size())
        self.stride = tuple(t.stride())
        self.offset = t.storage_offset()


class _Outer:
    """A tensor packed by the saved-tensor hooks that were active before ours."""

    __slots__ = ("unpack", "packed")

    def __init__(self, unpack: Callable, packed: Any):
        self.unpack = unpack
        self.packed = packed


class _Frame:
    """One active unit call."""

    __slots__ = ("module", "unit", "hooks", "tape", "outer", "activated", "scope", "kept")

    def __init__(self, module: Optional[nn.Module], unit: Unit):
        self.module = module  # None: one op's fetch on access
        self.unit = unit
        self.activated: list[StreamedParam] = []
        self.scope: Optional[_Frame] = None  # fetch on access: the frame of the module the op runs in
        self.kept: dict[tuple, Hashable] = {}  # weight pointers of ops in this frame's forward
        self.hooks = None
        self.tape: Optional[_Tape] = None
        self.outer = None


class _OrderTracker:
    """Records the event order of each step and tells whether the current step follows the recording."""

    def __init__(self) -> None:
        self.traces: dict[Hashable, list] = {}
        self.mode: Hashable = None
        self.recording: Optional[list] = None
        self.pos = 0
        self.in_sync = False
        self.changes = 0
        self.recorded = 0

    def start(self, mode: Hashable) -> None:
        self.finish()
        self.mode = mode
        self.recording = []
        self.pos = 0
        self.in_sync = mode in self.traces

    def finish(self) -> None:
        if self.recording:
            trace = self.traces.get(self.mode)
            if trace is None or not self.in_sync or self.pos != len(trace):
                if trace is not None:
                    self.changes += 1
                    logger.info("ParameterStreamer: execution order changed; re-recorded (%d events)", len(self.recording))
                self.traces[self.mode] = self.recording
                self.recorded += 1
        self.recording = None

    def observe(self, event: tuple) -> None:
        if self.recording is None:
            self.start(("direct",))
        if len(self.recording) < _MAX_RECORDED_EVENTS:
            self.recording.append(event)
        if self.in_sync:
            trace = self.traces[self.mode]
            if self.pos < len(trace) and trace[self.pos] == event:
                self.pos += 1
            else:
                self.in_sync = False

    def upcoming(self, k: int) -> Optional[list]:
        """The next ``k`` events of the recording, or None when the step left it."""
        if not self.in_sync:
            return None
        trace = self.traces[self.mode]
        upcoming = trace[self.pos:self.pos + k]
        if len(upcoming) < k:  # the step ends: the next one starts the same way
            upcoming += trace[:min(k - len(upcoming), self.pos)]
        return upcoming


def _refuse_load(unit: Unit) -> Callable:
    """A load_state_dict pre-hook: loading would ``copy_`` into a streamed weight's placeholder
    (nn.Module turns that op's error into a generic RuntimeError; this names the weight)."""
    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for attr, sp in unit.params:
            if prefix + attr in state_dict:
                raise write_error(sp.name, f"load_state_dict key {prefix + attr!r}")
    return hook


# ---------------------------------------------------------------------- planning
def plan_staging(model: nn.Module, *, prefetch_depth: int = 1,
                 resident_threshold_bytes: int = DEFAULT_RESIDENT_THRESHOLD, buffer_pool: str = "adaptive",
                 buffer_count: Optional[int] = None, resident_trainable: bool = False,
                 dtype_of: Optional[Callable[[nn.Parameter], torch.dtype]] = None) -> BufferPlan:
    """The staging plan a :class:`ParameterStreamer` with these settings would use for ``model``.

    Use ``plan.total_bytes`` to size the PinnedPool (and register that pool with the
    TensorStore's io_uring) before building the store. Works on meta-device models.
    ``dtype_of(param)``: the dtype each parameter will be streamed in (default: its own).
    """
    params = discover(model, resident_threshold_bytes, resident_trainable=resident_trainable, dtype_of=dtype_of)
    return _plan(params, prefetch_depth, buffer_pool, buffer_count)


def _plan(params: ModelParams, prefetch_depth: int, buffer_pool: str, buffer_count: Optional[int]) -> BufferPlan:
    # A unit runs inside its ancestors' forwards: their weights are live at the same time.
    order = []
    for unit in params.units:
        live = [u for u in params.units
                if u is unit or u.name == "" or unit.name.startswith(u.name + ".")]
        order.append([(sp.key, sp.slot_nbytes) for u in live for _, sp in u.params])
    return plan_buffers(order, prefetch_depth, buffer_pool, buffer_count)


# ---------------------------------------------------------------------- the streamer
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
        on_grad: ``on_grad(name, grad)`` receives every gradient contribution of every trainable
            parameter instead of its accumulation in ``param.grad``; default None: autograd
            accumulates into ``param.grad`` as usual.
        borrow: adaptive pool: a request may use a free slot of a larger class.
        restore_on_exit: leaving the ``with`` block detaches with ``restore=True`` (weights back in
            memory); set False for models that do not fit in DRAM.
        resident_trainable: parameters with ``requires_grad`` stay resident whatever their size
            (PEFT: adapters and their optimizer state live in memory; only the frozen base streams).

    Use as a context manager (attach on enter, detach on exit) or call :meth:`attach` /
    :meth:`detach`. :meth:`stats` reports staging memory, I/O and prefetch hits/misses.
    """

    def __init__(self, model: nn.Module, store, pool: Optional[PinnedPool] = None, *, prefetch_depth: int = 1,
                 resident_threshold_bytes: int = DEFAULT_RESIDENT_THRESHOLD, buffer_pool: str = "adaptive",
                 buffer_count: Optional[int] = None, pinned_alloc: str = "exact",
                 device: Union[str, torch.device] = "cpu", on_grad: Optional[GradCallback] = None,
                 borrow: bool = True, restore_on_exit: bool = True, resident_trainable: bool = False):
        if buffer_pool not in BUFFER_POOLS:
            raise ValueError(f"buffer_pool must be one of {BUFFER_POOLS}, got {buffer_pool!r}")
        if pinned_alloc not in PINNED_ALLOCS:
            raise ValueError(f"pinned_alloc must be one of {PINNED_ALLOCS}, got {pinned_alloc!r}")
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
        self.on_grad = on_grad
        self.restore_on_exit = restore_on_exit
        self._cuda = self.device.type == "cuda"
        self.params: ModelParams = discover(model, self.resident_threshold_bytes, resident_trainable=resident_trainable)
        self.plan: BufferPlan = _plan(self.params, prefetch_depth, buffer_pool, buffer_count)
        self._pool = pool
        self._owns_pool = False
        self._owns_store = False
        self._borrow = borrow
        self._buffers: Optional[StagingBuffers] = None
        self._hooks: list = []
        self._attached = False
        self._copy_stream = None
        # CUDA backward runs in autograd's device thread; CPU parts of a mixed graph may run beside it
        self._lock = threading.RLock()
        self._unit_of: dict[int, Unit] = {}
        self._module_names: dict[int, str] = {}  # id(module) -> name, for every hooked module
        self._scopes: dict[int, Unit] = {}  # id(module) -> the unit naming a non-unit module's own ops
        self._owner: dict[Hashable, Unit] = {}  # key -> the first unit owning it
        self._reset_state()
        self.reset_stats()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._cache: dict[Hashable, _Entry] = {}
        self._zombies: dict[Hashable, _Entry] = {}  # evicted while still viewed: data intact until the views go
        self._stale: list[_Entry] = []  # zombies invalidated while viewed: released once the views go
        self._active: dict[Hashable, int] = {}
        self._live_ptrs: dict[tuple, Hashable] = {}
        self._frames: list[_Frame] = []
        self._mstack: list[nn.Module] = []  # hooked modules whose forward is running, innermost last
        self._distance: dict[Hashable, int] = {}
        self._order = _OrderTracker()
        self._pending: "weakref.WeakSet[_Tape]" = weakref.WeakSet()
        self._step_tapes: list["weakref.ref[_Tape]"] = []
        self._step_backward = False
        self._inflight = 0
        self._busy_since = 0.0

    def reset_stats(self) -> None:
        """Zeroes the I/O and prefetch counters (and the staging peak)."""
        self._stats = dict(reads=0, bytes_read=0, read_seconds=0.0, stall_seconds=0.0, hits=0, misses=0,
                           prefetches=0, prefetch_skipped=0, prefetch_unused=0, zombie_hits=0, events=0,
                           bytes_written=0, fetched_on_access=0)
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
        try:
            self._offload_parameters()
            self._install_hooks()
        except BaseException:
            self._remove_hooks()
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
            self._owns_pool = True
        try:
            self._buffers = StagingBuffers(self.plan, self._pool if self.pinned_alloc == "exact" else None,
                                           self.pinned_alloc, borrow=self._borrow)
        except PoolExhaustedError as exc:
            raise StagingExhaustedError(
                f"the staging plan needs {format_bytes(self.plan.total_bytes)} ({self.plan.describe()}); "
                f"the PinnedPool has {format_bytes(exc.free_bytes)} free of {format_bytes(exc.capacity)}") from exc
        if self._cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)

    def _offload_parameters(self) -> None:
        store = self.store
        for sp in self.params.streamed.values():
            param = sp.param
            if getattr(param, KEY_ATTR, None) == sp.key and is_placeholder(param.data):
                if sp.key not in store:
                    raise KeyError(f"{sp.name} is a placeholder but {sp.key!r} is not in the store")
                meta = store.meta(sp.key)
                if tuple(meta.shape) != sp.shape or meta.dtype != sp.dtype:
                    raise ValueError(f"{sp.name}: the store holds {meta.dtype}{list(meta.shape)}, "
                                     f"the model expects {sp.dtype}{list(sp.shape)}")
                self._mark_streamed(sp)
                continue
            if param.device.type == "meta":
                raise ValueError(f"{sp.name} is on the meta device: materialize the model into the store first "
                                 "(engine.offload.initialize_into_store)")
            store.allocate(sp.key, sp.shape, sp.dtype)
            slot = self._slot_for(sp.slot_nbytes, demand=True)
            try:
                slot.tensor(sp.shape, sp.dtype).copy_(param.detach())
                store.write_from(sp.key, slot.io_buffer).wait()
                self._stats["bytes_written"] += sp.slot_nbytes
            finally:
                self._buffers.release(slot)
            setattr(param, KEY_ATTR, sp.key)
            self._mark_streamed(sp)
        for name, param in self.params.resident:
            if is_placeholder(param.data) and getattr(param, KEY_ATTR, None) in store:
                # made resident again (a larger threshold than the one it was stored with)
                param.data = store.get(getattr(param, KEY_ATTR)).to(self.device)
                delattr(param, KEY_ATTR)
                if type(param) is StreamedParameter:
                    param.__class__ = nn.Parameter
            elif param.device.type == "meta":
                raise ValueError(f"{name} is on the meta device: materialize the model first "
                                 "(engine.offload.initialize_into_store)")
            elif param.device != self.device:
                param.data = param.data.to(self.device)
        if self._cuda:
            for module in self.model.modules():
                for bname, buf in module._buffers.items():
                    if buf is not None and buf.device != self.device:
                        module._buffers[bname] = buf.to(self.device)

    def _mark_streamed(self, sp: StreamedParam) -> None:
        sp.set_placeholder(self.device)
        setattr(sp.param, STREAMER_ATTR, weakref.ref(self))  # weak: a parameter must not keep the streamer alive

    def _install_hooks(self) -> None:
        for unit in self.params.units:
            if unit.params:
                self._unit_of[id(unit.module)] = unit
                self._hooks.append(unit.module.register_load_state_dict_pre_hook(_refuse_load(unit)))
            for key in unit.keys:
                self._owner.setdefault(key, unit)
        # Units and every module above one: a module's forward may read a descendant's weight
        # (fetched on access into the innermost such module running, see call_with_weights).
        unit_names = [u.name for u in self.params.units]
        for name, module in self.model.named_modules():
            if not any(u == name or name == "" or u.startswith(name + ".") for u in unit_names):
                continue
            self._module_names[id(module)] = name
            # first among pre-hooks (others may read the weights), last among forward hooks
            self._hooks.append(module.register_forward_pre_hook(self._unit_pre_hook, prepend=True))
            self._hooks.append(module.register_forward_hook(self._unit_post_hook, always_call=True))
        # registered last with prepend: runs before a unit pre-hook on the root itself
        self._hooks.append(self.model.register_forward_pre_hook(self._root_pre_hook, prepend=True))
        if self.on_grad is not None:
            seen: set[int] = set()
            for name, param in self.model.named_parameters():
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    self._hooks.append(param.register_post_accumulate_grad_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        on_grad = self.on_grad

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            param.grad = None
            on_grad(name, grad)

        return hook

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._unit_of.clear()
        self._module_names.clear()
        self._owner.clear()
        # scope units (non-unit modules seen using weights) were appended after the real ones
        self._scopes.clear()
        self.params.units[:] = [u for u in self.params.units if u.params]

    def detach(self, restore: bool = True) -> None:
        """Removes the hooks; with ``restore`` the streamed parameters get their data back in memory
        (on ``device``) and leave the store's bookkeeping (their store entries stay until freed).
        Without it they stay placeholders backed by the store."""
        if not self._attached:
            return
        self._remove_hooks()
        self._drain()
        if restore:
            for sp in self.params.streamed.values():
                data = self.store.get(sp.key)  # the parameter's own memory again, not staging
                sp.set_data(data if not self._cuda else data.to(self.device))
                for attr in (KEY_ATTR, STREAMER_ATTR):
                    if hasattr(sp.param, attr):
                        delattr(sp.param, attr)
        self._attached = False
        self._reset_state()
        self._buffers.close()
        self._buffers = None
        if self._owns_pool and not self._owns_store:  # made by attach: attach makes it again
            self._pool.close()
            self._pool = None
            self._owns_pool = False

    def _drain(self) -> None:
        """Waits for reads in flight and drops every cached weight."""
        for frame in reversed(self._frames):
            if frame.hooks is not None:
                frame.hooks.__exit__(None, None, None)
        self._frames.clear()
        for sp in self.params.streamed.values():
            if self._active.get(sp.key):
                sp.set_placeholder(self.device)
        self._active.clear()
        self._mstack.clear()
        for entry in list(self._cache.values()):
            self._evict(entry)
        self._reclaim()

    def close(self) -> None:
        """Detaches (keeping placeholders) and closes the store and pool if the streamer made them."""
        self.detach(restore=False)
        if self._owns_store:
            self.store.close()
        if self._owns_pool and self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "ParameterStreamer":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach(restore=self.restore_on_exit)
        if self._owns_store:
            self.close()

    # ------------------------------------------------------------------ module hooks
    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        if self._frames:
            return  # the root called from inside a unit (unusual): same step
        # A new step begins unless an earlier forward's graph is still waiting for its backward
        # (gradient accumulation over several forwards before one backward).
        if self._step_backward or not len(self._pending) or self._order.recording is None:
            self._order.start((torch.is_grad_enabled(), module.training))
            self._step_backward = False
            self._step_tapes = []

    def _unit_pre_hook(self, module: nn.Module, args: Any) -> None:
        with self._lock:
            self._mstack.append(module)
            unit = self._unit_of.get(id(module))
            if unit is not None:
                self._unit_pre(module, unit)

    def _unit_pre(self, module: nn.Module, unit: Unit) -> None:
        frame = _Frame(module, unit)
        self._frames.append(frame)  # from here on the (always-called) forward hook undoes what is done
        self._event("F", unit, unit.keys, None)
        self._activate(frame, [sp for _, sp in unit.params])
        self._save_handles(frame)

    def _activate(self, frame: _Frame, sps: list[StreamedParam]) -> None:
        for sp in sps:
            n = self._active.get(sp.key, 0)
            if n == 0:
                weight = self._weight(sp.key)
                sp.set_data(weight)
                self._live_ptrs[(weight.device, weight.untyped_storage().data_ptr())] = sp.key
            self._active[sp.key] = n + 1
            frame.activated.append(sp)

    def _save_handles(self, frame: _Frame) -> None:
        """From now until the frame ends, autograd saves views of streamed weights as handles."""
        if torch.is_grad_enabled() and frame.hooks is None:
            frame.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
            hooks = torch.autograd.graph.saved_tensors_hooks(self._packer(frame), self._unpack)
            hooks.__enter__()
            frame.hooks = hooks

    def _unit_post_hook(self, module: nn.Module, args: Any, output: Any = None) -> None:
        with self._lock:
            self._unit_post(module)
            for i in range(len(self._mstack) - 1, -1, -1):
                if self._mstack[i] is module:
                    del self._mstack[i:]
                    break

    def _unit_post(self, module: nn.Module) -> None:
        for i in range(len(self._frames) - 1, -1, -1):
            if self._frames[i].module is module:
                self._pop_frames(i)
                return

    def _pop_frames(self, i: int) -> None:
        """Ends frame ``i`` and the frames above it (calls that left without their hook: should not happen)."""
        while len(self._frames) > i:
            frame = self._frames.pop()
            if frame.hooks is not None:
                frame.hooks.__exit__(None, None, None)
            for sp in frame.activated:
                n = self._active.get(sp.key, 0) - 1
                if n > 0:
                    self._active[sp.key] = n
                    continue
                self._active.pop(sp.key, None)
                weight = sp.param.data
                ptr = (weight.device, weight.untyped_storage().data_ptr())
                if frame.scope is not None and frame.scope in self._frames:
                    frame.scope.kept[ptr] = sp.key  # views made by the op stay handles until the scope ends
                else:
                    self._live_ptrs.pop(ptr, None)
                sp.set_placeholder(self.device)
            for ptr, key in frame.kept.items():
                if self._live_ptrs.get(ptr) == key and not self._active.get(key):
                    del self._live_ptrs[ptr]

    # ------------------------------------------------------------------ fetch on access
    def call_with_weights(self, func: Callable, args: tuple, kwargs: dict, params: list[nn.Parameter]) -> Any:
        """Runs ``func`` on streamed parameters whose data is a placeholder (called by
        :class:`~engine.offload.params.StreamedParameter`): a weight used outside its own module's
        forward, e.g. ``F.linear(x, self.child.weight)`` in a parent.

        The weight is fetched for this op only, as if its module were called (an ``F`` event of its
        unit: recorded and prefetched like one), and is a placeholder again right after. Inside the
        model's forward the innermost hooked module running is the op's *scope*: until the scope
        ends, autograd saves views of the weight (``w.t()`` made by this op and used by a later
        one) as handles, so backward re-fetches it and no staging slot stays pinned by the graph."""
        if not self._mstack and is_structural(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)  # .data / .to / .detach between steps: the placeholder itself
        with self._lock:
            frame = self._fetch_for_op([self._streamed_param(p) for p in params])
        try:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        finally:
            with self._lock:
                if frame in self._frames:
                    self._pop_frames(self._frames.index(frame))

    def _streamed_param(self, param: nn.Parameter) -> StreamedParam:
        sp = self.params.streamed.get(getattr(param, KEY_ATTR, None))
        if sp is None or sp.param is not param:
            raise StreamingError(
                f"a copy of the streamed parameter {getattr(param, KEY_ATTR, None)!r} (e.g. from copy.deepcopy of "
                f"an attached model) was used: it holds no data. Copy the model before attaching the streamer, or "
                f"after detach(restore=True).")
        return sp

    def _fetch_for_op(self, sps: list[StreamedParam]) -> _Frame:
        self._stats["fetched_on_access"] += len(sps)
        scope = self._scope_frame()
        owner = self._owner[sps[0].key]
        frame = _Frame(None, owner)
        frame.scope = scope
        self._frames.append(frame)
        self._event("F", owner, tuple(dict.fromkeys(sp.key for sp in sps)), None)
        self._activate(frame, sps)
        if scope is None:  # between steps or in backward: this op's saved views become handles
            self._save_handles(frame)
        return frame

    def _scope_frame(self) -> Optional[_Frame]:
        """The frame of the innermost hooked module running (made for it if it is not a unit), or None."""
        if not self._mstack:
            return None
        module = self._mstack[-1]
        for frame in reversed(self._frames):
            if frame.module is module:
                break
        else:
            unit = self._scopes.get(id(module))
            if unit is None:  # named in the execution order and backward events; owns no weights
                unit = self._scopes[id(module)] = Unit(len(self.params.units), self._module_names[id(module)],
                                                       module, [])
                self.params.units.append(unit)
                logger.info("ParameterStreamer: the forward of %r uses streamed weights of its submodules "
                            "directly; they are fetched on access", unit.name)
            frame = _Frame(module, unit)
            self._frames.append(frame)  # the module's forward hook ends it
        self._save_handles(frame)
        return frame

    # ------------------------------------------------------------------ saved-tensor hooks
    def _packer(self, frame: _Frame) -> Callable[[torch.Tensor], Any]:
        outer = frame.outer

        def pack(t: torch.Tensor) -> Any:
            key = self._weight_key(t)
            if key is not None:
                tape = frame.tape
                if tape is None:
                    tape = frame.tape = _Tape(frame.unit, len(self._step_tapes))
                    self._step_tapes.append(weakref.ref(tape))
                    self._pending.add(tape)
                tape.keys[key] = None
                return _Handle(tape, key, t)
            if outer is not None:
                return _Outer(outer[1], outer[0](t))
            return t.detach()  # like autograd's own saving: no reference cycle through a saved output

        return pack

    def _unpack(self, packed: Any) -> torch.Tensor:
        if type(packed) is _Handle:
            return self._unpack_handle(packed)
        if type(packed) is _Outer:
            return packed.unpack(packed.packed)
        return packed

    def _weight_key(self, t: torch.Tensor) -> Optional[Hashable]:
        if not self._live_ptrs or t.layout != torch.strided:
            return None
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        return self._live_ptrs.get((t.device, ptr))

    def _unpack_handle(self, h: _Handle) -> torch.Tensor:
        with self._lock:
            return self._unpack_handle_locked(h)

    def _unpack_handle_locked(self, h: _Handle) -> torch.Tensor:
        tape = h.tape
        task = torch._C._current_graph_task_id()
        if tape.task != task or task == -1:
            tape.task = task
            self._pending.discard(tape)
            self._step_backward = True
            self._event("B", tape.unit, tuple(tape.keys), tape)
        weight = self._weight(h.key)
        return torch.empty((0,), dtype=h.dtype, device=weight.device).set_(
            weight.untyped_storage(), h.offset, h.size, h.stride)

    # ------------------------------------------------------------------ events, prefetch, eviction
    def _event(self, kind: str, unit: Unit, keys: tuple, tape: Optional[_Tape]) -> None:
        self._stats["events"] += 1
        self._reclaim()
        self._poll()
        self._order.observe((kind, unit.index, keys))
        window = self._predict(kind, unit, tape)
        distance: dict[Hashable, int] = dict.fromkeys(keys, 0)
        for d, ks in enumerate(window, 1):
            for key in ks:
                distance.setdefault(key, d)
        self._distance = distance
        for key, entry in list(self._cache.items()):
            if key not in distance and not self._active.get(key):
                self._evict(entry)
        for key in keys:
            if key in self._cache or key in self._zombies:
                self._stats["hits"] += 1
            else:
                self._stats["misses"] += 1
            self._ensure(key, demand=True)
        for ks in window:
            for key in ks:
                if key not in self._cache:
                    self._ensure(key, demand=False)

    def _predict(self, kind: str, unit: Unit, tape: Optional[_Tape]) -> list[tuple]:
        k = self.prefetch_depth
        if k == 0:
            return []
        upcoming = self._order.upcoming(k)
        if upcoming is not None:
            return [ev[2] for ev in upcoming]
        if kind == "F":  # registration order
            units = self.params.units
            return [u.keys for u in units[unit.index + 1:unit.index + 1 + k]]
        out = []  # backward: the forward calls not yet unpacked, latest first
        for ref in reversed(self._step_tapes[:tape.index]):
            other = ref()
            if other is not None and other in self._pending:
                out.append(tuple(other.keys))
                if len(out) == k:
                    break
        return out

    def _ensure(self, key: Hashable, demand: bool) -> None:
        if key in self._cache:
            return
        zombie = self._zombies.pop(key, None)
        if zombie is not None:
            self._stats["zombie_hits"] += 1
            zombie.prefetched = not demand
            self._cache[key] = zombie
            if not self._cuda:
                zombie.weight = self._host_view(zombie)
            else:
                self._launch_h2d(zombie)
            return
        sp = self.params.streamed[key]
        slot = self._slot_for(sp.slot_nbytes, demand)
        if slot is None:
            self._stats["prefetch_skipped"] += 1
            return
        entry = _Entry(sp, slot, prefetched=not demand)
        entry.request = self.store.read_into(key, slot.io_buffer)
        if self._inflight == 0:
            self._busy_since = time.perf_counter()
        self._inflight += 1
        self._stats["reads"] += 1
        self._stats["bytes_read"] += sp.slot_nbytes
        if not demand:
            self._stats["prefetches"] += 1
        self._cache[key] = entry

    def _slot_for(self, nbytes: int, demand: bool) -> Optional[StagingSlot]:
        slot = self._buffers.acquire(nbytes)
        if slot is not None or not demand:
            return slot
        self._reclaim()
        slot = self._buffers.acquire(nbytes)
        if slot is not None:
            return slot
        # make room: drop prefetched weights that are not needed now, farthest first
        far = float("inf")
        candidates = [e for k, e in self._cache.items()
                      if not self._active.get(k) and self._distance.get(k, far) > 0 and e.slot is not None
                      and e.slot.size >= nbytes]
        candidates.sort(key=lambda e: self._distance.get(e.sp.key, far), reverse=True)
        for entry in candidates:
            self._evict(entry)
            slot = self._buffers.acquire(nbytes)
            if slot is not None:
                return slot
        slot = self._buffers.grow(nbytes)
        if slot is not None:
            warn_once("staging-grow", f"ParameterStreamer: the staging plan ({self.plan.describe()}) was short; "
                      f"grew a {format_bytes(slot.size)} slot from the pool")
            return slot
        held = ", ".join(f"{e.sp.name} ({format_bytes(e.slot.size)})" for e in
                         list(self._cache.values()) + list(self._zombies.values()) if e.slot is not None)
        raise StagingExhaustedError(
            f"no staging slot for a {format_bytes(nbytes)} tensor: {self._buffers.stats()['slots']} slots "
            f"({format_bytes(self._buffers.reserved_bytes)}) held by [{held}] and the pool has no room to grow. "
            f"Give the streamer a larger PinnedPool or raise buffer_count (uniform pool).")

    def _poll(self) -> None:
        """Retires reads that have completed (CUDA: starts their copies; frees slots of finished copies)."""
        for entry in list(self._cache.values()):
            if entry.request is not None and entry.request.done():
                self._retire(entry)
            if self._cuda and entry.event is not None and entry.slot is not None and entry.event.query():
                self._buffers.release(entry.slot)
                entry.slot = None

    def _retire(self, entry: _Entry, use: bool = True) -> None:
        request, entry.request = entry.request, None
        try:
            request.wait()
        except BaseException:
            # the slot's contents are garbage: forget the entry (a later use reads again)
            if self._cache.get(entry.sp.key) is entry:
                del self._cache[entry.sp.key]
            if entry.slot is not None and not entry.slot.busy():
                self._buffers.release(entry.slot)
                entry.slot = None
            raise
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._stats["read_seconds"] += time.perf_counter() - self._busy_since
        if not use:
            return
        if self._cuda:
            self._launch_h2d(entry)
        else:
            entry.weight = self._host_view(entry)

    @staticmethod
    def _host_view(entry: _Entry) -> torch.Tensor:
        # a normal tensor even when made under inference_mode: the same weight may serve a
        # grad-enabled step next, and inference tensors cannot take part in autograd
        with torch.inference_mode(False):
            return entry.slot.tensor(entry.sp.shape, entry.sp.dtype)

    def _launch_h2d(self, entry: _Entry) -> None:
        sp = entry.sp
        host = entry.slot.tensor(sp.shape, sp.dtype)
        with torch.inference_mode(False), torch.cuda.stream(self._copy_stream):
            weight = torch.empty(sp.shape, dtype=sp.dtype, device=self.device)
            weight.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        entry.weight = weight
        entry.event = event

    def _weight(self, key: Hashable) -> torch.Tensor:
        """The weight of ``key``, ready for use on the compute device now (reads it on a miss)."""
        entry = self._cache.get(key)
        if entry is None:
            if key not in self._zombies:
                self._stats["misses"] += 1
            self._ensure(key, demand=True)
            entry = self._cache[key]
        if entry.request is not None:
            start = time.perf_counter()
            self._retire(entry)
            self._stats["stall_seconds"] += time.perf_counter() - start
        entry.used = True
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(entry.event)
            entry.weight.record_stream(stream)
        return entry.weight

    def _evict(self, entry: _Entry) -> None:
        key = entry.sp.key
        self._cache.pop(key, None)
        if entry.request is not None:
            self._retire(entry, use=False)
        if entry.prefetched and not entry.used:
            self._stats["prefetch_unused"] += 1
        entry.weight = None
        if entry.slot is None:
            return
        if self._cuda and entry.event is not None:
            entry.event.synchronize()
        if entry.slot.busy() and not self._cuda:
            self._zombies[key] = entry
            return
        self._buffers.release(entry.slot)
        entry.slot = None

    def _reclaim(self) -> None:
        """Returns the slots of evicted weights whose last views are gone."""
        for key, entry in list(self._zombies.items()):
            if not entry.slot.busy():
                del self._zombies[key]
                self._buffers.release(entry.slot)
                entry.slot = None
        for entry in [e for e in self._stale if not e.slot.busy()]:
            self._stale.remove(entry)
            self._buffers.release(entry.slot)
            entry.slot = None

    def invalidate(self) -> None:
        """Forgets every cached, prefetched or evicted-but-still-viewed weight because the store's
        values changed (an optimizer step wrote new weights): the next use reads them again.
        Call between steps, outside forward and backward."""
        with self._lock:
            if self._frames:
                raise RuntimeError("ParameterStreamer.invalidate() called inside a forward pass")
            for entry in list(self._cache.values()):
                self._evict(entry)
            self._stale.extend(self._zombies.values())  # old data: never handed out again
            self._zombies.clear()
            self._reclaim()

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
        trace = self._order.traces.get(self._order.mode)
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
        ``prefetch_unused`` (evicted before use); ``order_changes``, ``traces_recorded``.
        """
        s = dict(self._stats)
        s["read_bandwidth"] = s["bytes_read"] / s["read_seconds"] if s["read_seconds"] > 0 else 0.0
        s.update(streamed_tensors=len(self.params.streamed), streamed_bytes=self.params.streamed_bytes,
                 resident_tensors=len(self.params.resident), resident_bytes=self.params.resident_bytes,
                 units=len(self.params.units), prefetch_depth=self.prefetch_depth,
                 order_changes=self._order.changes, traces_recorded=self._order.recorded,
                 plan_bytes=self.plan.total_bytes, device=str(self.device))
        s["pool"] = self._buffers.stats() if self._buffers is not None else None
        if self._pool is not None and self.pinned_alloc == "exact":
            ps = self._pool.stats()
            s["pinned_pool"] = dict(capacity=ps["capacity"], in_use=ps["in_use"], locked=ps["locked"])
        return s

    def __repr__(self) -> str:
        return (f"ParameterStreamer({len(self.params.streamed)} streamed tensors, depth={self.prefetch_depth}, "
                f"{self.buffer_pool}/{self.pinned_alloc}, device={self.device}, attached={self._attached})")


# ---------------------------------------------------------------------- convenience
def open_streamer(model: nn.Module, paths, *, store: str = "direct", prefetch_depth: int = 1,
                  resident_threshold_bytes: int = DEFAULT_RESIDENT_THRESHOLD, buffer_pool: str = "adaptive",
                  buffer_count: Optional[int] = None, pinned_alloc: str = "exact",
                  device: Union[str, torch.device] = "cpu", on_grad: Optional[GradCallback] = None,
                  checksum: bool = True, backend: str = "auto", **store_kwargs) -> ParameterStreamer:
    """Builds the PinnedPool (sized by the plan), a TensorStore on ``paths`` and an attached streamer.

    ``store`` is the store-layout ablation switch (``"direct"`` | ``"files"``), passed through to
    :class:`~engine.storage.TensorStore`; the pool is registered with the store's io_uring.
    ``streamer.close()`` closes all three.
    """
    from ..storage import TensorStore

    plan = plan_staging(model, prefetch_depth=prefetch_depth, resident_threshold_bytes=resident_threshold_bytes,
                        buffer_pool=buffer_pool, buffer_count=buffer_count)
    pool = PinnedPool(max(plan.total_bytes, 4096)) if pinned_alloc == "exact" else None
    try:
        tstore = TensorStore(paths, layout=store, pool=pool, checksum=checksum, backend=backend, **store_kwargs)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    streamer = ParameterStreamer(model, tstore, pool, prefetch_depth=prefetch_depth,
                                 resident_threshold_bytes=resident_threshold_bytes, buffer_pool=buffer_pool,
                                 buffer_count=buffer_count, pinned_alloc=pinned_alloc, device=device, on_grad=on_grad)
    streamer._owns_store = True
    streamer._owns_pool = pool is not None
    try:
        streamer.attach()
    except BaseException:
        tstore.close()
        if pool is not None:
            pool.close()
        raise
    return streamer
