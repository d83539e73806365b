"""The gradient sink of partitioned state (several ranks): each gradient reduce-scattered as it arrives.

Every contribution autograd produces (every micro-batch) goes into a pinned staging block of the
gathered size (:meth:`~engine.distributed.partition.Partition.padded` fp32 elements, zero past the
tensor) and is reduce-scattered in place: this rank's chunk of the block then holds the average
over the ranks of its elements. Only that shard is kept: written to ``StoreKey.grad(name)`` (a
1-D tensor of the owned elements), or added to the shard already there - read into another
rank's chunk of the same block, which the reduce-scatter left free.

Why every micro-batch and not once at the accumulation boundary (as the replicated mode does):
the store holds only shards, so the full gradient of an early micro-batch has nowhere to wait for
the boundary; reducing it at once keeps NVMe traffic and disk at 1/N per rank, as ZeRO does. The
sum of per-micro-batch averages is the average of the window's sums, so training equals one
process with the global batch (to the last bits of summation order).

Statistics: each rank takes the sum of squares and the inf/NaN flag of its own shards (the fused
kernel, on the window's last contribution, or on the stored shard at :meth:`finish` for a gradient
absent from the last micro-batch); :meth:`finish` gathers every rank's pair and sums them in rank
order, so every rank computes the same global norm, clip factor and overflow decision. Before that
the runtime compares the ranks' trails of collectives (:class:`~engine.distributed.partition.CollectiveTrail`):
a rank whose graph differed is refused before any update.

On a copying device the gradient is copied to the host synchronously and reduced there (gloo; under
NCCL a gloo group made for host tensors); its statistics are taken on the host shard.
"""
from __future__ import annotations

import math
import struct
import time
from collections import deque
from typing import Optional, Sequence

import torch

from ..distributed import Partition, all_gather_bytes
from ..dtypes import FP32_BYTES
from ..errors import PoolExhaustedError
from ..memory.pool import PinnedPool, PoolBlock, round_up_io
from ..storage.store import TensorStore
from ..validate import OverflowCheck, check_choice
from .gradients import grad_stats, release_block
from .keys import StoreKey
from .placement import GradFill
from .stepper import ParamSpec

_STATS = struct.Struct("<dd")  # (sum of squares, non-finite count) of a rank's shards


class ShardedGradients:
    """The NVMe placement's :class:`~engine.offload.placement.GradientSink` under partitioned state.

    Args:
        store: this rank's shards live in ``StoreKey.grad(name)`` (fp32, the owned elements).
        pool: staging blocks (one gathered fp32 gradient each, in flight until its write completes).
        params: the trainable parameters (whole shapes).
        partition: this rank's cut of every tensor.
        overflow_check: ``"fused"`` or ``"naive"``.
        staging_bytes: at most this much staging is in flight before waiting for writes.
        copies: a copying compute device (gradients arrive there; D2H bytes are counted).
    """

    def __init__(self, store: TensorStore, pool: PinnedPool, params: Sequence[ParamSpec], partition: Partition, *,
                 overflow_check: OverflowCheck = "fused", staging_bytes: int = 64 << 20, copies: bool = False):
        check_choice("overflow_check", overflow_check, OverflowCheck)
        self.store, self.pool, self.partition = store, pool, partition
        self.params = {p.name: p for p in params}
        self.overflow_check = overflow_check
        self.staging_bytes = staging_bytes
        self.copies = copies
        self._pending: deque[tuple] = deque()  # (write request, block)
        self._pending_bytes = 0
        self._stats: dict[str, tuple[float, bool]] = {}
        self.received: set[str] = set()
        self.device_stats: dict = dict(d2h_bytes=0, d2h_wait_s=0.0, reduce_s=0.0)
        for p in params:
            store.allocate(StoreKey.grad(p.name), (partition.own(p.numel),), torch.float32)

    def begin_window(self) -> None:
        self._stats.clear()
        self.received.clear()

    # ------------------------------------------------------------------ accumulation
    def add(self, name: str, grad: torch.Tensor, first: bool, last: bool) -> None:
        """One contribution to ``name``'s gradient: reduce-scattered now, its shard stored or added."""
        spec = self.params.get(name)
        if spec is None:
            raise KeyError(f"{name!r} is not a trainable parameter of this offload")
        numel = spec.numel
        if grad.numel() != numel:
            raise ValueError(f"gradient of {name!r} has {grad.numel()} elements, expected {numel}")
        part = self.partition
        chunk, own, padded = part.chunk(numel), part.own(numel), part.padded(numel)
        block = self._staging(padded * FP32_BYTES)
        try:
            full = block.tensor(padded, torch.float32)
            start = time.perf_counter()
            full[:numel].copy_(grad.detach().reshape(-1))  # a device gradient comes over here
            if self.copies or grad.device.type != "cpu":  # "separate": this copy is the D2H
                self.device_stats["d2h_bytes"] += numel * grad.element_size()
                self.device_stats["d2h_wait_s"] += time.perf_counter() - start
            full[numel:].zero_()
            start = time.perf_counter()
            mine = part.reduce_scatter_mean_(full, numel, f"gradient of {name!r}")
            self.device_stats["reduce_s"] += time.perf_counter() - start
            accumulate = name in self.received  # an earlier contribution in this window
            if accumulate and own:
                # the stored shard, read into the next rank's chunk of this block (free after the reduce)
                other = ((part.rank + 1) % part.world_size) * chunk
                self.store.read_into(StoreKey.grad(name), full[other:other + chunk]).wait()
                mine.add_(full[other:other + own])
            if last:
                self._account(name, mine)
            del full, mine
        except BaseException:
            release_block(block)
            raise
        self.received.add(name)
        if not own:
            release_block(block)
            return
        view = block.tensor(padded, torch.float32)[part.rank * chunk:(part.rank + 1) * chunk]  # this rank's chunk
        self._pending.append((self.store.write_from(StoreKey.grad(name), view), block))
        del view
        self._pending_bytes += block.size

    def _account(self, name: str, g: torch.Tensor) -> None:
        self._stats[name] = grad_stats(g, self.overflow_check)

    def _staging(self, nbytes: int) -> PoolBlock:
        while self._pending and self._pending_bytes + nbytes > self.staging_bytes:
            self._retire_oldest()
        while True:
            try:
                return self.pool.alloc(nbytes)
            except PoolExhaustedError:
                if not self._pending:
                    raise
                self._retire_oldest()

    def _retire_oldest(self) -> None:
        request, block = self._pending.popleft()
        self._pending_bytes -= block.size
        try:
            request.wait()
        finally:  # a failed write is complete too: its staging goes back either way
            block.free()

    # ------------------------------------------------------------------ the window's end
    def finish(self) -> tuple[float, bool]:
        """Waits for every shard write; returns (global L2 norm, any inf/NaN) of the window, the same on every rank."""
        while self._pending:
            self._retire_oldest()
        spec = self.partition.spec
        for name in self.params:
            if name in self.received and name not in self._stats:
                self._recount(name)  # contributions earlier in the window, none in its last micro-batch
            elif name not in self.received:
                self._write_zeros(name)  # no part in the loss on any rank (the trail agreed): a zero gradient
        local_sumsq = math.fsum(s for s, _ in self._stats.values())
        local_bad = float(sum(1 for _, bad in self._stats.values() if bad))
        pairs = [_STATS.unpack(b) for b in all_gather_bytes(_STATS.pack(local_sumsq, local_bad), spec,
                                                             "the window's gradient norm and overflow flag")]
        nonfinite = any(bad for _, bad in pairs)
        sumsq = math.fsum(s for s, _ in pairs)  # rank order on every rank: the same norm everywhere
        return (math.inf if nonfinite else math.sqrt(sumsq)), nonfinite

    def _recount(self, name: str) -> None:
        own = self.partition.own(self.params[name].numel)
        if not own:
            self._stats[name] = (0.0, False)
            return
        block = self._staging(round_up_io(own * FP32_BYTES))
        try:
            self.store.read_into(StoreKey.grad(name), block).wait()
            self._account(name, block.tensor(own, torch.float32))
        finally:
            release_block(block)

    def _write_zeros(self, name: str) -> None:
        own = self.partition.own(self.params[name].numel)
        self._stats[name] = (0.0, False)
        if not own:
            return
        block = self._staging(round_up_io(own * FP32_BYTES))
        try:
            block.tensor(own, torch.float32).zero_()
            self.store.write_from(StoreKey.grad(name), block).wait()
        finally:
            release_block(block)

    def grad_source(self) -> Optional[GradFill]:
        return None  # the gradients are in the store (the flat ablation is refused with several ranks)

    @property
    def host_buffer_bytes(self) -> int:
        return 0

    def close(self) -> None:
        """Waits for every write in flight and frees its staging, then raises the first write error."""
        error: Optional[BaseException] = None
        while self._pending:
            try:
                self._retire_oldest()
            except Exception as exc:  # keep draining: every block must go back before the pool closes
                error = error or exc
        if error is not None:
            raise error
