"""Several processes on ``torch.distributed`` (torchrun): the process group, the collectives
the runtime uses, per-rank paths and data sharding.

This first increment trains data-parallel with replicated state: every rank holds the whole
training state on its own swap directory and gradients are averaged at the accumulation
boundary (:mod:`engine.offload.gradients`), so every rank computes the same update. Imports
only the leaves (no offload, no storage).
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
)
from .paths import env_rank_path, rank_paths
from .process_group import SINGLE, DistributedSpec, env_local_rank, init_from_env
from .sharding import shard_indices

__all__ = [
    "DistributedSpec", "SINGLE", "check_same_sequence", "agreed_failure", "env_rank_path", "fingerprints",
    "init_from_env", "env_local_rank",
    "all_reduce_mean_", "all_gather_bytes", "barrier", "agree", "rank_paths", "shard_indices",
]
