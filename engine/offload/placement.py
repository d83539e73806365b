"""Where trainable parameters, their gradients and their optimizer states live: named roles.

The runtime talks to two roles, each with an NVMe and an in-DRAM implementation:

=====================  ===============================================  ==========================================
role                   NVMe (full fine-tuning)                          DRAM (PEFT: few trainable parameters)
=====================  ===============================================  ==========================================
:class:`GradientSink`  :class:`~engine.offload.gradients.GradientOffload`  fp32 gradient buffers in memory
:class:`OptimizerBackend`  :class:`~engine.offload.stepper.OptimizerStepper`  :class:`~engine.optim.CPUAdamW` in memory
=====================  ===============================================  ==========================================

The planner picks the placement (``MemoryPlan.trainable_in_memory``); :class:`TrainablePlacement`
names it, so code above the runtime (checkpoints, export) asks instead of guessing.
"""
from __future__ import annotations

import enum
from typing import Callable, Optional, Protocol, runtime_checkable

import torch

# Fills ``out`` (fp32, ``piece.numel`` elements) with a piece of a parameter's gradient; the
# stepper calls it when gradients are not in the store (the ``flat`` gradient-buffer ablation).
GradFill = Callable[..., None]


class TrainablePlacement(enum.Enum):
    """Where the trainable parameters' fp32 masters, gradients and Adam moments live."""

    NVME = "nvme"  # in the TensorStore, updated by the pipelined stepper
    DRAM = "dram"  # in memory, updated by CPUAdamW (PEFT adapters)


@runtime_checkable
class GradientSink(Protocol):
    """Receives every gradient contribution of the trainable parameters during backward."""

    received: set[str]

    def begin_window(self) -> None:
        """Starts an accumulation window (after an optimizer step, a checkpoint load, at the start)."""

    def add(self, name: str, grad: torch.Tensor, first: bool, last: bool) -> None:
        """One contribution of ``name``'s gradient; ``first``/``last``: micro-batch of the window."""

    def finish(self) -> tuple[float, bool]:
        """Ends the window: (global L2 norm, any inf/NaN) of the accumulated gradients."""

    def grad_source(self) -> Optional[GradFill]:
        """How the optimizer reads the gradients: None when it reads them itself."""

    def close(self) -> None:
        """Releases staging and buffers; idempotent."""


@runtime_checkable
class OptimizerBackend(Protocol):
    """Runs the optimizer update over the trainable parameters' state."""

    def initialize_states(self) -> None:
        """Creates the optimizer states before the first step (where they are created up front)."""

    def step(self, step: int, grad_scale: float = 1.0, grad_source: Optional[GradFill] = None) -> None:
        """One update; every gradient is multiplied by ``grad_scale`` first (unscale, clip)."""

    def close(self) -> None:
        """Releases buffers and state; idempotent."""
