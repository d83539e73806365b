"""Residency of staged weights: which streamed tensors are being read, staged, in use or on their way out.

Each streamed tensor staged in a slot has one :class:`Entry` whose :class:`State` says where it is::

    READING --retire--> READY --use--> IN_USE --release (last user)--> READY
       |                  |
       +------evict-------+--> RELEASED                 (slot returned)
                          +--> EVICTED  --reclaim-->    RELEASED   (slot still viewed: data intact,
                                  |  \\--request-->     READY       a later request revives it)
                                  +--invalidate--> STALE --reclaim--> RELEASED  (old data: never handed out)

A failed read releases its entry (READING -> RELEASED; a later use reads again). Every change
of state goes through :meth:`Entry.move`, which refuses a transition the diagram lacks.

The *window* (:meth:`Residency.advance`) is the running event's keys (distance 0) and the
predicted next events' keys (distance 1, 2, ...): entries outside it that nobody uses are
evicted, missing ones are requested (read now for the running event, prefetched for the
rest), and a demand for a slot when none is free evicts the farthest prefetched ones first.

Which storages are streamed weights right now (``key_of``) is tracked here too: the
saved-tensor hooks ask it to tell a weight's views from other tensors.

Partitioned state (several ranks, :mod:`engine.distributed.partition`): a read fetches only this
rank's shard, into its place in a slot sized for the gathered tensor, and a READY entry has no
weight until it is all-gathered in place. The gathers must run in the same order on every rank,
but which entries are still staged is not the same everywhere (I/O completions free slots at
different moments, so evictions under pressure differ). So the rule depends on program order
only: the first :meth:`Residency.wait` for a key in each event (a unit's forward, a first unpack
in backward - the same sequence on every rank) gathers it, whether or not this rank still had
it gathered from an earlier event (an in-place gather of a gathered slot rewrites the same
bytes). A copying device keeps the slot until the entry is evicted instead of freeing it when
its copy finishes, so the slot is there to gather into; the device copy is made once.
"""
from __future__ import annotations

import enum
import time
from typing import Hashable, Optional

import torch

from .._log import warn_once
from ..units import format_bytes
from .buffers import BufferPlan, StagingBuffers, StagingExhaustedError, StagingSlot
from .device_copy import Copies, host_view
from .params import StreamedParam, StreamingError, round_up

Ptr = tuple  # (device, storage data pointer)


class State(enum.Enum):
    READING = "reading"  # an NVMe read into the slot is in flight
    READY = "ready"  # staged (copying devices: the copy launched); no frame uses it
    IN_USE = "in use"  # the data of its parameter in at least one running frame
    EVICTED = "evicted"  # out of the window but its slot is still viewed (autograd): data intact
    STALE = "stale"  # evicted, then invalidated while still viewed: freed once the views go
    RELEASED = "released"  # forgotten; its slot (if not still viewed after a failed read) returned


_TRANSITIONS: dict[State, frozenset] = {
    State.READING: frozenset({State.READY, State.EVICTED, State.RELEASED}),
    State.READY: frozenset({State.IN_USE, State.EVICTED, State.RELEASED}),
    State.IN_USE: frozenset({State.READY}),
    State.EVICTED: frozenset({State.READY, State.STALE, State.RELEASED}),
    State.STALE: frozenset({State.RELEASED}),
    State.RELEASED: frozenset(),
}


class Entry:
    """A streamed tensor being read or staged in a slot (and on CUDA, on the device)."""

    __slots__ = ("sp", "slot", "request", "weight", "event", "prefetched", "used", "users", "state", "gathered")

    def __init__(self, sp: StreamedParam, slot: Optional[StagingSlot], prefetched: bool):
        self.sp = sp
        self.slot = slot
        self.request = None
        self.weight: Optional[torch.Tensor] = None
        self.event = None  # a copying device: the copy's completion (None: already done)
        self.prefetched = prefetched
        self.used = False
        self.users = 0  # frames whose parameter data it is
        self.state = State.READING
        self.gathered: Optional[int] = None  # partitioned: the event in which it was last all-gathered

    def move(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise StreamingError(f"staged weight {self.sp.name!r}: illegal transition "
                                 f"{self.state.name} -> {state.name} (a streamer bug)")
        self.state = state


class Residency:
    """The staged weights of one attach of a streamer.

    ``stats``: the streamer's counter dict, updated in place (reads, bytes_read, read_seconds,
    stall_seconds, hits, misses, prefetches, prefetch_skipped, prefetch_unused, zombie_hits)."""

    def __init__(self, streamed: dict[Hashable, StreamedParam], store, plan: BufferPlan, device: torch.device,
                 stats: dict):
        self.streamed = streamed
        self.store = store
        self.plan = plan
        self.device = device
        self.stats = stats
        self.buffers: Optional[StagingBuffers] = None
        self.copies: Optional[Copies] = None  # None: the slot is the weight (CPU)
        self.reset()

    def reset(self) -> None:
        """Forgets every entry (detach: the staging slots themselves are closed by their owner)."""
        self._cache: dict[Hashable, Entry] = {}  # READING, READY, IN_USE
        self._evicted: dict[Hashable, Entry] = {}  # EVICTED
        self._stale: list[Entry] = []  # STALE
        self._live: dict[Ptr, Hashable] = {}  # storages that are streamed weights now -> key
        self._distance: dict[Hashable, int] = {}  # key -> events until its use (the window)
        self._inflight = 0
        self._busy_since = 0.0
        self._event = 0  # events seen (advance calls): the same sequence on every rank

    def bind(self, buffers: StagingBuffers, copies: Optional[Copies]) -> None:
        """The staging slots and the copy strategy (None on the CPU) made by attach."""
        self.buffers = buffers
        self.copies = copies

    # ------------------------------------------------------------------ queries
    def staged(self, key: Hashable) -> bool:
        """Read or being read (not evicted)."""
        return key in self._cache

    def in_use(self, key: Hashable) -> bool:
        entry = self._cache.get(key)
        return entry is not None and entry.state is State.IN_USE

    def key_of(self, t: torch.Tensor) -> Optional[Hashable]:
        """The key of the streamed weight whose storage ``t`` views, or None."""
        if not self._live or t.layout != torch.strided:
            return None
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        return self._live.get((t.device, ptr))

    # ------------------------------------------------------------------ the window
    def advance(self, keys: tuple, window: list[tuple]) -> None:
        """An event needs ``keys`` now and predicts ``window`` next (nearest first)."""
        self._event += 1
        distance: dict[Hashable, int] = dict.fromkeys(keys, 0)
        for d, ks in enumerate(window, 1):
            for key in ks:
                distance.setdefault(key, d)
        self._distance = distance
        for key, entry in list(self._cache.items()):
            if key not in distance and entry.state is not State.IN_USE:
                self.evict(entry)
        for key in keys:
            if key in self._cache or key in self._evicted:
                self.stats["hits"] += 1
            else:
                self.stats["misses"] += 1
            self.request(key, demand=True)
        for ks in window:
            for key in ks:
                if key not in self._cache:
                    self.request(key, demand=False)

    def request(self, key: Hashable, demand: bool) -> None:
        """Starts reading ``key`` into a slot (or revives its evicted entry); a prefetch
        (``demand=False``) is skipped when no slot is free."""
        if key in self._cache:
            return
        evicted = self._evicted.pop(key, None)
        if evicted is not None:
            self.stats["zombie_hits"] += 1
            evicted.prefetched = not demand
            self._cache[key] = evicted
            self._make_weight(evicted)  # only a viewed slot is EVICTED: its data is whole (gathered)
            evicted.move(State.READY)
            return
        sp = self.streamed[key]
        slot = self.slot_for(sp.slot_nbytes, demand)
        if slot is None:
            self.stats["prefetch_skipped"] += 1
            return
        entry = Entry(sp, slot, prefetched=not demand)
        entry.request = self.store.read_into(key, self._read_target(sp, slot))
        if self._inflight == 0:
            self._busy_since = time.perf_counter()
        self._inflight += 1
        self.stats["reads"] += 1
        self.stats["bytes_read"] += sp.store_nbytes if sp.partition is not None else sp.slot_nbytes
        if not demand:
            self.stats["prefetches"] += 1
        self._cache[key] = entry

    @staticmethod
    def _read_target(sp: StreamedParam, slot: StagingSlot):
        """Where the store read lands: the slot, or (partitioned) this rank's place in it."""
        if sp.partition is None:
            return slot.io_buffer
        start = sp.shard_offset_nbytes()
        return slot.tensor((slot.size,), torch.uint8)[start:start + round_up(sp.store_nbytes)]

    def slot_for(self, nbytes: int, demand: bool) -> Optional[StagingSlot]:
        """A free slot; on demand, makes room (reclaims, evicts far prefetches, grows) or raises."""
        slot = self.buffers.acquire(nbytes)
        if slot is not None or not demand:
            return slot
        self.reclaim()
        slot = self.buffers.acquire(nbytes)
        if slot is not None:
            return slot
        # make room: drop prefetched weights that are not needed now, farthest first
        far = float("inf")
        # (partitioned: never one gathered in this event - another rank may still have it, and a second
        # wait here would gather again on this rank only)
        candidates = [e for k, e in self._cache.items()
                      if e.state is not State.IN_USE and self._distance.get(k, far) > 0 and e.slot is not None
                      and e.slot.size >= nbytes and (e.gathered is None or e.gathered != self._event)]
        candidates.sort(key=lambda e: self._distance.get(e.sp.key, far), reverse=True)
        for entry in candidates:
            self.evict(entry)
            slot = self.buffers.acquire(nbytes)
            if slot is not None:
                return slot
        slot = self.buffers.grow(nbytes)
        if slot is not None:
            warn_once("staging-grow", f"ParameterStreamer: the staging plan ({self.plan.describe()}) was short; "
                      f"grew a {format_bytes(slot.size)} slot from the pool")
            return slot
        held = ", ".join(f"{e.sp.name} ({format_bytes(e.slot.size)})" for e in
                         list(self._cache.values()) + list(self._evicted.values()) if e.slot is not None)
        raise StagingExhaustedError(
            f"no staging slot for a {format_bytes(nbytes)} tensor: {self.buffers.stats()['slots']} slots "
            f"({format_bytes(self.buffers.reserved_bytes)}) held by [{held}] and the pool has no room to grow. "
            f"Give the streamer a larger PinnedPool or raise buffer_count (uniform pool).")

    # ------------------------------------------------------------------ reads
    def poll(self) -> None:
        """Retires reads that have completed (a copying device: starts their copies; frees the slots
        of finished copies - the weight is not a view of its slot there)."""
        for entry in list(self._cache.values()):
            if entry.request is not None and entry.request.done():
                self.retire(entry)
            if self.copies is not None and entry.weight is not None and entry.slot is not None \
                    and entry.sp.partition is None and self.copies.finished(entry.event):
                self.buffers.release(entry.slot)
                entry.slot = None

    def retire(self, entry: Entry, use: bool = True) -> None:
        """Waits for the entry's read; with ``use`` its weight is made (READING -> READY)."""
        request, entry.request = entry.request, None
        try:
            request.wait()
        except BaseException:
            # the slot's contents are garbage: forget the entry (a later use reads again)
            if self._cache.get(entry.sp.key) is entry:
                del self._cache[entry.sp.key]
            if entry.slot is not None and not entry.slot.busy():
                self.buffers.release(entry.slot)
                entry.slot = None
            entry.move(State.RELEASED)
            raise
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self.stats["read_seconds"] += time.perf_counter() - self._busy_since
        if not use:
            return
        if entry.sp.partition is None:  # partitioned: made at its first wait, after the all-gather
            self._make_weight(entry)
        entry.move(State.READY)

    def _make_weight(self, entry: Entry) -> None:
        sp = entry.sp
        if self.copies is None:
            entry.weight = host_view(entry.slot, sp.shape, sp.dtype)
        else:
            entry.weight, entry.event = self.copies.launch(entry.slot, sp.shape, sp.dtype)
            if sp.partition is None and self.copies.finished(entry.event):
                self.buffers.release(entry.slot)  # "separate": copied already, the slot is free now
                entry.slot = None

    def _gather(self, entry: Entry) -> None:
        """Partitioned: every rank's chunk into the slot (in place); the weight is made once."""
        sp = entry.sp
        assert sp.partition is not None and entry.slot is not None
        start = time.perf_counter()
        full = entry.slot.tensor((sp.slot_nbytes,), torch.uint8)
        sp.partition.gather_(full, f"weights of {sp.name!r}")
        del full
        self.stats["gathers"] += 1
        self.stats["gather_seconds"] += time.perf_counter() - start
        entry.gathered = self._event
        if entry.weight is None:
            self._make_weight(entry)

    def wait(self, key: Hashable) -> torch.Tensor:
        """The weight of ``key``, ready for use on the compute device now (reads it on a miss)."""
        entry = self._cache.get(key)
        if entry is None:
            if key not in self._evicted:
                self.stats["misses"] += 1
            self.request(key, demand=True)
            entry = self._cache[key]
        if entry.request is not None:
            start = time.perf_counter()
            self.retire(entry)
            self.stats["stall_seconds"] += time.perf_counter() - start
        if entry.sp.partition is not None and entry.gathered != self._event:
            self._gather(entry)  # once per event, whatever this rank still had (module docstring)
        entry.used = True
        if self.copies is not None:
            self.copies.hand_over(entry.weight, entry.event)
        return entry.weight

    # ------------------------------------------------------------------ use by frames
    def use(self, sp: StreamedParam) -> None:
        """A frame needs ``sp``'s weight: the first user makes it the parameter's data."""
        entry = self._cache.get(sp.key)
        if entry is None or entry.users == 0:
            weight = self.wait(sp.key)
            sp.set_data(weight)
            self._live[(weight.device, weight.untyped_storage().data_ptr())] = sp.key
            entry = self._cache[sp.key]
            entry.move(State.IN_USE)
        entry.users += 1

    def release(self, sp: StreamedParam, keep: Optional[dict] = None) -> None:
        """A frame is done with ``sp``: the last user puts the placeholder back. ``keep`` (a running
        scope's dict) receives the weight's storage, which then still counts as the weight's until
        :meth:`forget` (views an op made stay handles until its scope ends)."""
        entry = self._cache[sp.key]
        entry.users -= 1
        if entry.users > 0:
            return
        entry.move(State.READY)
        weight = sp.param.data
        ptr = (weight.device, weight.untyped_storage().data_ptr())
        if keep is not None:
            keep[ptr] = sp.key
        else:
            self._live.pop(ptr, None)
        sp.set_placeholder(self.device)

    def forget(self, kept: dict) -> None:
        """A scope ended: its kept storages are no longer weights (unless in use again)."""
        for ptr, key in kept.items():
            if self._live.get(ptr) == key and not self.in_use(key):
                del self._live[ptr]

    # ------------------------------------------------------------------ eviction
    def evict(self, entry: Entry) -> None:
        """Out of the window: the slot is returned, or kept (EVICTED) while autograd still views it."""
        key = entry.sp.key
        self._cache.pop(key, None)
        if entry.request is not None:
            self.retire(entry, use=False)
        if entry.prefetched and not entry.used:
            self.stats["prefetch_unused"] += 1
        entry.weight = None
        if entry.slot is None:
            entry.move(State.RELEASED)
            return
        if self.copies is not None and entry.event is not None:
            self.copies.wait(entry.event)
        if entry.slot.busy() and self.copies is None:  # a copying device's weight never views its slot
            entry.move(State.EVICTED)
            self._evicted[key] = entry
            return
        self.buffers.release(entry.slot)
        entry.slot = None
        entry.move(State.RELEASED)

    def reclaim(self) -> None:
        """Returns the slots of evicted weights whose last views are gone."""
        for key, entry in list(self._evicted.items()):
            if not entry.slot.busy():
                del self._evicted[key]
                self._free(entry)
        for entry in [e for e in self._stale if not e.slot.busy()]:
            self._stale.remove(entry)
            self._free(entry)

    def _free(self, entry: Entry) -> None:
        self.buffers.release(entry.slot)
        entry.slot = None
        entry.move(State.RELEASED)

    def invalidate(self) -> None:
        """The store's values changed: forget every staged weight; evicted ones still viewed
        become STALE (never handed out again)."""
        for entry in list(self._cache.values()):
            self.evict(entry)
        for entry in self._evicted.values():
            entry.move(State.STALE)
            self._stale.append(entry)
        self._evicted.clear()
        self.reclaim()

    def drain(self) -> None:
        """Detach: every parameter in use gets its placeholder back, every staged weight is evicted
        (reads in flight are waited for)."""
        for entry in self._cache.values():
            if entry.state is State.IN_USE:
                entry.sp.set_placeholder(self.device)
                entry.users = 0
                entry.move(State.READY)
        for entry in list(self._cache.values()):
            self.evict(entry)
        self.reclaim()
