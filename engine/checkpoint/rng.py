"""Each rank's RNG states in a checkpoint: torch, CUDA, numpy and Python generators as JSON.

Rank 0's go into the manifest (``rng``), rank r >= 1's into ``rng-rank-<r>.json`` beside it; a
rank the checkpoint has none for (more ranks than were saved) takes rank 0's.
"""
from __future__ import annotations

import os
import random
from typing import Any

import crc32c
import numpy as np
import torch

from .._log import logger
from .atomic import MANIFEST
from .format import CheckpointError, open_regular, parse_json, read_json_file
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
    """This rank's saved RNG states: rank 0's are the manifest's; a rank the checkpoint was saved with
    must find its own file, of the size and checksum the manifest lists (a missing or damaged one is a
    CheckpointError, never another rank's stream silently); a rank beyond the saved world size takes
    rank 0's."""
    if rank == 0:
        return manifest.get("rng"), os.path.join(path, MANIFEST)
    name = rng_file(rank)
    file = os.path.join(path, name)
    saved = manifest.get("world_size")
    if saved is None and os.path.isfile(file):  # before world sizes were recorded: its file as it is
        return read_json_file(file, "RNG states", MAX_RNG_FILE_BYTES), file
    if rank >= (saved or 1):
        logger.info("checkpoint %s has no RNG states of rank %d (saved with fewer ranks): it takes rank 0's",
                    path, rank)
        return manifest.get("rng"), os.path.join(path, MANIFEST)
    listed = manifest.get("rng_files")
    if listed is not None and name not in listed:
        raise CheckpointError(f"{path}: the manifest lists no RNG file for rank {rank} of the "
                              f"{manifest.get('world_size')} it was saved with")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing - the RNG states of rank {rank}, saved with "
                              f"{manifest.get('world_size')} ranks")
    with os.fdopen(open_regular(file, "RNG states"), "rb") as f:
        data = f.read(MAX_RNG_FILE_BYTES + 1)
    if len(data) > MAX_RNG_FILE_BYTES:
        raise CheckpointError(f"{file}: RNG states larger than {MAX_RNG_FILE_BYTES} bytes; refusing it")
    if listed is not None:
        want = listed[name]
        if len(data) != want["bytes"] or crc32c.crc32c(data) != want["crc32c"]:
            raise CheckpointError(f"{file}: {len(data)} bytes, crc32c {crc32c.crc32c(data):08x}; the manifest "
                                  f"says {want['bytes']} bytes, {want['crc32c']:08x} (damaged)")
    return parse_json(data, file, "RNG states"), file
