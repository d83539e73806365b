"""Several processes on ``torch.distributed`` (torchrun): the process group, the collectives
the runtime uses, per-rank paths and data sharding.

By default the state is partitioned (ZeRO-3 over NVMe, :mod:`.partition`): each rank's store
holds 1/N of every tensor, weights are all-gathered at their first use, gradients reduce-scattered
as they arrive, and each rank updates its own shard. ``Config.state_partitioning="replicated"``
keeps the whole state on every rank instead (gradients averaged at the accumulation boundary,
:mod:`engine.offload.gradients`). Imports only the leaves (no offload, no storage).
"""
from __future__ import annotations

from .collectives import (
    agree,
    agreed_failure,
    all_gather_bytes,
    all_reduce_mean_,
    barrier,
    check_same_sequence,
    fingerprints,
    run_collective,
)
from .partition import ALIGN_ELEMENTS, Partition, make_partition
from .paths import env_rank_path, rank_paths
from .process_group import SINGLE, DistributedSpec, env_local_rank, init_from_env
from .sharding import shard_indices

__all__ = [
    "DistributedSpec", "SINGLE", "check_same_sequence", "agreed_failure", "env_rank_path", "fingerprints",
    "init_from_env", "env_local_rank",
    "all_reduce_mean_", "all_gather_bytes", "barrier", "agree", "rank_paths", "shard_indices",
    "run_collective", "ALIGN_ELEMENTS", "Partition", "make_partition",
]
