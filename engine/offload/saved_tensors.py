"""The backward side of streaming: saved-tensor hooks that save a handle instead of a weight.

While a unit's forward runs (a :class:`Frame`), a pair of
``torch.autograd.graph.saved_tensors_hooks`` is active. A tensor autograd saves that views a
streamed weight (``nn.Linear`` saves ``weight.t()``, ``Conv1D``'s ``addmm`` the weight itself)
is packed as a :class:`Handle` (store key, dtype, size, stride, offset) holding no memory;
other tensors pass through to the hooks that were active before (:class:`Outer`: e.g. those
of non-reentrant activation checkpointing, so checkpointing still drops them). Unpacking a
handle in backward re-fetches the weight, and the first unpack of a unit call's handles in a
graph task is a ``B`` event (it drives prefetching in backward as unit calls do in forward).

Why saved-tensor hooks and not module backward pre-hooks (as ZeRO-3): ``F.linear`` saves
``weight.t()``, a *view* holding the staging buffer's storage, so the buffer of every layer
would stay pinned by the autograd graph until backward (peak = the whole model) unless every
op that saves a weight were replaced. Saved-tensor hooks see every saved tensor of every op and
fire exactly when autograd needs the data, including in recomputations of activation
checkpointing (reentrant or not).

Each forward call that saved handles has a :class:`Tape`: the keys it saved and its position
in the step. Tapes not yet unpacked (``pending``) tell a new root forward whether the step's
backward is still to come (gradient accumulation over several forwards), and, when the
recorded order does not apply, which weights backward needs next (the latest ones first).
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Hashable, Iterator, Optional

import torch
from torch import nn

from .params import StreamedParam, Unit
from .residency import Residency

EventSink = Callable[[str, Unit, tuple, Optional["Tape"]], None]


class Tape:
    """One call of a unit whose forward saved weight views (that backward will unpack)."""

    __slots__ = ("unit", "keys", "task", "index", "__weakref__")

    def __init__(self, unit: Unit, index: int):
        self.unit = unit
        self.keys: dict[Hashable, None] = {}
        self.task: Optional[int] = None  # graph task of the last backward that unpacked it
        self.index = index


class Handle:
    """What autograd stores instead of a tensor viewing a streamed weight."""

    __slots__ = ("tape", "key", "dtype", "size", "stride", "offset")

    def __init__(self, tape: Tape, key: Hashable, t: torch.Tensor):
        self.tape = tape
        self.key = key
        self.dtype = t.dtype
        self.size = tuple(t.size())
        self.stride = tuple(t.stride())
        self.offset = t.storage_offset()


class Outer:
    """A tensor packed by the saved-tensor hooks that were active before ours."""

    __slots__ = ("unpack", "packed")

    def __init__(self, unpack: Callable, packed: Any):
        self.unpack = unpack
        self.packed = packed


class Frame:
    """One active unit call (or one op's fetch on access, ``module`` None)."""

    __slots__ = ("module", "unit", "hooks", "tape", "outer", "activated", "scope", "kept")

    def __init__(self, module: Optional[nn.Module], unit: Unit):
        self.module = module  # None: one op's fetch on access
        self.unit = unit
        self.activated: list[StreamedParam] = []
        self.scope: Optional[Frame] = None  # fetch on access: the frame of the module the op runs in
        self.kept: dict[tuple, Hashable] = {}  # weight pointers of ops in this frame's forward
        self.hooks = None
        self.tape: Optional[Tape] = None
        self.outer = None


class SavedTensors:
    """The saved-tensor hooks of running frames and the tapes of the current step."""

    def __init__(self, residency: Residency, on_event: EventSink, lock: threading.RLock):
        self.residency = residency
        self.on_event = on_event
        self.lock = lock
        self.reset()

    def reset(self) -> None:
        self.pending: "weakref.WeakSet[Tape]" = weakref.WeakSet()  # tapes no backward unpacked yet
        self.step_tapes: list["weakref.ref[Tape]"] = []  # this step's tapes, in forward order
        self.step_backward = False  # a backward of this step has begun

    def new_step(self) -> None:
        self.step_backward = False
        self.step_tapes = []

    @property
    def awaiting_backward(self) -> bool:
        """Forward graphs of this step still wait for their backward."""
        return not self.step_backward and len(self.pending) > 0

    def unconsumed_before(self, tape: Tape) -> Iterator[tuple]:
        """Keys of this step's forward calls before ``tape`` not yet unpacked, latest first."""
        for ref in reversed(self.step_tapes[:tape.index]):
            other = ref()
            if other is not None and other in self.pending:
                yield tuple(other.keys)

    # ------------------------------------------------------------------ hooks of a frame
    def enter(self, frame: Frame) -> None:
        """From now until the frame ends, autograd saves views of streamed weights as handles."""
        if torch.is_grad_enabled() and frame.hooks is None:
            frame.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
            hooks = torch.autograd.graph.saved_tensors_hooks(self._packer(frame), self._unpack)
            hooks.__enter__()
            frame.hooks = hooks

    @staticmethod
    def exit(frame: Frame) -> None:
        if frame.hooks is not None:
            frame.hooks.__exit__(None, None, None)

    def _packer(self, frame: Frame) -> Callable[[torch.Tensor], Any]:
        outer = frame.outer

        def pack(t: torch.Tensor) -> Any:
            key = self.residency.key_of(t)
            if key is not None:
                tape = frame.tape
                if tape is None:
                    tape = frame.tape = Tape(frame.unit, len(self.step_tapes))
                    self.step_tapes.append(weakref.ref(tape))
                    self.pending.add(tape)
                tape.keys[key] = None
                return Handle(tape, key, t)
            if outer is not None:
                return Outer(outer[1], outer[0](t))
            return t.detach()  # like autograd's own saving: no reference cycle through a saved output

        return pack

    def _unpack(self, packed: Any) -> torch.Tensor:
        if type(packed) is Handle:
            with self.lock:
                return self._unpack_handle(packed)
        if type(packed) is Outer:
            return packed.unpack(packed.packed)
        return packed

    def _unpack_handle(self, h: Handle) -> torch.Tensor:
        tape = h.tape
        task = torch._C._current_graph_task_id()
        if tape.task != task or task == -1:
            tape.task = task
            self.pending.discard(tape)
            self.step_backward = True
            self.on_event("B", tape.unit, tuple(tape.keys), tape)
        weight = self.residency.wait(h.key)
        return torch.empty((0,), dtype=h.dtype, device=weight.device).set_(
            weight.untyped_storage(), h.offset, h.size, h.stride)
