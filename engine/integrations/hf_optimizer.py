"""The optimizer the Hugging Face Trainer holds while the engine steps.

The Trainer's loop calls ``optimizer.step()`` and ``zero_grad()`` after the window's last
micro-batch; by then the engine has already stepped (its ``step()`` after that micro-batch's
backward, inside ``training_step``: the norm, clipping and update happen where the gradients
are, in the gradient sink). So the Trainer gets this view - transformers' own precedent is
``LayerWiseDummyOptimizer``, a no-op optimizer for updates done elsewhere: ``param_groups`` and
``state`` are the engine optimizer's own objects (an LR scheduler built on the view sets the lr
the engine reads at its next step), ``step``/``zero_grad`` do nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError
from ..trainer import Trainer as EngineTrainer


class EngineStepOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` sharing the engine optimizer's ``param_groups``; ``step`` is a no-op."""

    def __init__(self, engine: EngineTrainer):
        inner = engine.optimizer
        super().__init__([p for g in inner.param_groups for p in g["params"]], dict(inner.defaults))
        # The engine's own objects, not copies: schedulers write lr into the dicts the engine reads,
        # and a checkpoint load (which updates those dicts in place) is seen here too.
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.engine_optimizer = inner

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:  # type: ignore[override]
        """The engine stepped at the window's last micro-batch (``OffloadTrainerMixin.training_step``)."""
        if closure is not None:
            raise ValueError("the engine-backed optimizer does not take a closure")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients live in the engine's gradient sink; the next window's first micro-batch overwrites them."""

    def state_dict(self) -> dict:
        raise ConfigError("the engine's optimizer state is saved with the engine checkpoint "
                          "(OffloadTrainer saves it in checkpoint-N/engine), not through optimizer.state_dict()",
                          "optimizer")

    def load_state_dict(self, state_dict: dict) -> None:
        raise ConfigError("the engine's optimizer state is restored from the engine checkpoint "
                          "(resume_from_checkpoint=), not through optimizer.load_state_dict()", "optimizer")
