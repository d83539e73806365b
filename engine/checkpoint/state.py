"""Saving and loading the complete training state of a :class:`~engine.offload.trainer.Trainer`.

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

JSON and safetensors only: nothing is ever unpickled. ``client_state`` and the
scheduler state must therefore be JSON values; ``client_state`` is checked to come
back exactly as given.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

from .._log import logger
from ..offload.params import KEY_ATTR, persistent_buffers
from ..storage.staging import STAGING_BLOCKS, staging_blocks
from ..units import parse_bytes
from .atomic import MANIFEST, CheckpointRoot, inside, pause_point, write_file
from .format import MAX_JSON_DEPTH, CheckpointError, CheckpointWriteError, DTYPE_TO_ST, json_depth, read_header, read_json_file
from .manifest import (FORMAT, MAX_MANIFEST_BYTES, VERSION, RngState, check_scheduler_state, group_updates, parse_rng,
                       read_manifest)
from .transfer import (Entry, StoreSource, StoreTarget, TensorTarget, load_safetensors, staging_bytes_for,
                       write_safetensors)

if TYPE_CHECKING:
    from ..offload.trainer import Trainer

DEFAULT_MAX_SHARD = "2GiB"
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class _Slot:
    """One tensor of the training state: how to save it and where it loads to."""

    name: str                       # "param/<name>", "master/<name>", ...
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: Union[StoreSource, torch.Tensor, None]  # None: nothing to save (optimizer state not created yet)
    target: Union[StoreTarget, TensorTarget]
    optional: bool = False          # may be absent from a checkpoint (in-memory moments before the first step)


def _state_slots(trainer: "Trainer") -> list[_Slot]:
    """Every tensor of the trainer's state, in a stable order (parameter by parameter)."""
    store, model = trainer._store, trainer.module
    trainable = {spec.name for spec in trainer._specs}
    slots: list[_Slot] = []
    in_memory = getattr(trainer._stepper, "masters", None) is not None  # ResidentTrainables placement

    def from_store(name: str, key) -> _Slot:
        meta = store.meta(key)
        return _Slot(name, meta.dtype, tuple(meta.shape), StoreSource(key), StoreTarget(key))

    for name, p in model.named_parameters():
        key = getattr(p, KEY_ATTR, None)
        if key is not None and key in store:
            slots.append(from_store(f"param/{name}", key))
        elif name in trainer._resident:
            # A resident trainable parameter: the store copy is the truth, the module's follows it.
            def accept(t: torch.Tensor, key=("param", name), p=p) -> None:
                store.put(key, t.to(store.meta(key).dtype))
                p.data.copy_(t)

            meta = store.meta(("param", name))
            slots.append(_Slot(f"param/{name}", meta.dtype, tuple(meta.shape), StoreSource(("param", name)),
                               TensorTarget(accept)))
        else:
            slots.append(_Slot(f"param/{name}", p.dtype, tuple(p.shape), p.detach(),
                               TensorTarget(lambda t, p=p: p.data.copy_(t))))
        if name in trainable and in_memory:
            slots.extend(_in_memory_slots(trainer, name, p))
        elif name in trainable:
            if trainer.mixed:
                slots.append(from_store(f"master/{name}", ("master", name)))
            for state in ("exp_avg", "exp_avg_sq"):
                slots.append(from_store(f"{state}/{name}", (state, name)))
    for full, buf in persistent_buffers(model):
        slots.append(_Slot(f"buffer/{full}", buf.dtype, tuple(buf.shape), buf.detach(),
                           TensorTarget(lambda t, buf=buf: buf.copy_(t))))
    return slots


def _in_memory_slots(trainer: "Trainer", name: str, p: torch.nn.Parameter) -> list[_Slot]:
    """Master and CPUAdamW state of a trainable parameter kept in DRAM (``trainable_placement``)."""
    resident = trainer._stepper
    master = resident.master(name)
    optimizer = resident.optimizer
    slots = []
    if master is not p.data:
        slots.append(_Slot(f"master/{name}", master.dtype, tuple(master.shape), master,
                           TensorTarget(lambda t, m=master: m.copy_(t))))
    state = optimizer.state.get(master, {})

    def set_state(key: str, t: torch.Tensor, m=master) -> None:
        entry = optimizer.state[m]  # created here when the loading trainer never stepped
        entry[key] = t.to(optimizer.state_dtype if key != "step" else torch.float32).reshape(
            m.shape if key != "step" else ()).clone()

    for key in ("exp_avg", "exp_avg_sq"):
        slots.append(_Slot(f"{key}/{name}", optimizer.state_dtype, tuple(master.shape), state.get(key),
                           TensorTarget(lambda t, key=key: set_state(key, t)), optional=True))
    step = state.get("step")
    slots.append(_Slot(f"step/{name}", torch.float32, (), None if step is None else step.reshape(()),
                       TensorTarget(lambda t: set_state("step", t)), optional=True))
    return slots


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


def _rng_state() -> dict:
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=bytes(torch.get_rng_state().numpy()).hex(),
                 python=[py[0], list(py[1]), py[2]],
                 numpy=[name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [bytes(s.numpy()).hex() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: RngState) -> None:
    torch.set_rng_state(state.torch)
    random.setstate(state.python)
    np.random.set_state(state.numpy)
    if state.cuda is not None:  # parse_rng checked the device count and each state's size
        torch.cuda.set_rng_state_all(state.cuda)


def _param_groups(trainer: "Trainer") -> list[dict]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            for group in trainer.optimizer.param_groups]


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(trainer: "Trainer", save_dir: PathLike, client_state: Optional[dict] = None, *,
                    tag: Optional[str] = None, lr_scheduler: Any = None, keep_last: Optional[int] = None,
                    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD) -> str:
    """See :meth:`Trainer.save_checkpoint`."""
    if getattr(trainer, "_checkpoint_poisoned", None):
        raise CheckpointError(f"refusing to save: {trainer._checkpoint_poisoned}")
    gas = trainer.gradient_accumulation_steps
    if trainer.micro_steps % gas:
        raise CheckpointError(f"save_checkpoint must be called at an accumulation boundary: {trainer.micro_steps % gas} "
                              f"of {gas} micro-batches of this window are accumulated and would not be saved")
    keep_last = trainer.config.checkpoint_keep_last if keep_last is None else keep_last
    if not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last must be a non-negative integer (0 keeps all), got {keep_last!r}")
    max_shard = parse_bytes(max_shard_size)
    if max_shard <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    tag = tag if tag is not None else f"step-{trainer.global_steps:08d}"
    # Everything that can be refused is checked before the first byte is written.
    client = _json(client_state if client_state is not None else {}, "client_state", exact=True)
    scheduler = _json(lr_scheduler.state_dict(), "the LR scheduler's state_dict", exact=False) \
        if lr_scheduler is not None else None
    groups = _json(_param_groups(trainer), "the optimizer's param_groups", exact=False)
    slots = [s for s in _state_slots(trainer) if s.source is not None]
    shards = _shard(slots, max_shard)

    root = CheckpointRoot(os.fspath(save_dir))
    with root.saving():  # one saver per directory: retention would delete another's checkpoints
        final = _save_locked(trainer, root, tag, shards, groups, scheduler, client)
        try:
            _retain(root, keep_last)
        except OSError as exc:
            raise CheckpointWriteError(root.root, exc, f"checkpoint {tag!r} was saved at {final} and 'latest' names "
                                                       f"it, but removing old checkpoints (keep_last={keep_last}) "
                                                       f"in {root.root} failed: {exc}") from exc
    return final


def _save_locked(trainer: "Trainer", root: CheckpointRoot, tag: str, shards: list[list[_Slot]], groups: list,
                 scheduler: Any, client: Any) -> str:
    """Writes checkpoint ``tag`` under a temporary name and commits it; returns its directory."""
    tmp = root.begin(tag)
    try:
        files, tensors = _write_state(trainer, tmp, shards)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # (a SIGKILL leaves it to the next save)
        raise
    scaler = trainer.scaler.state_dict() if trainer.scaler is not None else None
    manifest = dict(
        format=FORMAT, version=VERSION, tag=tag, created_ns=time.time_ns(),
        dtype=trainer.config.dtype, optimizer_state_dtype=trainer.config.optimizer_state_dtype,
        optimizer=trainer.config.optimizer.type, gradient_accumulation_steps=trainer.gradient_accumulation_steps,
        files=files, tensors=tensors,
        trainer=dict(micro_steps=trainer.micro_steps, global_steps=trainer.global_steps,
                     skipped_steps=trainer.skipped_steps, last_grad_norm=getattr(trainer, "last_grad_norm", None),
                     loss_scaler=scaler, param_groups=groups),
        lr_scheduler=scheduler, rng=_rng_state(), client_state=client)
    try:
        write_file(tmp, MANIFEST, json.dumps(manifest, indent=1).encode())
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


def _write_state(trainer: "Trainer", tmp: str, shards: list[list[_Slot]]) -> tuple[dict, dict]:
    """Writes the shards into ``tmp``; returns the manifest's ``files`` and ``tensors``."""
    pause_point("tmp-created")
    files, tensors = {}, {}
    store = trainer._store
    largest = max((math.prod(s.shape) * torch.empty((), dtype=s.dtype).element_size() for group in shards
                   for s in group if isinstance(s.source, StoreSource)), default=1)
    with staging_blocks(trainer._pool, staging_bytes_for(store, largest), 2 * STAGING_BLOCKS) as blocks:
        for index, group in enumerate(shards):
            fname = f"state-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            entries = [Entry(s.name, s.dtype, s.shape, s.source) for s in group]
            result = write_safetensors(os.path.join(tmp, fname), entries, store, blocks,
                                       metadata={"format": "pt", "producer": FORMAT}, io=trainer._io)
            files[fname] = dict(bytes=result["bytes"], crc32c=result["crc32c"])
            for info in result["infos"]:
                tensors[info.name] = dict(file=fname, dtype=DTYPE_TO_ST[info.dtype], shape=list(info.shape),
                                          crc32c=result["tensors"][info.name])
            pause_point("shard-written")
    return files, tensors


def _shard(slots: list[_Slot], max_bytes: int) -> list[list[_Slot]]:
    shards: list[list[_Slot]] = [[]]
    size = 0
    for slot in slots:
        nbytes = math.prod(slot.shape) * torch.empty((), dtype=slot.dtype).element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += nbytes
    return shards


# ---------------------------------------------------------------------------------------------- load
def load_checkpoint(trainer: "Trainer", load_dir: PathLike, *, tag: Optional[str] = None, lr_scheduler: Any = None,
                    load_rng: bool = True, convert_dtype: bool = False) -> tuple[str, dict]:
    """See :meth:`Trainer.load_checkpoint`."""
    path = CheckpointRoot(os.fspath(load_dir)).resolve(tag)
    manifest = read_manifest(path)
    # 1. Every file: a plain name inside the directory, its header agreeing with the manifest.
    parsed = {}
    for fname, info in manifest["files"].items():
        file = inside(path, fname, "file named in the manifest")
        header = read_header(file)
        if header.file_size != info["bytes"]:
            raise CheckpointError(f"{file}: {header.file_size} bytes, the manifest says {info['bytes']!r}")
        unlisted = sorted(n for n in header.tensors if manifest["tensors"].get(n, {}).get("file") != fname)
        if unlisted:
            raise CheckpointError(f"{file}: tensor(s) the manifest does not list in this file: "
                                  f"{', '.join(unlisted[:12])}{' ...' if len(unlisted) > 12 else ''}")
        parsed[fname] = header
    ckpt: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}
    for name, entry in manifest["tensors"].items():
        fname = entry["file"]  # read_manifest checked the manifest lists it
        info = parsed[fname].tensors.get(name)
        if info is None or DTYPE_TO_ST[info.dtype] != entry["dtype"] or list(info.shape) != entry["shape"]:
            raise CheckpointError(f"{parsed[fname].path}: tensor {name!r} in the file does not match the manifest "
                                  f"({entry.get('dtype')}{entry.get('shape')})")
        ckpt[name] = (fname, info.dtype, info.shape)
    # 2. Checkpoint tensors -> this trainer's state; all problems reported at once.
    plan = _match(trainer, ckpt, manifest, convert_dtype, path)
    saved = manifest["trainer"]
    manifest_file = os.path.join(path, MANIFEST)
    groups = saved["param_groups"]
    if len(groups) != len(trainer.optimizer.param_groups):
        raise CheckpointError(f"{path}: {len(groups)} optimizer param group(s) saved, the trainer has "
                              f"{len(trainer.optimizer.param_groups)}")
    # Every value that goes into the trainer is checked before the first tensor is loaded.
    updates = group_updates(manifest_file, groups, trainer.optimizer.param_groups)
    if lr_scheduler is not None and manifest.get("lr_scheduler") is None:
        raise CheckpointError(f"{path}: an lr_scheduler was passed but the checkpoint holds no scheduler state")
    scheduler = check_scheduler_state(manifest_file, manifest["lr_scheduler"], lr_scheduler.state_dict()) \
        if lr_scheduler is not None else None
    rng = parse_rng(manifest["rng"], manifest_file) if load_rng and manifest.get("rng") else None
    for what in ("optimizer", "gradient_accumulation_steps"):
        mine = trainer.config.optimizer.type if what == "optimizer" else trainer.gradient_accumulation_steps
        if manifest.get(what) != mine:
            logger.warning("checkpoint %s was saved with %s=%r, this trainer uses %r", path, what, manifest.get(what), mine)
    # 3. Stream the tensors. From here on a failure leaves the state half-loaded: say so, and refuse to save it.
    trainer._checkpoint_poisoned = (f"loading checkpoint {path} failed part-way; the trainer's state is incomplete "
                                    "- load a good checkpoint before training or saving")
    _, absent_state = plan.pop("")
    store = trainer._store
    largest = max((math.prod(shape) * 4 for _, _, shape in ckpt.values()), default=1)
    with staging_blocks(trainer._pool, staging_bytes_for(store, largest)) as blocks:
        for fname, header in parsed.items():
            targets = {name: target for name, (file, target) in plan.items() if file == fname}
            crcs = {name: manifest["tensors"][name]["crc32c"] for name in header.tensors}
            load_safetensors(header, targets, store, blocks, crcs, manifest["files"][fname]["crc32c"])
    if absent_state:
        resident = trainer._stepper
        for name in set(absent_state):
            resident.optimizer.state.pop(resident.master(name), None)
    trainer._streamer.invalidate()  # staged weights are the old ones
    trainer._grads.begin_window()
    trainer.micro_steps = saved["micro_steps"]
    trainer.global_steps = saved["global_steps"]
    trainer.skipped_steps = saved["skipped_steps"]
    if saved.get("last_grad_norm") is not None:
        trainer.last_grad_norm = float(saved["last_grad_norm"])
    if trainer.scaler is not None and saved.get("loss_scaler") is not None:
        trainer.scaler.load_state_dict(saved["loss_scaler"])
    elif trainer.scaler is not None:
        logger.warning("checkpoint %s has no fp16 loss-scaler state; the scaler keeps its initial scale", path)
    for group, update in zip(trainer.optimizer.param_groups, updates):
        group.update(update)
    if scheduler is not None:
        lr_scheduler.load_state_dict(scheduler)
    elif manifest.get("lr_scheduler") is not None:
        logger.info("checkpoint %s holds LR scheduler state; pass lr_scheduler= to restore it", path)
    if rng is not None:
        _set_rng_state(rng)
    trainer._checkpoint_poisoned = None
    logger.info("checkpoint loaded: %s (step %d)", path, trainer.global_steps)
    return path, manifest.get("client_state") or {}


def _match(trainer: "Trainer", ckpt: dict, manifest: dict, convert: bool, path: str) -> dict:
    """For each checkpoint tensor, (file, [targets]); raises one error listing every problem."""
    saved_cfg = (manifest.get("dtype"), manifest.get("optimizer_state_dtype"))
    mine = (trainer.config.dtype, trainer.config.optimizer_state_dtype)
    if saved_cfg != mine and not convert:
        raise CheckpointError(
            f"checkpoint {path} was saved with dtype={saved_cfg[0]!r}, optimizer_state_dtype={saved_cfg[1]!r}; this "
            f"trainer uses dtype={mine[0]!r}, optimizer_state_dtype={mine[1]!r}. Pass convert_dtype=True to convert "
            "the tensors explicitly (fp32 master weights are used where saved), or load it into a trainer "
            "configured like the one that saved it")
    plan: dict[str, tuple[str, list]] = {}
    missing, shapes, dtypes, names, optional_absent = [], [], [], set(), []
    for slot in _state_slots(trainer):
        source = slot.name
        kind, _, name = slot.name.partition("/")
        names.add(name)
        saved = ckpt.get(source)
        # Mixed <-> fp32 conversion: fp32 masters come from the saved fp32 weights, fp32 weights
        # from the saved masters (the exact values rather than a low-precision copy).
        if convert and kind == "master" and saved is None:
            source, saved = f"param/{name}", ckpt.get(f"param/{name}")
        elif convert and kind == "param" and saved is not None and saved[1] != slot.dtype and f"master/{name}" in ckpt:
            source, saved = f"master/{name}", ckpt[f"master/{name}"]
        if saved is None:
            if slot.optional:
                optional_absent.append(slot)
            else:
                missing.append(slot.name)
            continue
        fname, dtype, shape = saved
        if tuple(shape) != slot.shape:
            shapes.append(f"{slot.name}: checkpoint {list(shape)}, model {list(slot.shape)}")
            continue
        if dtype != slot.dtype:
            dtypes.append(f"{slot.name}: {dtype} -> {slot.dtype}")
            if not convert:
                continue
        plan.setdefault(source, (fname, []))[1].append(slot.target)
    # When converting, a saved weight or master left unused (its sibling was taken) is expected.
    unexpected = sorted(n for n in ckpt if n not in plan and not (
        convert and n.partition("/")[0] in ("param", "master") and n.partition("/")[2] in names))
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: " + ", ".join(missing[:12])
                        + (" ..." if len(missing) > 12 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have: " + ", ".join(unexpected[:12])
                        + (" ..." if len(unexpected) > 12 else ""))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this model: " + " | ".join(problems))
    if dtypes and not convert:
        raise CheckpointError(f"checkpoint {path}: {len(dtypes)} tensor(s) have another dtype than this trainer's "
                              f"(e.g. {dtypes[0]}); pass convert_dtype=True to convert them explicitly")
    if dtypes:
        logger.warning("checkpoint %s: converting %d tensor(s) to this trainer's dtypes (e.g. %s)", path, len(dtypes),
                       dtypes[0])
    for name, (fname, _dtype, _shape) in ckpt.items():
        plan.setdefault(name, (fname, []))  # read only for the file checksum
    # In-memory optimizer state the checkpoint does not have (no step yet when saved): dropped on load.
    plan[""] = ("", [s.name.partition("/")[2] for s in optional_absent])
    return plan
