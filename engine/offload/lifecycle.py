"""A runtime's lifetime: what it holds beyond Python memory, released once and in order.

* :class:`Resources` - the gradient hooks and the streamer's hooks on the user's model, the
  gradient sink and optimizer backend (pinned staging), the store (its swap directory), the
  I/O ring (file descriptors) and the page-locked pool. :meth:`Resources.release` frees them
  in dependency order; it runs from ``close()`` or, for a runtime dropped without it, from a
  finalizer (:func:`finalize`) - so nothing here refers to the runtime.
* The attached-model registry: a model a live runtime streams, or whose streamed weights a
  closed one released, is refused by :func:`check_attachable`; a released model gets hooks
  that refuse to run or load (:class:`~engine.errors.TrainerClosedError`, never NaN).
* :func:`weak_callback` - hooks left on the user's model must not keep a dropped runtime alive.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._log import logger
from ..errors import ModelAttachedError, TrainerClosedError
from ..memory.pool import PinnedPool
from ..storage.aio import AsyncIO
from ..storage.store import TensorStore
from .grad_hooks import GradientHooks
from .params import is_placeholder
from .placement import GradientSink, OptimizerBackend
from .streamer import ParameterStreamer

# Models a runtime streams (a weak reference to its Resources) or whose streamed weights a
# closed runtime released (RELEASED): a second runtime on either is refused.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
RELEASED = "released"

_RELEASED_HELP = ("its streamed weights were released when its trainer closed (the parameters are "
                  "placeholders). Evaluate before trainer.close(), or close with "
                  "trainer.close(restore_weights=True) to keep the weights in the model (costs the "
                  "model's size in DRAM)")


class Resources:
    """The parts a runtime owns, filled in as it is built (a failed build releases what exists)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.hooks: Optional[GradientHooks] = None
        self.streamer: Optional[ParameterStreamer] = None
        self.gradients: Optional[GradientSink] = None
        self.backend: Optional[OptimizerBackend] = None
        self.store: Optional[TensorStore] = None
        self.io: Optional[AsyncIO] = None
        self.pool: Optional[PinnedPool] = None
        self.released = False

    def release(self, restore_weights: bool = False) -> Optional[BaseException]:
        """Releases everything, each part on its own so one failure stops nothing; returns the
        first error. Later calls do nothing."""
        if self.released:
            return None
        self.released = True
        errors: list[BaseException] = []
        self._detach(restore_weights, errors)
        # Users of the store's staging first, then the store, the ring it submits to, the pool under both.
        for part in (self.gradients, self.backend, self.streamer, self.store, self.io, self.pool):
            if part is not None:
                attempt(part.close, errors)
        attempt(self._mark_model, errors)
        return errors[0] if errors else None

    def _detach(self, restore_weights: bool, errors: list[BaseException]) -> None:
        """Removes the gradient hooks and the streamer's hooks; with ``restore_weights`` the streamed
        weights come back into the module (read from the store, which is still open)."""
        if self.hooks is not None:
            attempt(self.hooks.remove, errors)
        streamer = self.streamer
        if streamer is None:
            return
        try:
            streamer.detach(restore=restore_weights)
        except Exception as exc:
            errors.append(exc)
            attempt(lambda: streamer.detach(restore=False), errors)  # the hooks and staging at least

    def _mark_model(self) -> None:
        """A model left with placeholders refuses to run (never NaN) and to be attached again."""
        held = {id(p) for p in self.model.parameters() if is_placeholder(p.data)}
        if not held:
            _ATTACHED.pop(self.model, None)
            return
        _ATTACHED[self.model] = RELEASED
        for name, module in self.model.named_modules():
            if any(id(p) in held for p in module.parameters()):
                module.register_forward_pre_hook(_refuse_released(name), prepend=True)
            own = [attr for attr, p in module.named_parameters(recurse=False) if id(p) in held]
            if own:  # nn.Module would turn the placeholder's copy_ error into a generic RuntimeError
                module.register_load_state_dict_pre_hook(_refuse_released_load(name, own))


def attempt(release: Callable[[], Any], errors: list[BaseException]) -> None:
    """Runs one release step, collecting its error instead of stopping the others."""
    try:
        release()
    except Exception as exc:
        errors.append(exc)


def _refuse_released(name: str) -> Callable:
    def hook(module: nn.Module, args: Any) -> None:
        raise TrainerClosedError(f"the trainer is closed: {name or 'the model'} cannot run, {_RELEASED_HELP}")
    return hook


def _refuse_released_load(name: str, attrs: list[str]) -> Callable:
    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for attr in attrs:
            if prefix + attr in state_dict:
                raise TrainerClosedError(f"the trainer is closed: cannot load {prefix + attr!r} into "
                                         f"{name or 'the model'}, {_RELEASED_HELP}")
    return hook


def check_attachable(model: nn.Module) -> None:
    """Refuses a model that contains, or is part of, a model a live runtime streams or whose
    weights a closed runtime released."""
    inside = {id(m): name for name, m in model.named_modules()}
    for root, state in list(_ATTACHED.items()):
        if id(root) in inside:
            where = f"its submodule {inside[id(root)]!r}" if inside[id(root)] else "the model"
        elif any(m is model for m in root.modules()):
            where = "the model (a part of another model)"
        else:
            continue
        if state == RELEASED:
            raise TrainerClosedError(f"cannot initialize a trainer: {where} was used by a trainer that is "
                                     f"closed; {_RELEASED_HELP}; or build the model again")
        if state() is not None and not state().released:
            raise ModelAttachedError(f"cannot initialize a trainer: {where} is already attached to a live "
                                     "trainer (its weights are on that trainer's NVMe store). Call close() "
                                     "on that trainer first (close(restore_weights=True) keeps the weights "
                                     "in the model), or train a copy of the model")


def register(model: nn.Module, resources: Resources) -> None:
    """Marks ``model`` as streamed by the runtime owning ``resources`` (weakly: a dropped one frees it)."""
    _ATTACHED[model] = weakref.ref(resources)


def weak_callback(method: Callable[[str, torch.Tensor], None]) -> Callable[[str, torch.Tensor], None]:
    """The gradient hooks' callback: a weak reference to the runtime's bound ``method``, so hooks
    left on the user's model never keep a dropped runtime (and its swap file, pool and file
    descriptors) alive."""
    ref = weakref.WeakMethod(method)

    def on_grad(name: str, grad: torch.Tensor) -> None:
        target = ref()
        if target is None:
            raise TrainerClosedError(f"the trainer is closed: a gradient of {name!r} arrived after its "
                                     "trainer was garbage-collected")
        target(name, grad)

    return on_grad


def finalize(resources: Resources) -> None:
    """A runtime dropped without ``close()``: releases what it held (at garbage collection or exit)."""
    error = resources.release()
    if error is not None:
        logger.warning("a Trainer dropped without close() was released; releasing it failed: %s", error)
    else:
        logger.info("a Trainer dropped without close() was released (swap files removed, pool freed)")
