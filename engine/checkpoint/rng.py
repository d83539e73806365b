"""Each rank's RNG states in a checkpoint: torch, CUDA, numpy and Python generators as JSON.

Rank 0's go into the manifest (``rng``), rank r >= 1's into ``rng-rank-<r>.json`` beside it; a
rank the checkpoint has none for (more ranks than were saved) takes rank 0's.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from .._log import logger
from .atomic import MANIFEST
from .format import read_json_file
from .manifest import RngState

MAX_RNG_FILE_BYTES = 1 << 20


def rng_file(rank: int) -> str:
    """The name of rank ``rank``'s RNG states in a checkpoint directory (ranks >= 1)."""
    return f"rng-rank-{rank:05d}.json"


def rng_state() -> dict:
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=bytes(torch.get_rng_state().numpy()).hex(),
                 python=[py[0], list(py[1]), py[2]],
                 numpy=[name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [bytes(s.numpy()).hex() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: RngState) -> None:
    torch.set_rng_state(state.torch)
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    if state.cuda is not None:  # parse_rng checked the device count and each state's size
        torch.cuda.set_rng_state_all(state.cuda)


def rank_rng(path: str, manifest: dict, rank: int) -> tuple[Any, str]:
    """This rank's saved RNG states: its own file (ranks >= 1), else rank 0's from the manifest."""
    file = os.path.join(path, rng_file(rank))
    if rank == 0 or not os.path.isfile(file):
        if rank:
            logger.info("checkpoint %s has no RNG states of rank %d (saved with fewer ranks): it takes rank 0's",
                        path, rank)
        return manifest.get("rng"), os.path.join(path, MANIFEST)
    return read_json_file(file, "RNG states", MAX_RNG_FILE_BYTES), file
