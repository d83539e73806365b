"""The one writer of Hugging Face model directories: safetensors shards, the index, the configs.

``save_pretrained`` (weights streamed from the store) and ``merge_and_export`` (merged LoRA
weights produced one at a time) both write through :func:`write_model`: shards named as
transformers names them (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``), ``config.json`` (and ``generation_config.json``), every file
through :class:`~engine.checkpoint.private.PrivateOutput` (private, fsync'ed, renamed into place).
"""
from __future__ import annotations

import copy
import math
import re
from typing import Any, Optional, Sequence

import torch

from ..memory.pool import PoolBlock
from ..storage.aio import AsyncIO
from ..storage.store import TensorStore
from .format import split_shards
from .private import PrivateOutput, json_bytes
from .transfer import Entry, write_safetensors

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
METADATA = {"format": "pt"}  # what transformers writes in each shard's header


def shard_names(count: int) -> list[str]:
    """transformers' file names of ``count`` weight shards."""
    return [SAFE_WEIGHTS] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_config(out: PrivateOutput, config: Any, dtype: Optional[torch.dtype] = None,
                 generation_config: Any = None) -> None:
    """``config.json`` (a copy of ``config`` with ``dtype`` set, when given: what the weights are
    stored in, so loaders keep it) and ``generation_config.json`` when one is given, as
    ``config.save_pretrained`` writes them."""
    config = copy.deepcopy(config)  # the user's model keeps its own
    if dtype is not None:
        config.dtype = dtype
    out.write(CONFIG, config.to_json_string(use_diff=True).encode())
    if generation_config is not None:
        out.write(GENERATION_CONFIG, generation_config.to_json_string(use_diff=True).encode())


def write_model(out: PrivateOutput, entries: list[Entry], max_shard_bytes: int, *, config: Any = None,
                config_dtype: Optional[torch.dtype] = None, generation_config: Any = None,
                store: Optional[TensorStore] = None, blocks: Sequence[PoolBlock] = (),
                io: Optional[AsyncIO] = None) -> int:
    """Writes ``entries`` as the weight shards of a Hugging Face model directory, then its configs
    (``config`` None: none) and, for several shards, the index; removes shard files of an earlier
    export that this one does not replace. ``store``/``blocks``/``io``: for store-resident
    entries (see :func:`~engine.checkpoint.transfer.write_safetensors`). Returns the shard count."""
    shards = split_shards(entries, max_shard_bytes)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        write_safetensors(out.path(name), shard, store, list(blocks), metadata=METADATA, io=io, dir_fd=out.tmp_fd)
        out.commit(name)
    if config is not None:
        write_config(out, config, config_dtype, generation_config)
    if len(shards) > 1:
        weight_map = {e.name: name for name, shard in zip(names, shards) for e in shard}
        body = dict(metadata=dict(total_size=sum(e.nbytes for e in entries),
                                  total_parameters=sum(math.prod(e.shape) for e in entries)),
                    weight_map=dict(sorted(weight_map.items())))
        out.write(SAFE_INDEX, json_bytes(body))
        stale = [SAFE_WEIGHTS]
    else:
        stale = [SAFE_INDEX]
    # Files of an earlier export that this one does not replace would confuse a loader.
    stale += [n for n in out.names() if SHARD.match(n) and n not in names]
    for name in stale:
        out.remove(name)
    return len(shards)
