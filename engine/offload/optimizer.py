"""The runtime's optimizer as torch sees it.

``param_groups`` carry lr and weight decay (so torch LR schedulers work); :meth:`step` runs
the runtime's offloaded update (:meth:`~engine.offload.runtime.OffloadRuntime.apply_step`).
It holds the runtime weakly: a dropped trainer goes with its last reference, never kept
alive by an optimizer a scheduler still refers to.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch

from ..errors import TrainerClosedError


class OffloadedOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` over the trainable parameters; ``apply_step`` is the runtime's."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], defaults: dict, runtime: Any):
        super().__init__(params, defaults)
        self._apply = weakref.WeakMethod(runtime.apply_step)  # no cycle through the runtime

    @torch.no_grad()
    # torch overloads step() on the closure's return type; this optimizer refuses closures
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("the offloaded optimizer does not take a closure")
        apply = self._apply()
        if apply is None:
            raise TrainerClosedError("the trainer is closed: optimizer.step() cannot run, its trainer was "
                                     "garbage-collected (keep a reference to the trainer while training)")
        apply()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients live with the gradient sink and are overwritten by the next window's first micro-batch."""
