"""The start of the gradient path: each trainable parameter's gradient leaves autograd here.

``register_post_accumulate_grad_hook`` fires once autograd has finished accumulating a
contribution into ``param.grad``; the hook hands it to ``on_grad(name, grad)`` and clears
``param.grad``, so no gradient stays on the module. With reentrant activation checkpointing
a parameter may receive several contributions in one backward: the receiver adds them up.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

GradCallback = Callable[[str, torch.Tensor], None]


class GradientHooks:
    """Hooks on every trainable parameter of ``model`` (tied ones once, by their first name)."""

    def __init__(self, model: nn.Module, on_grad: GradCallback):
        self.model = model
        self.on_grad = on_grad
        self._handles: list = []

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> "GradientHooks":
        if self._handles:
            return self
        seen: set[int] = set()
        for name, param in self.model.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        on_grad = self.on_grad

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            param.grad = None  # the receiver owns it now: nothing accumulates on the module
            on_grad(name, grad)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
