"""The residency of staged weights, alone: a fake store, real staging slots, no model hooks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import PinnedPool
from engine.errors import StreamingError
from engine.offload.buffers import StagingBuffers, plan_buffers
from engine.offload.params import StreamedParam
from engine.offload.residency import Residency, State

SHAPE = (32, 32)  # 4 KiB of fp32: one aligned slot each


class FakeRequest:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.waited = False

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        self.waited = True
        if self.fail:
            raise OSError("short read")


class FakeStore:
    """Reads fill the slot with the key's number."""

    def __init__(self):
        self.fail: set = set()
        self.reads: list = []

    def read_into(self, key, buffer):
        self.reads.append(key)
        buffer.tensor(SHAPE, torch.float32).fill_(float(key[1][1:]))
        return FakeRequest(key in self.fail)


def make(n_keys: int = 4, slots: int = 2):
    streamed = {}
    for i in range(n_keys):
        key = ("param", f"w{i}")
        streamed[key] = StreamedParam(f"w{i}", key, nn.Parameter(torch.zeros(SHAPE)), SHAPE, torch.float32)
    plan = plan_buffers([[(k, sp.slot_nbytes)] for k, sp in streamed.items()], slots - 1)
    pool = PinnedPool(plan.total_bytes + 4096)
    buffers = StagingBuffers(plan, pool, borrow=True)
    stats = dict(reads=0, bytes_read=0, read_seconds=0.0, stall_seconds=0.0, hits=0, misses=0, prefetches=0,
                 prefetch_skipped=0, prefetch_unused=0, zombie_hits=0)
    store = FakeStore()
    res = Residency(streamed, store, plan, torch.device("cpu"), stats)
    res.bind(buffers, None)
    return res, streamed, store, stats, pool


def state(res: Residency, key):
    return res._cache[key].state


def test_request_use_release_evict():
    res, streamed, store, stats, _pool = make()
    k0, k1 = ("param", "w0"), ("param", "w1")
    res.advance((k0,), [(k1,)])
    assert stats["misses"] == 1 and stats["prefetches"] == 1 and store.reads == [k0, k1]
    assert state(res, k0) is State.READING
    sp = streamed[k0]
    res.use(sp)
    assert state(res, k0) is State.IN_USE and res.in_use(k0) and torch.all(sp.param.data == 0)
    assert res.key_of(sp.param.data.t()) == k0  # a view of the weight is recognised
    res.use(sp)  # a second frame
    res.release(sp)
    assert state(res, k0) is State.IN_USE
    res.release(sp)
    assert state(res, k0) is State.READY and res.key_of(torch.zeros(1)) is None
    res.advance((k1,), [])  # k0 left the window: evicted, its slot back
    assert not res.staged(k0) and stats["hits"] == 1 and stats["prefetch_unused"] == 0


def test_evicted_while_viewed_is_revived_then_stale_after_invalidate():
    res, streamed, store, stats, _pool = make()
    k0, k1 = ("param", "w0"), ("param", "w1")
    view = res.wait(k0)  # autograd still holds a view of the slot
    entry = res._cache[k0]
    res.advance((k1,), [])
    assert entry.state is State.EVICTED
    res.request(k0, demand=True)  # revived without a read
    assert stats["zombie_hits"] == 1 and entry.state is State.READY and store.reads.count(k0) == 1
    res.advance((k1,), [])
    assert entry.state is State.EVICTED
    res.invalidate()
    assert entry.state is State.STALE  # old data: never handed out again
    res.request(k0, demand=True)
    assert store.reads.count(k0) == 2 and stats["zombie_hits"] == 1
    del view
    res.reclaim()
    assert entry.state is State.RELEASED and entry.slot is None


def test_failed_read_forgets_the_entry_and_illegal_transitions_raise():
    res, streamed, store, stats, _pool = make()
    k0 = ("param", "w0")
    store.fail.add(k0)
    with pytest.raises(OSError):
        res.wait(k0)
    assert not res.staged(k0)
    store.fail.clear()
    assert torch.all(res.wait(k0) == 0)
    entry = res._cache[k0]
    with pytest.raises(StreamingError, match="illegal transition READY -> STALE"):
        entry.move(State.STALE)
    res.use(streamed[k0])
    with pytest.raises(StreamingError, match="IN_USE -> RELEASED"):
        entry.move(State.RELEASED)
    res.drain()
    assert entry.state is State.RELEASED and not res.staged(k0)
