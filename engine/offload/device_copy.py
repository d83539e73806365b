"""How a staged weight becomes usable on the compute device, and how a gradient leaves it.

Three strategies for weights, chosen once by the streamer from its device and ``copies``:

* CPU (:func:`host_view`): the pinned staging slot *is* the weight, no copy.
* "separate" (:class:`SeparateCopies`, the CPU test mode): the slot is copied into a fresh
  CPU tensor synchronously, so the weight computed with is never a view of staging and the
  slot is free as soon as the copy returns - the GPU path's placement and ordering on a CPU.
* CUDA (:class:`H2DCopies`): the slot is copied to a device tensor on a side stream, an event
  marks the copy's end; the compute stream waits on that event before the weight is used,
  and the slot is free again once the event has completed.

The copying strategies share one interface (``launch -> (weight, completion)``, ``hand_over``,
``finished``, ``wait``) and count into the streamer's stats: ``h2d_copies``, ``h2d_bytes`` and
``h2d_wait_s`` - the host time compute waited for a copy: the whole synchronous copy in
"separate" mode, the ``event.synchronize()`` calls on CUDA (the compute stream's device-side
``wait_event`` is not a host wait and is not measured here).

Gradients (:class:`D2HCopies`, CUDA): a device gradient is copied into pinned host staging on
a second stream ordered after the gradient's producer; :func:`device_grad_norm` gives its
statistics on the device before the copy. Inputs: :func:`inputs_to_device` moves a forward's
CPU tensors (at any depth in mappings, lists, tuples; container types kept) to a CUDA compute device.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any, Optional, Union

import torch

from .buffers import StagingSlot

Copies = Union["SeparateCopies", "H2DCopies"]


def host_view(slot: StagingSlot, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weight as a view of its staging slot."""
    # a normal tensor even when made under inference_mode: the same weight may serve a
    # grad-enabled step next, and inference tensors cannot take part in autograd
    with torch.inference_mode(False):
        return slot.tensor(shape, dtype)


def _count(stats: dict, key: str, value: float) -> None:
    stats[key] = stats.get(key, 0) + value


class SeparateCopies:
    """The "separate" device: each staged weight copied into a fresh CPU tensor, synchronously."""

    def __init__(self, stats: dict):
        self.stats = stats
        self.device = torch.device("cpu")

    def launch(self, slot: StagingSlot, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """A copy of the slot (not a view of it); the completion is None: already done."""
        start = time.perf_counter()
        with torch.inference_mode(False):
            weight = slot.tensor(shape, dtype).clone()
        _count(self.stats, "h2d_wait_s", time.perf_counter() - start)  # compute ran the copy itself
        _count(self.stats, "h2d_copies", 1)
        _count(self.stats, "h2d_bytes", weight.numel() * weight.element_size())
        return weight, None

    def hand_over(self, weight: torch.Tensor, event: Any) -> None:
        """Nothing to order: the copy finished before launch returned."""

    @staticmethod
    def finished(event: Any) -> bool:
        return True

    def wait(self, event: Any) -> None:
        """Nothing to wait for."""


class _StreamCopies:
    """Copies on one side stream of ``device``, each finished when its event has completed; the
    host time spent waiting for one counts as ``<wait_key>`` in ``stats``."""

    wait_key = ""

    def __init__(self, device: torch.device, stats: Optional[dict] = None):
        self.device = device
        self.stats = stats if stats is not None else {}
        self.stream = torch.cuda.Stream(device)

    @staticmethod
    def finished(event: Any) -> bool:
        return event.query()

    def wait(self, event: Any) -> None:
        """The host waits for the copy (e.g. its pinned block is needed back)."""
        start = time.perf_counter()
        event.synchronize()
        _count(self.stats, self.wait_key, time.perf_counter() - start)


class H2DCopies(_StreamCopies):
    """Host-to-device copies of staged weights on one side stream of ``device``."""

    wait_key = "h2d_wait_s"

    def launch(self, slot: StagingSlot, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """Starts copying the slot to a new device tensor; returns it and the copy's completion event."""
        host = slot.tensor(shape, dtype)
        with torch.inference_mode(False), torch.cuda.stream(self.stream):
            weight = torch.empty(shape, dtype=dtype, device=self.device)
            weight.copy_(host, non_blocking=True)  # asynchronous: the slot is pinned (registered arena)
            event = torch.cuda.Event()
            event.record(self.stream)
        _count(self.stats, "h2d_copies", 1)
        _count(self.stats, "h2d_bytes", weight.numel() * weight.element_size())
        return weight, event

    def hand_over(self, weight: torch.Tensor, event: Any) -> None:
        """Orders the current (compute) stream after the copy; the caching allocator keeps the
        device tensor until that stream is done with it."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        weight.record_stream(stream)


def device_grad_norm(grad: torch.Tensor) -> torch.Tensor:
    """The fp32 L2 norm of ``grad`` as a 0-dim tensor on its device: one reduction, no full-size
    fp32 temporary, no host synchronization. NaN when an element is NaN; inf when one is inf, or -
    unlike the host's fused kernel, which sums squares in fp64 - when finite elements' fp32 sum of
    squares overflows (a norm above ~1.8e19): the caller tells these apart (GradientOffload
    recounts such a gradient on the host), so a huge finite gradient is clipped as on the CPU."""
    return torch.linalg.vector_norm(grad, dtype=torch.float32)


class D2HCopies(_StreamCopies):
    """Device-to-host gradient copies into pinned staging on a dedicated stream of ``device``."""

    wait_key = "d2h_wait_s"

    def launch(self, grad: torch.Tensor, out: torch.Tensor) -> Any:
        """Starts ``out.copy_(grad)`` (``out`` pinned, fp32) after everything the current stream has
        queued (the gradient's producer); returns the copy's completion event."""
        producer = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(producer)
        with torch.cuda.stream(self.stream):
            src = grad if grad.dtype == out.dtype else grad.to(out.dtype)  # converted on the device
            out.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        grad.record_stream(self.stream)  # the allocator must not reuse it before the copy ran
        if src is not grad:
            src.record_stream(self.stream)
        _count(self.stats, "d2h_bytes", out.numel() * out.element_size())  # the fp32 copy crosses
        return event


def _move(v: torch.Tensor, device: torch.device) -> torch.Tensor:
    if v.device != device and v.device.type in ("cpu", "cuda"):
        # a CPU tensor (pinned: asynchronous, ordered on the stream) or one on another GPU
        return v.to(device, non_blocking=v.device.type == "cpu" and v.is_pinned())
    return v


_rebuild_warned: set[type] = set()


def _as_dict(value: Any, items: dict) -> dict:
    """The fallback for a mapping that cannot be copied and updated: a plain dict, said once per type."""
    if type(value) not in _rebuild_warned:
        _rebuild_warned.add(type(value))
        warnings.warn(f"inputs_to_device: a {type(value).__qualname__} input cannot be rebuilt with its "
                      "tensors moved to the compute device; the forward receives a plain dict instead "
                      "(pass a dict, or a mapping that supports copy.copy and item assignment)",
                      stacklevel=4)
    return items


def _mapping(value: Mapping, device: torch.device, active: set[int]) -> Any:
    moved = {k: _moved(v, device, active) for k, v in value.items()}
    changed = {k: v for k, v in moved.items() if v is not value[k]}
    if not changed:
        return value
    if type(value) is dict:
        return moved
    if not isinstance(value, MutableMapping):
        return _as_dict(value, moved)
    try:
        # a shallow copy keeps the type and its attributes (BatchEncoding's encodings, a
        # ModelOutput's fields); item assignment then replaces only the moved values
        new = copy.copy(value)
        for k, v in changed.items():
            new[k] = v
    except (TypeError, AttributeError, KeyError, copy.Error):
        return _as_dict(value, moved)
    return new


def _sequence(value: Union[list, tuple], device: torch.device, active: set[int]) -> Any:
    moved = [_moved(v, device, active) for v in value]
    if all(m is v for m, v in zip(moved, value)):
        return value
    if type(value) in (list, tuple):
        return type(value)(moved)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*moved)  # a named tuple: positional fields
    try:
        return type(value)(moved)  # a list/tuple subclass built from its items
    except TypeError:
        return list(moved) if isinstance(value, list) else tuple(moved)


def _moved(value: Any, device: torch.device, active: set[int]) -> Any:
    """``value`` with every CPU tensor inside it moved to ``device``, containers rebuilt only
    where something moved (so an input with nothing to move is returned as is)."""
    if isinstance(value, torch.Tensor):
        return _move(value, device)
    if not isinstance(value, (Mapping, list, tuple)) or id(value) in active:
        return value  # a leaf that is not a tensor, or a container that contains itself
    active.add(id(value))
    try:
        if isinstance(value, Mapping):
            return _mapping(value, device, active)
        return _sequence(value, device, active)
    finally:
        active.discard(id(value))


def inputs_to_device(args: tuple, kwargs: dict, device: torch.device) -> tuple[tuple, dict]:
    """The arguments of a forward with their CPU tensors moved to ``device``, at any depth inside
    mappings (dicts, transformers' ``BatchEncoding`` and ``ModelOutput``), lists and tuples.

    Containers keep their types: a mapping is shallow-copied and the moved values assigned (the
    caller's object is not changed); a mapping that cannot be copied and updated that way becomes
    a plain dict, with one warning per type. Named tuples are rebuilt from their fields. Other
    objects (dataclasses, custom classes) and tensors already on the device are passed as they are.
    """
    active: set[int] = set()
    return (tuple(_moved(a, device, active) for a in args),
            {k: _moved(v, device, active) for k, v in kwargs.items()})
