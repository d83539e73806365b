"""The planner's per-rank side: which rank of how many a plan is for, and the sizes that change
when the state is partitioned (:mod:`engine.distributed.partition`).

A plan is one rank's. Partitioned, it is sized with rank 0's partition: rank 0 owns the most
elements of every tensor (``Partition.own`` shrinks with the rank), so every rank's plan - and the
disk its store reserves - is the same bound, and no rank can pass planning where another fails.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch.distributed as dist

from ..distributed import DistributedSpec, Partition
from ..dtypes import FP32_BYTES
from ..errors import ConfigError
from ..memory.pool import round_up_io
from .gradients import grad_staging_bytes


def planned_ranks(world_size: Optional[int] = None, rank: Optional[int] = None) -> tuple[int, int]:
    """``(world_size, rank)`` a plan is for: the arguments, else the initialized process group, else
    torchrun's ``WORLD_SIZE`` / ``RANK`` (planning inside a launched rank before the group exists),
    else one process."""
    if world_size is None:
        if dist.is_available() and dist.is_initialized():
            world_size, found = dist.get_world_size(), dist.get_rank()
        else:
            world_size, found = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
        rank = found if rank is None else rank
    rank = 0 if rank is None else rank
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be a positive integer, got {world_size!r}", "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an integer in [0, {world_size}) for world size {world_size}, got {rank!r}",
                          "rank")
    return world_size, rank


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)",
                          name) from None


def planning_partition(world_size: int, state_partitioning: str) -> Optional[Partition]:
    """The partition the plan sizes shards with: rank 0's, whose shards are the largest (a rank's
    owned elements shrink with its index), so every rank plans, and reserves, the same."""
    if world_size == 1 or state_partitioning != "partitioned":
        return None
    return Partition(DistributedSpec(rank=0, world_size=world_size))


def stored_shape(shape: tuple[int, ...], partition: Optional[Partition]) -> tuple[int, ...]:
    """A trainable tensor's store entry: the whole tensor, or (partitioned) its owned elements, flat."""
    return shape if partition is None else (partition.own(math.prod(shape)),)


def grad_staging(largest: int, partition: Optional[Partition]) -> int:
    """Pinned gradient staging: partitioned, one padded fp32 gradient (the reduce-scatter runs in it,
    in place) plus the shard's staging on its way to NVMe."""
    if partition is None:
        return grad_staging_bytes(largest)
    return round_up_io(partition.padded(largest) * FP32_BYTES) + grad_staging_bytes(partition.own(largest))
