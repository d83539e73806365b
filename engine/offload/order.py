"""Execution order: which streamed weights come next.

Pure bookkeeping (no torch, no hooks, no store): events in, upcoming keys out.

An *event* is ``(kind, unit index, keys)``: ``"F"`` when a unit is called (or one of its
weights is fetched on access), ``"B"`` at the first unpack of a unit call's saved weights in
a backward. The events of one step (root forward to the next root forward: forward,
backward and checkpoint recomputations) are recorded per *mode* (grad enabled, training)
and replayed on later steps of that mode to predict the next ``k`` events. When an event
differs from the recording the step has left it: :func:`predict` falls back to heuristics
(the next units in registration order forward; the forward calls not yet unpacked, latest
first, backward) and the step's own events replace the recording when it ends.
"""
from __future__ import annotations

from itertools import islice
from typing import Hashable, Iterable, Optional

from .._log import logger

Keys = tuple  # the store keys of one event's weights
Event = tuple  # (kind: "F" | "B", unit index: int, keys: Keys)

MAX_RECORDED_EVENTS = 1_000_000  # a bound on a pathological step (a loop calling units forever)


class OrderTracker:
    """Records the event order of each step and tells whether the current step follows the recording.

    ``traces[mode]``: the recorded events of the last step of that mode; ``changes``: how often a
    step re-recorded a differing order; ``recorded``: traces recorded (first ones included)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forgets every recording (a new attach)."""
        self.traces: dict[Hashable, list[Event]] = {}
        self.mode: Hashable = None
        self.recording: Optional[list[Event]] = None  # None: no step started yet
        self.pos = 0  # events of the recording matched so far in this step
        self.in_sync = False
        self.changes = 0
        self.recorded = 0

    @property
    def trace(self) -> Optional[list[Event]]:
        """The recorded order of the current mode (None before its first step ended)."""
        return self.traces.get(self.mode)

    def start(self, mode: Hashable) -> None:
        """A step of ``mode`` begins (ends the one before)."""
        self.finish()
        self.mode = mode
        self.recording = []
        self.pos = 0
        self.in_sync = mode in self.traces

    def finish(self) -> None:
        """Ends the step: its events become the recording unless they matched it entirely."""
        if self.recording:
            trace = self.traces.get(self.mode)
            if trace is None or not self.in_sync or self.pos != len(trace):
                if trace is not None:
                    self.changes += 1
                    logger.info("ParameterStreamer: execution order changed; re-recorded (%d events)",
                                len(self.recording))
                self.traces[self.mode] = self.recording
                self.recorded += 1
        self.recording = None

    def observe(self, event: Event) -> None:
        """One event of the current step (events before any step start one of mode ``("direct",)``)."""
        if self.recording is None:
            self.start(("direct",))
        if len(self.recording) < MAX_RECORDED_EVENTS:
            self.recording.append(event)
        if self.in_sync:
            trace = self.traces[self.mode]
            if self.pos < len(trace) and trace[self.pos] == event:
                self.pos += 1
            else:
                self.in_sync = False

    def upcoming(self, k: int) -> Optional[list[Event]]:
        """The next ``k`` events of the recording, or None when the step left it."""
        if not self.in_sync:
            return None
        trace = self.traces[self.mode]
        upcoming = trace[self.pos:self.pos + k]
        if len(upcoming) < k:  # the step ends: the next one starts the same way
            upcoming += trace[:min(k - len(upcoming), self.pos)]
        return upcoming


def predict(order: OrderTracker, k: int, kind: str, *, next_units: Iterable[Keys] = (),
            unconsumed: Iterable[Keys] = ()) -> list[Keys]:
    """The keys of the next ``k`` events after an event of ``kind``, nearest first.

    From the recording while the step follows it; otherwise ``next_units`` (forward: the keys of
    the units after this one in registration order) or ``unconsumed`` (backward: the keys of this
    step's forward calls not yet unpacked, latest first). Both are read lazily, at most ``k``."""
    if k == 0:
        return []
    upcoming = order.upcoming(k)
    if upcoming is not None:
        return [event[2] for event in upcoming]
    return list(islice(next_units if kind == "F" else unconsumed, k))
