"""Per-rank swap paths: ``nvme_path`` entries may hold ``{rank}`` and ``{local_rank}``.

``/mnt/nvme{local_rank}/swap`` puts each of a machine's ranks on its own local drive;
``/scratch/run/{rank}`` gives every rank its own directory on one file system. Without a
placeholder the ranks share the path, and that is safe too: each store makes its own private
swap directory in there, named after its owning process (pid and start time, see
:mod:`engine.storage.cleanup`), and a sweep never reclaims a directory whose owner is alive.
"""
from __future__ import annotations

import os

from .process_group import DistributedSpec


def rank_paths(paths: list[str], spec: DistributedSpec) -> list[str]:
    """``paths`` with ``{rank}`` / ``{local_rank}`` formatted for this rank (Config checked the fields)."""
    return [p.format(rank=spec.rank, local_rank=spec.local_rank) for p in paths]


def env_rank_path(path: str) -> str:
    """``path`` formatted for this process from torchrun's ``RANK`` / ``LOCAL_RANK`` (0 without them),
    for checks made before a process group exists (the CLI). A malformed placeholder is returned
    as it is: Config's own check names it."""
    try:
        return path.format(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, IndexError, ValueError):
        return path
