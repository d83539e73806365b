"""How a staged weight becomes usable on the compute device.

CPU: the pinned staging slot *is* the weight (:func:`host_view`, no copy). CUDA
(:class:`H2DCopies`): the slot is copied to a device tensor on a side stream, an event
marks the copy's end; the compute stream waits on that event before the weight is used,
and the slot is free again once the event has completed.
"""
from __future__ import annotations

from typing import Any

import torch

from .buffers import StagingSlot


def host_view(slot: StagingSlot, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weight as a view of its staging slot."""
    # a normal tensor even when made under inference_mode: the same weight may serve a
    # grad-enabled step next, and inference tensors cannot take part in autograd
    with torch.inference_mode(False):
        return slot.tensor(shape, dtype)


class H2DCopies:
    """Host-to-device copies of staged weights on one side stream of ``device``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def launch(self, slot: StagingSlot, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """Starts copying the slot to a new device tensor; returns it and the copy's completion event."""
        host = slot.tensor(shape, dtype)
        with torch.inference_mode(False), torch.cuda.stream(self.stream):
            weight = torch.empty(shape, dtype=dtype, device=self.device)
            weight.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return weight, event

    def hand_over(self, weight: torch.Tensor, event: Any) -> None:
        """Orders the current (compute) stream after the copy; the caching allocator keeps the
        device tensor until that stream is done with it."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        weight.record_stream(stream)

    @staticmethod
    def finished(event: Any) -> bool:
        return event.query()

    @staticmethod
    def wait(event: Any) -> None:
        event.synchronize()
