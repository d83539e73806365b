"""Saving and loading the complete training state of an :class:`~engine.offload.runtime.OffloadRuntime`.

A checkpoint is a directory (see :mod:`engine.checkpoint.atomic` for the root
layout) holding safetensors shards and ``manifest.json``:

tensors
    ``param/<name>`` compute weights of every parameter (tied ones once),
    ``master/<name>`` fp32 master weights (bf16/fp16 training), ``exp_avg/<name>`` and
    ``exp_avg_sq/<name>`` Adam moments of every trainable parameter, ``buffer/<name>``
    persistent buffers. Store-resident tensors are copied store -> pool -> file one
    segment at a time.
manifest
    per-file size and CRC32C, per-tensor file/dtype/shape/CRC32C, step counters, loss
    scaler, optimizer param groups (lr etc., as LR schedulers left them), the LR
    scheduler's ``state_dict`` when one is passed, RNG states (torch, CUDA, numpy,
    python) and the user's ``client_state``.

Several ranks (:mod:`engine.distributed`). Replicated state: rank 0 writes the checkpoint while
the others wait for its result (:func:`~.ranks.on_main_rank`: every rank returns the path, or
raises rank 0's error). Partitioned state (``runtime.partition``, manifest version 2): every rank
writes its pieces of the store tensors into rank 0's temporary directory, rank 0 the whole
tensors and the manifest (:func:`~.ranks.save_partitioned`); a load with any world size reads
the element ranges it now owns from whichever files hold them (:mod:`.layout`, :mod:`.reshard`).
The manifest records the world size. Each rank's RNG states go with it, ``rng-rank-<r>.json`` beside the manifest
for ranks r >= 1 (rank 0's are the manifest's ``rng``), so a resumed rank draws what it would
have drawn. Every rank loads the same checkpoint, so the world size may change: a rank the
checkpoint has no RNG file for (more ranks than were saved) takes rank 0's. A load that fails
on one rank fails on all (:func:`~engine.distributed.agreed_failure`). ``client_state`` is rank 0's.

JSON and safetensors only: nothing is ever unpickled. ``client_state`` and the
scheduler state must therefore be JSON values; ``client_state`` is checked to come
back exactly as given.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import crc32c
import torch

from .._log import logger
from ..distributed import ALIGN_ELEMENTS, agreed_failure, all_gather_bytes
from ..dtypes import TO_SAFETENSORS
from ..storage.staging import STAGING_BLOCKS, staging_blocks
from ..units import parse_bytes
from .atomic import MANIFEST, CheckpointRoot, inside, pause_point, write_file
from .format import (
    MAX_JSON_DEPTH,
    CheckpointError,
    CheckpointWriteError,
    json_depth,
    read_header,
    read_json_file,
    split_shards,
)
from .layout import RULE, Layout, saved_layout, saved_tensors
from .manifest import (
    FORMAT,
    MAX_MANIFEST_BYTES,
    PARTITIONED_VERSION,
    VERSION,
    check_scheduler_state,
    group_updates,
    parse_rng,
    read_manifest,
)
from .ranks import on_main_rank, save_partitioned
from .reshard import load_tensors
from .rng import rank_rng, rng_file, rng_state, set_rng_state
from .slots import Slot, drop_absent_state, match_slots, partition_of, state_slots
from .transfer import Entry, StoreSource, staging_bytes_for, write_safetensors

if TYPE_CHECKING:
    from ..offload.runtime import OffloadRuntime

DEFAULT_MAX_SHARD = "2GiB"
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------- JSON state
def _json(value: Any, what: str, exact: bool) -> Any:
    """``value`` as it will come back from JSON; refuses what JSON cannot hold (no pickle here)."""
    try:
        text = json.dumps(value).encode()
        back = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{what} must hold JSON values only (dict, list, str, int, float, bool, None), "
                              f"nested at most {MAX_JSON_DEPTH} levels: {exc}") from None
    if json_depth(text) > MAX_JSON_DEPTH - 2:  # it sits two levels deep in the manifest, which loading bounds
        raise CheckpointError(f"{what} is nested more than {MAX_JSON_DEPTH - 2} levels deep; a checkpoint "
                              "could not be loaded back")
    if exact and back != value and not _nan_equal(back, value):
        raise CheckpointError(f"{what} would not come back unchanged from JSON (tuples become lists, dict keys "
                              "become strings); convert it to plain lists/str-keyed dicts first")
    return back


def _nan_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_nan_equal(x, y) for x, y in zip(a, b))
    return a == b


def _param_groups(runtime: "OffloadRuntime") -> list[dict]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            for group in runtime.optimizer.param_groups]


def _group_members(runtime: "OffloadRuntime") -> list[list[str]]:
    """The names of each param group's parameters: a load checks them, as torch's load_state_dict
    checks group sizes (the same groups in another order would swap their lr / weight decay)."""
    members: list[list[str]] = [[] for _ in runtime.optimizer.param_groups]
    for spec in runtime.trainable:
        members[spec.group].append(spec.name)
    return members


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(runtime: "OffloadRuntime", save_dir: PathLike, client_state: Optional[dict] = None, *,
                    tag: Optional[str] = None, lr_scheduler: Any = None, keep_last: Optional[int] = None,
                    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD) -> str:
    """See :meth:`Trainer.save_checkpoint`."""
    # Everything that can be refused is checked before the first byte is written - and, with several
    # ranks, agreed on: a rank refusing alone would leave the others waiting in the collectives below.
    failure: Optional[Exception] = None
    try:
        if runtime.poisoned:
            raise CheckpointError(f"refusing to save: {runtime.poisoned}")
        if runtime.window_micro_batches:
            raise CheckpointError(f"save_checkpoint must be called at an accumulation boundary: "
                                  f"{runtime.window_micro_batches} of {runtime.gradient_accumulation_steps} "
                                  "micro-batches of this window are accumulated and would not be saved")
        keep_last = runtime.config.checkpoint_keep_last if keep_last is None else keep_last
        if not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be a non-negative integer (0 keeps all), got {keep_last!r}")
        max_shard = parse_bytes(max_shard_size)
        if max_shard <= 0:
            raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
        tag = tag if tag is not None else f"step-{runtime.global_steps:08d}"
        client = _json(client_state if client_state is not None else {}, "client_state", exact=True)
        scheduler = _json(lr_scheduler.state_dict(), "the LR scheduler's state_dict", exact=False) \
            if lr_scheduler is not None else None
        groups = _json(_param_groups(runtime), "the optimizer's param_groups", exact=False)
        slots = [s for s in state_slots(runtime) if s.source is not None]
        # Partitioned: the store tensors' pieces go into this rank's files, the rest into rank 0's.
        whole = [s for s in slots if s.range is None]
        shards = split_shards(whole, max_shard)
        own = split_shards([s for s in slots if s.range is not None and s.nbytes], max_shard)
    except Exception as exc:
        failure = exc
    failure = agreed_failure(runtime.distributed, failure, "save_checkpoint")
    if failure is not None:
        raise failure

    # Several ranks: every rank's RNG states to rank 0, which writes them.
    rngs = [json.loads(b) for b in all_gather_bytes(json.dumps(rng_state()).encode(), runtime.distributed,
                                                    "save_checkpoint (RNG states)")]
    root = CheckpointRoot(os.fspath(save_dir))
    partition = partition_of(runtime)

    def manifest_of(files: dict, tensors: dict) -> dict:
        scaler = runtime.scaler.state_dict() if runtime.scaler is not None else None
        layout = None if partition is None else dict(world_size=partition.world_size, align_elements=ALIGN_ELEMENTS,
                                                     rule=RULE)
        return dict(
            format=FORMAT, version=VERSION if layout is None else PARTITIONED_VERSION, tag=tag,
            created_ns=time.time_ns(), world_size=runtime.distributed.world_size, partition=layout,
            dtype=runtime.config.dtype, optimizer_state_dtype=runtime.config.optimizer_state_dtype,
            optimizer=runtime.config.optimizer.type, gradient_accumulation_steps=runtime.gradient_accumulation_steps,
            files=files, tensors=tensors,
            trainer=dict(micro_steps=runtime.micro_steps, global_steps=runtime.global_steps,
                         skipped_steps=runtime.skipped_steps, last_grad_norm=runtime.last_grad_norm,
                         loss_scaler=scaler, param_groups=groups, param_group_members=_group_members(runtime)),
            lr_scheduler=scheduler, rng=rngs[0], rng_files=rng_files, client_state=client)

    rng_files: dict[str, dict] = {}  # each rank's RNG file, sized and checksummed in the manifest

    def write_replicated(tmp: str) -> tuple[dict, dict]:
        files, tensors = _write_state(runtime, tmp, shards)
        for rank, state in enumerate(rngs[1:], start=1):
            data = json.dumps(state).encode()
            write_file(tmp, rng_file(rank), data)
            rng_files[rng_file(rank)] = dict(bytes=len(data), crc32c=crc32c.crc32c(data))
        return files, tensors

    def retain(final: str) -> None:
        try:
            _retain(root, keep_last)
        except OSError as exc:
            raise CheckpointWriteError(root.root, exc, f"checkpoint {tag!r} was saved at {final} and 'latest' "
                                                       f"names it, but removing old checkpoints (keep_last="
                                                       f"{keep_last}) in {root.root} failed: {exc}") from exc

    if partition is not None:
        final = save_partitioned(runtime, root, tag, slots, own, write_replicated, manifest_of, retain)
        logger.info("checkpoint saved: %s (rank %d of %d wrote its shards)", final, runtime.distributed.rank,
                    runtime.distributed.world_size)
        return final

    def write() -> str:
        with root.saving():  # one saver per directory: retention would delete another's checkpoints
            final = _save_locked(root, tag, write_replicated, manifest_of)
            retain(final)
        return final
    return on_main_rank(runtime, "save_checkpoint", write)


def _save_locked(root: CheckpointRoot, tag: str, write_replicated: Callable[[str], tuple[dict, dict]],
                 manifest_of: Callable[[dict, dict], dict]) -> str:
    """Writes checkpoint ``tag`` under a temporary name and commits it; returns its directory."""
    tmp = root.begin(tag)
    try:
        files, tensors = write_replicated(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # (a SIGKILL leaves it to the next save)
        raise
    try:
        write_file(tmp, MANIFEST, json.dumps(manifest_of(files, tensors), indent=1).encode())
        pause_point("manifest-written")
        final = root.commit(tmp, tag)  # LatestNotUpdatedError: committed, 'latest' not moved
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("checkpoint saved: %s (%d tensors in %d files)", final, len(tensors), len(files))
    return final


def _retain(root: CheckpointRoot, keep_last: int) -> None:
    """keep_last retention, after the new checkpoint is complete and ``latest`` names it."""
    order = {}
    for name in root.complete():
        try:
            meta = read_json_file(os.path.join(root.root, name, MANIFEST), "manifest", MAX_MANIFEST_BYTES)
            if meta.get("format") == FORMAT:
                order[name] = int(meta["created_ns"])
        except (CheckpointError, ValueError, AttributeError, KeyError, TypeError):
            pass  # not one of ours: retention leaves it alone
    root.retain(keep_last, order)


def _write_state(runtime: "OffloadRuntime", tmp: str, shards: list[list[Slot]]) -> tuple[dict, dict]:
    """Writes the shards into ``tmp``; returns the manifest's ``files`` and ``tensors``."""
    pause_point("tmp-created")
    files, tensors = {}, {}
    store = runtime.store
    largest = max((s.nbytes for group in shards for s in group if isinstance(s.source, StoreSource)),
                  default=1)
    with staging_blocks(runtime.pool, staging_bytes_for(store, largest), 2 * STAGING_BLOCKS) as blocks:
        for index, group in enumerate(shards):
            fname = f"state-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            entries = [Entry(s.name, s.dtype, s.shape, s.source) for s in group]
            result = write_safetensors(os.path.join(tmp, fname), entries, store, blocks,
                                       metadata={"format": "pt", "producer": FORMAT}, io=runtime.io)
            files[fname] = dict(bytes=result["bytes"], crc32c=result["crc32c"])
            for info in result["infos"]:
                tensors[info.name] = dict(file=fname, dtype=TO_SAFETENSORS[info.dtype], shape=list(info.shape),
                                          crc32c=result["tensors"][info.name])
            pause_point("shard-written")
    return files, tensors


# ---------------------------------------------------------------------------------------------- load
def load_checkpoint(runtime: "OffloadRuntime", load_dir: PathLike, *, tag: Optional[str] = None,
                    lr_scheduler: Any = None, load_rng: bool = True, convert_dtype: bool = False) -> tuple[str, dict]:
    """See :meth:`Trainer.load_checkpoint`. Several ranks: each loads the same checkpoint; when one
    fails, every rank raises (none trains on alone): a checkpoint another rank found bad is a
    :class:`CheckpointError` here too, and a rank that had loaded its part refuses to save it
    (the ranks' states no longer belong together; with partitioned loads another rank may
    have been the one verifying a file this rank read)."""
    failure: Optional[BaseException] = None
    loaded: Optional[tuple[str, dict]] = None
    try:
        path = _shared_choice(runtime, load_dir, tag)
        loaded = _load(runtime, path, lr_scheduler, load_rng, convert_dtype)
    except BaseException as exc:
        failure = exc
    agreed = agreed_failure(runtime.distributed, failure, "load_checkpoint")
    if agreed is not None and failure is None:  # another rank failed
        if loaded is not None:
            runtime.poisoned = (f"loading checkpoint {loaded[0]} failed on another rank ({agreed}); load a good "
                                "checkpoint on every rank before training or saving")
        if "CheckpointError: " in str(agreed):
            raise CheckpointError(str(agreed)) from agreed
    if agreed is not None:
        raise agreed
    assert loaded is not None
    return loaded


def _shared_choice(runtime: "OffloadRuntime", load_dir: PathLike, tag: Optional[str]) -> str:
    """The checkpoint directory to load. Several ranks: rank 0's choice is every rank's - ``latest``
    read at another moment (a save racing the load) or through another file-system cache could
    name another checkpoint on another rank."""
    spec = runtime.distributed
    mine: Optional[str] = None
    error: Optional[BaseException] = None
    try:
        mine = CheckpointRoot(os.fspath(load_dir)).resolve(tag)
    except Exception as exc:  # told through the gather below, raised after it (no rank left waiting)
        error = exc
    if spec.is_distributed:
        chosen = all_gather_bytes((mine or "").encode() if spec.is_main else b"", spec,
                                  "load_checkpoint (the checkpoint rank 0 chose)")[0].decode()
        if not spec.is_main:
            if not chosen:
                raise CheckpointError(f"{os.fspath(load_dir)}: rank 0 found no checkpoint to load there")
            return chosen
    if error is not None:
        raise error
    assert mine is not None
    return mine


def _load(runtime: "OffloadRuntime", path: str, lr_scheduler: Any, load_rng: bool,
          convert_dtype: bool) -> tuple[str, dict]:
    manifest = read_manifest(path)
    manifest_file = os.path.join(path, MANIFEST)
    saved_all = saved_tensors(manifest, manifest_file)  # partitioned: pieces checked against the rule
    in_file: dict[str, set[str]] = {fname: set() for fname in manifest["files"]}
    for tensor in saved_all.values():
        for piece in tensor.pieces:
            in_file[piece.file].add(tensor.name)
    # 1. Every file: a plain name inside the directory, its header agreeing with the manifest.
    parsed = {}
    for fname, info in manifest["files"].items():
        file = inside(path, fname, "file named in the manifest")
        header = read_header(file)
        if header.file_size != info["bytes"]:
            raise CheckpointError(f"{file}: {header.file_size} bytes, the manifest says {info['bytes']!r}")
        unlisted = sorted(set(header.tensors) - in_file[fname])
        if unlisted:
            raise CheckpointError(f"{file}: tensor(s) the manifest does not list in this file: "
                                  f"{', '.join(unlisted[:12])}{' ...' if len(unlisted) > 12 else ''}")
        parsed[fname] = header
    ckpt: dict[str, tuple[Optional[str], torch.dtype, tuple[int, ...]]] = {}
    for name, tensor in saved_all.items():
        for piece in tensor.pieces:
            info = parsed[piece.file].tensors.get(name)
            if info is None or info.dtype != tensor.dtype or info.shape != tensor.piece_shape(piece):
                raise CheckpointError(f"{parsed[piece.file].path}: tensor {name!r} in the file does not match the "
                                      f"manifest ({TO_SAFETENSORS[tensor.dtype]}{list(tensor.piece_shape(piece))})")
        ckpt[name] = (None if tensor.partitioned else tensor.pieces[0].file, tensor.dtype, tensor.shape)
    # 2. Checkpoint tensors -> this trainer's state; all problems reported at once.
    plan = match_slots(runtime, ckpt, manifest, convert_dtype, path)
    saved = manifest["trainer"]
    groups = saved["param_groups"]
    if len(groups) != len(runtime.optimizer.param_groups):
        raise CheckpointError(f"{path}: {len(groups)} optimizer param group(s) saved, the trainer has "
                              f"{len(runtime.optimizer.param_groups)}")
    members = saved.get("param_group_members")  # absent in checkpoints written before param groups
    if members is not None and members != _group_members(runtime):
        mine = _group_members(runtime)
        diff = [f"group {i}: {len(a)} saved vs {len(b)} here" for i, (a, b) in enumerate(zip(members, mine)) if a != b]
        raise CheckpointError(f"{path}: the optimizer param groups hold other parameters than this trainer's "
                              f"({'; '.join(diff)}): build the trainer with the param_groups it was saved with")
    # Every value that goes into the trainer is checked before the first tensor is loaded.
    updates = group_updates(manifest_file, groups, runtime.optimizer.param_groups)
    if lr_scheduler is not None and manifest.get("lr_scheduler") is None:
        raise CheckpointError(f"{path}: an lr_scheduler was passed but the checkpoint holds no scheduler state")
    scheduler = check_scheduler_state(manifest_file, manifest["lr_scheduler"], lr_scheduler.state_dict()) \
        if lr_scheduler is not None else None
    saved_rng, rng_source = rank_rng(path, manifest, runtime.distributed.rank) if load_rng else (None, "")
    rng = parse_rng(saved_rng, rng_source) if saved_rng else None
    for what in ("optimizer", "gradient_accumulation_steps"):
        mine = runtime.config.optimizer.type if what == "optimizer" else runtime.gradient_accumulation_steps
        if manifest.get(what) != mine:
            logger.warning("checkpoint %s was saved with %s=%r, this trainer uses %r",
                           path, what, manifest.get(what), mine)
    # 3. Stream the tensors. From here on a failure leaves the state half-loaded: say so, and refuse to save it.
    runtime.poisoned = (f"loading checkpoint {path} failed part-way; the trainer's state is incomplete "
                        "- load a good checkpoint before training or saving")
    _, absent_state = plan.pop("")
    store = runtime.store
    partition = partition_of(runtime)
    here = Layout(partition.world_size, ALIGN_ELEMENTS) if partition is not None else Layout()
    largest = max((math.prod(shape) * 4 for _, _, shape in ckpt.values()), default=1)
    with staging_blocks(runtime.pool, staging_bytes_for(store, largest)) as blocks:
        load_tensors(manifest, parsed, saved_all, {name: targets for name, (_f, targets) in plan.items()}, store,
                     blocks, here=here, there=saved_layout(manifest, manifest_file), rank=runtime.distributed.rank,
                     world_size=runtime.distributed.world_size)
    if absent_state:
        drop_absent_state(runtime, absent_state)
    runtime.invalidate()  # staged weights are the old ones; a new accumulation window
    runtime.micro_steps = saved["micro_steps"]
    runtime.global_steps = saved["global_steps"]
    runtime.skipped_steps = saved["skipped_steps"]
    if saved.get("last_grad_norm") is not None:
        runtime.last_grad_norm = float(saved["last_grad_norm"])
    if runtime.scaler is not None and saved.get("loss_scaler") is not None:
        runtime.scaler.load_state_dict(saved["loss_scaler"])
    elif runtime.scaler is not None:
        logger.warning("checkpoint %s has no fp16 loss-scaler state; the scaler keeps its initial scale", path)
    for group, update in zip(runtime.optimizer.param_groups, updates):
        group.update(update)
    if scheduler is not None:
        lr_scheduler.load_state_dict(scheduler)
    elif manifest.get("lr_scheduler") is not None:
        logger.info("checkpoint %s holds LR scheduler state; pass lr_scheduler= to restore it", path)
    if rng is not None:
        set_rng_state(rng)
    runtime.poisoned = None
    logger.info("checkpoint loaded: %s (step %d)", path, runtime.global_steps)
    return path, manifest.get("client_state") or {}
