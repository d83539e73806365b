"""Partitioned state (ZeRO-3 over NVMe): each rank keeps 1/N of every tensor in its own store.

A tensor of ``n`` elements is cut into N equal *chunks* of :meth:`Partition.chunk` elements
(``ceil(n / N)`` rounded up to :data:`ALIGN_ELEMENTS`). Rank ``r`` owns elements ``[r * chunk,
min((r + 1) * chunk, n))`` of the flattened tensor - possibly none: a tensor of at most one chunk
lives on rank 0. In the store, every key of a partitioned tensor (weights, fp32 master, Adam
moments, gradient) holds a 1-D tensor of exactly the owned elements, so the optimizer stepper
updates a shard as if it were a whole parameter.

Why the alignment: a gathered weight is staged in a slot of ``N * chunk`` elements where rank r's
part starts at ``r * chunk``; with chunks a multiple of 2048 elements that offset is 4 KiB-aligned
for 2- and 4-byte dtypes, so a rank reads its shard from NVMe straight into its place (O_DIRECT)
and the all-gather runs in place - no second buffer, no copy. Likewise a gradient padded to
``N * chunk`` is reduce-scattered in place, each rank's average landing in its own chunk.

Collectives: on gloo the default group; under NCCL a gloo group made for host tensors (the
pinned slots and staging blocks are host memory; NCCL reduces device tensors only), made once
on every rank, with the default group's timeout. Every call runs in the caller's order, which
is program order (a unit's first use, a gradient's arrival), the same on every rank.
"""
from __future__ import annotations

import datetime
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import crc32c
import torch
import torch.distributed as dist

from ..dtypes import itemsize
from ..errors import AgreedFailure, DistributedError
from ..memory.pool import PinnedPool
from ..storage.staging import put_chunked
from ..storage.store import TensorStore
from .collectives import agreed_failure, all_gather_bytes, run_collective
from .process_group import DistributedSpec

# Chunk granularity in elements: 4 KiB of a 2-byte dtype (8 KiB of a 4-byte one).
ALIGN_ELEMENTS = 2048


class CollectiveTrail:
    """The partitioned collectives this rank ran since the last check, as a count and a running
    checksum of their names (bounded memory), plus the last few names for the error message.

    Ranks whose graphs differ (MoE routing, a conditional branch) would pair one rank's gather or
    reduce-scatter with another tensor's on a peer; equal sizes go through silently. The trail
    is compared at every optimizer step (:meth:`check`), before the update is applied."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.crc = 0
        self.recent: deque[str] = deque(maxlen=8)

    def record(self, what: str) -> None:
        self.count += 1
        self.crc = crc32c.crc32c(what.encode(), self.crc)
        self.recent.append(what)

    def check(self, spec: DistributedSpec, what: str) -> None:
        """Every rank's trail must be the same; else a DistributedError on every rank. Resets it."""
        mine = f"{self.count}:{self.crc:08x}"
        theirs = [b.decode() for b in all_gather_bytes(mine.encode(), spec, what)]
        recent = list(self.recent)
        self.reset()
        differ = [r for r, t in enumerate(theirs) if t != theirs[0]]
        if differ:
            raise DistributedError(
                f"{what}: the ranks ran different collectives (count:checksum per rank {theirs}; this rank's "
                f"last ones: {recent}). Every rank must run the same graph: the same modules, and gradients for "
                "the same parameters in the same order (no data-dependent branches or expert routing that "
                "differ between ranks), as DDP without find_unused_parameters")


@dataclass(frozen=True)
class Partition:
    """How this rank's share of every tensor is cut (see the module docstring)."""

    spec: DistributedSpec
    group: Any = None  # the process group host collectives run in (None: the default group)
    trail: CollectiveTrail = field(default_factory=CollectiveTrail, compare=False, repr=False)

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    def chunk(self, numel: int) -> int:
        """Elements per rank of a tensor of ``numel`` elements (the last ranks may own fewer, or none)."""
        per_rank = math.ceil(numel / self.world_size)
        return max(ALIGN_ELEMENTS, math.ceil(per_rank / ALIGN_ELEMENTS) * ALIGN_ELEMENTS)

    def range(self, numel: int, rank: Optional[int] = None) -> tuple[int, int]:
        """``[start, stop)`` of the flattened tensor that ``rank`` (default: this one) owns."""
        r = self.rank if rank is None else rank
        chunk = self.chunk(numel)
        start = min(r * chunk, numel)
        return start, min(start + chunk, numel)

    def own(self, numel: int, rank: Optional[int] = None) -> int:
        """How many elements of a ``numel``-element tensor ``rank`` owns."""
        start, stop = self.range(numel, rank)
        return stop - start

    def padded(self, numel: int) -> int:
        """Elements of a gathered buffer: ``N * chunk`` (``numel`` plus padding at the end)."""
        return self.chunk(numel) * self.world_size

    def padded_nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return self.padded(numel) * itemsize(dtype)

    def own_slice(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's elements of a flattened full tensor (a view)."""
        start, stop = self.range(flat.numel())
        return flat[start:stop]

    # ------------------------------------------------------------------ collectives (in place)
    def gather_(self, full: torch.Tensor, what: str) -> None:
        """``full`` (1-D, :meth:`padded` elements of the tensor, this rank's chunk at its place)
        receives every rank's chunk, in place."""
        chunk = full.numel() // self.world_size
        mine = full[self.rank * chunk:(self.rank + 1) * chunk]
        self.trail.record(what)
        run_collective(self.spec, "all_gather", what,
                       lambda: dist.all_gather_single(full, mine, group=self.group))

    def reduce_scatter_mean_(self, full: torch.Tensor, numel: int, what: str) -> torch.Tensor:
        """``full`` (1-D fp32, :meth:`padded` elements of a ``numel``-element tensor, zero beyond it)
        summed over the ranks into this rank's chunk, in place, then divided by N; returns the owned
        elements of that chunk (a view)."""
        chunk = full.numel() // self.world_size
        mine = full[self.rank * chunk:(self.rank + 1) * chunk]
        self.trail.record(what)
        run_collective(self.spec, "reduce_scatter", what,
                       lambda: dist.reduce_scatter_single(mine, full, op=dist.ReduceOp.SUM, group=self.group))
        mine.div_(self.world_size)
        return mine[:self.own(numel)]

    def full_from_store(self, store: TensorStore, key: Hashable, shape: tuple[int, ...],
                        dtype: torch.dtype, *, agreed: bool = True) -> torch.Tensor:
        """The whole tensor of ``key`` (``shape``), gathered from every rank's shard: collective. A
        host tensor of its own (``padded`` elements, a view of the first ``numel``): one tensor at a time.

        A rank whose own read fails still takes part in the gather (with zeros), so the ranks stay in
        step; with ``agreed`` every rank then learns it and raises :class:`AgreedFailure` at this same
        tensor (one more small collective per tensor: exports, restores). Without it (the per-step
        refresh) the failed rank raises its error and the others find out at their next collective."""
        numel = math.prod(shape)
        full = torch.empty(self.padded(numel), dtype=dtype)
        start, stop = self.range(numel)
        mine = full[self.rank * self.chunk(numel):][:stop - start]
        error: Optional[BaseException] = None
        if stop > start:
            try:
                mine.copy_(store.get(key))
            except Exception as exc:  # I/O error, CRC mismatch: reported after the gather
                error = exc
                mine.zero_()
        self.gather_(full.view(torch.uint8), f"the value of {key!r}")
        if agreed:
            failure = agreed_failure(self.spec, error, f"reading {key!r} from every rank's store")
            if failure is not None:
                raise AgreedFailure(f"reading {key!r} failed: {failure}") from failure
        elif error is not None:
            raise error
        return full[:numel].view(shape)

    def write_own(self, store: TensorStore, key: Hashable, value: torch.Tensor, pool: Optional[PinnedPool]) -> None:
        """Allocates ``key`` as this rank's shard of the whole tensor ``value`` and writes it
        (segment by segment through ``pool``)."""
        put_chunked(store, key, self.own_slice(value.detach().reshape(-1)), pool)

    def all_reduce_sum_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """``tensor`` (host) summed over the ranks in place (the window's statistics)."""
        run_collective(self.spec, "all_reduce", what,
                       lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group))
        return tensor


def make_partition(spec: DistributedSpec, timeout_s: float) -> Partition:
    """The partition of this rank's group; under NCCL a gloo group for the host collectives (made
    here, on every rank in the same order: ``new_group`` is itself collective), with the default
    group's timeout when the engine made it, else ``timeout_s`` (``Config.collective_timeout_s``:
    a user's NCCL group does not say its own, and gloo's default would be 30 minutes)."""
    if not spec.is_distributed:
        raise DistributedError("a partition needs several ranks (this is one process)")
    if spec.backend == "nccl":
        world = dist.group.WORLD
        group = _HOST_GROUPS.get(id(world))
        if group is None:  # once per default group: every trainer of the process shares it
            timeout = datetime.timedelta(seconds=spec.timeout_s if spec.timeout_s is not None else timeout_s)
            group = run_collective(spec, "new_group", "a gloo group for host collectives",
                                   lambda: dist.new_group(backend="gloo", timeout=timeout))
            _HOST_GROUPS.clear()  # a group of an earlier (destroyed) default group is dead
            _HOST_GROUPS[id(world)] = group
        return Partition(spec, group)
    return Partition(spec)


_HOST_GROUPS: dict[int, Any] = {}  # id(default group) -> its gloo group for host tensors (NCCL runs)
