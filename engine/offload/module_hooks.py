"""The forward side of streaming: module hooks, the stack of running frames, fetch on access.

A forward pre-hook on each unit opens a :class:`~engine.offload.saved_tensors.Frame`: an ``F``
event (prefetching follows), the unit's weights become real (:meth:`Residency.use`) and its
saved-tensor hooks start. The forward hook (``always_call``, so exceptions and checkpoint
early-stops clean up) closes it and the placeholders come back.

Every module above a unit is hooked too (a stack of running modules): a parent may compute
with a child's weight (``F.linear(x, self.child.weight)``). While its data is a placeholder,
such a weight is a ``StreamedParameter`` that asks :meth:`ModuleHooks.call_with_weights` to
fetch it for that one op: an ``F`` event of its unit. The innermost hooked module running is
the op's *scope*, whose saved-tensor hooks make views of the weight that later ops save into
handles. A pre-hook on the root module marks the start of a step for the execution order.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, Optional

import torch
from torch import nn

from .._log import logger
from .order import OrderTracker
from .params import KEY_ATTR, ModelParams, StreamedParam, StreamingError, Unit, is_structural, write_error
from .residency import Residency
from .saved_tensors import EventSink, Frame, SavedTensors


def _refuse_load(unit: Unit) -> Callable:
    """A load_state_dict pre-hook: loading would ``copy_`` into a streamed weight's placeholder
    (nn.Module turns that op's error into a generic RuntimeError; this names the weight)."""
    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for attr, sp in unit.params:
            if prefix + attr in state_dict:
                raise write_error(sp.name, f"load_state_dict key {prefix + attr!r}")
    return hook


class ModuleHooks:
    """The hooks a streamer installs on its model and the frames they open."""

    def __init__(self, model: nn.Module, params: ModelParams, residency: Residency, saved: SavedTensors,
                 order: OrderTracker, on_event: EventSink, lock: threading.RLock, stats: dict):
        self.model = model
        self.params = params
        self.residency = residency
        self.saved = saved
        self.order = order
        self.on_event = on_event
        self.lock = lock  # CUDA backward runs in autograd's device thread
        self.stats = stats
        self._handles: list = []
        self._unit_of: dict[int, Unit] = {}
        self._module_names: dict[int, str] = {}  # id(module) -> name, for every hooked module
        self._scopes: dict[int, Unit] = {}  # id(module) -> the unit naming a non-unit module's own ops
        self._owner: dict[Hashable, Unit] = {}  # key -> the first unit owning it
        self.reset()

    def reset(self) -> None:
        self.frames: list[Frame] = []
        self._mstack: list[nn.Module] = []  # hooked modules whose forward is running, innermost last

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        for unit in self.params.units:
            if unit.params:
                self._unit_of[id(unit.module)] = unit
                self._handles.append(unit.module.register_load_state_dict_pre_hook(_refuse_load(unit)))
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
            self._handles.append(module.register_forward_pre_hook(self._unit_pre_hook, prepend=True))
            self._handles.append(module.register_forward_hook(self._unit_post_hook, always_call=True))
        # registered last with prepend: runs before a unit pre-hook on the root itself
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook, prepend=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unit_of.clear()
        self._module_names.clear()
        self._owner.clear()
        # scope units (non-unit modules seen using weights) were appended after the real ones
        self._scopes.clear()
        self.params.units[:] = [u for u in self.params.units if u.params]

    def close_frames(self) -> None:
        """Detach: ends every running frame's saved-tensor hooks and forgets the frames."""
        for frame in reversed(self.frames):
            self.saved.exit(frame)
        self.frames.clear()
        self._mstack.clear()

    # ------------------------------------------------------------------ module hooks
    def _root_pre_hook(self, module: nn.Module, args: Any) -> None:
        if self.frames:
            return  # the root called from inside a unit (unusual): same step
        # A new step begins unless an earlier forward's graph is still waiting for its backward
        # (gradient accumulation over several forwards before one backward).
        if not self.saved.awaiting_backward or self.order.recording is None:
            self.order.start((torch.is_grad_enabled(), module.training))
            self.saved.new_step()

    def _unit_pre_hook(self, module: nn.Module, args: Any) -> None:
        with self.lock:
            self._mstack.append(module)
            unit = self._unit_of.get(id(module))
            if unit is not None:
                frame = Frame(module, unit)
                self.frames.append(frame)  # from here on the (always-called) forward hook undoes what is done
                self.on_event("F", unit, unit.keys, None)
                self._activate(frame, [sp for _, sp in unit.params])
                self.saved.enter(frame)

    def _activate(self, frame: Frame, sps: list[StreamedParam]) -> None:
        for sp in sps:
            self.residency.use(sp)
            frame.activated.append(sp)

    def _unit_post_hook(self, module: nn.Module, args: Any, output: Any = None) -> None:
        with self.lock:
            for i in range(len(self.frames) - 1, -1, -1):
                if self.frames[i].module is module:
                    self._pop_frames(i)
                    break
            for i in range(len(self._mstack) - 1, -1, -1):
                if self._mstack[i] is module:
                    del self._mstack[i:]
                    break

    def _pop_frames(self, i: int) -> None:
        """Ends frame ``i`` and the frames above it (calls that left without their hook: should not happen)."""
        while len(self.frames) > i:
            frame = self.frames.pop()
            self.saved.exit(frame)
            # views made by an op stay handles until its scope ends
            keep = frame.scope.kept if frame.scope is not None and frame.scope in self.frames else None
            for sp in frame.activated:
                self.residency.release(sp, keep)
            self.residency.forget(frame.kept)

    # ------------------------------------------------------------------ fetch on access
    def call_with_weights(self, func: Callable, args: tuple, kwargs: dict, params: list[nn.Parameter]) -> Any:
        """Runs ``func`` on streamed parameters whose data is a placeholder (see
        :meth:`engine.offload.streamer.ParameterStreamer.call_with_weights`)."""
        if not self._mstack and is_structural(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)  # .data / .to / .detach between steps: the placeholder itself
        with self.lock:
            frame = self._fetch_for_op([self._streamed_param(p) for p in params])
        try:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        finally:
            with self.lock:
                if frame in self.frames:
                    self._pop_frames(self.frames.index(frame))

    def _streamed_param(self, param: nn.Parameter) -> StreamedParam:
        sp = self.params.streamed.get(getattr(param, KEY_ATTR, None))
        if sp is None or sp.param is not param:
            raise StreamingError(
                f"a copy of the streamed parameter {getattr(param, KEY_ATTR, None)!r} (e.g. from copy.deepcopy of "
                f"an attached model) was used: it holds no data. Copy the model before attaching the streamer, or "
                f"after detach(restore=True).")
        return sp

    def _fetch_for_op(self, sps: list[StreamedParam]) -> Frame:
        self.stats["fetched_on_access"] += len(sps)
        scope = self._scope_frame()
        owner = self._owner[sps[0].key]
        frame = Frame(None, owner)
        frame.scope = scope
        self.frames.append(frame)
        self.on_event("F", owner, tuple(dict.fromkeys(sp.key for sp in sps)), None)
        self._activate(frame, sps)
        if scope is None:  # between steps or in backward: this op's saved views become handles
            self.saved.enter(frame)
        return frame

    def _scope_frame(self) -> Optional[Frame]:
        """The frame of the innermost hooked module running (made for it if it is not a unit), or None."""
        if not self._mstack:
            return None
        module = self._mstack[-1]
        for frame in reversed(self.frames):
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
            frame = Frame(module, unit)
            self.frames.append(frame)  # the module's forward hook ends it
        self.saved.enter(frame)
        return frame
