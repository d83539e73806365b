"""The gradient-accumulation window: which micro-batch opens it, which closes it.

A window is ``length`` micro-batches (``gradient_accumulation_steps``), counted from its own
start, unless the training loop says where it ends (:meth:`AccumulationWindow.end_next_at`:
the Hugging Face Trainer closes an epoch's short last window early). The gradient sink asks
:meth:`position` for each gradient (first: overwrite the slot; last: the accumulated gradient
enters the norm/overflow statistics); the runtime calls :meth:`advance` after each micro-batch
and steps the optimizer when it returns True.
"""
from __future__ import annotations

from typing import Optional


class AccumulationWindow:
    """Micro-batches accumulated since the last optimizer step, and the next one's place."""

    def __init__(self, length: int):
        self.length = length
        self.accumulated = 0  # micro-batches of the open window already stepped
        self._explicit_end: Optional[bool] = None  # the loop's word on the next micro-batch

    def end_next_at(self, last: bool) -> None:
        """The next micro-batch closes the window (``last``) or not, whatever the length says."""
        self._explicit_end = bool(last)

    def position(self) -> tuple[bool, bool]:
        """(first, last) of the micro-batch now running."""
        last = self._explicit_end if self._explicit_end is not None else self.accumulated + 1 == self.length
        return self.accumulated == 0, last

    def advance(self) -> bool:
        """The running micro-batch is done; True when it closed the window (the optimizer steps)."""
        _, boundary = self.position()
        self._explicit_end = None
        self.accumulated = 0 if boundary else self.accumulated + 1
        return boundary

    def reset(self) -> None:
        """A new window begins (a checkpoint load: the open one belonged to the state it replaced)."""
        self.accumulated, self._explicit_end = 0, None
