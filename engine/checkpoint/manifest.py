"""``manifest.json`` of a training checkpoint: read it, and check every field before anything of
the trainer is touched.

A manifest is input like any other file: a hostile or corrupt one must fail with a
:class:`CheckpointError` naming the file and the field, never with a raw ``KeyError`` after the
tensors were loaded, never by writing what it says into the trainer unchecked (a
``param_groups[0].params`` would replace the optimizer's parameters, a scheduler state with an
``optimizer`` key would replace the scheduler's optimizer: torch's ``load_state_dict`` is a
``__dict__.update``).
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .._log import logger
from .atomic import MANIFEST
from .format import ST_TO_DTYPE, CheckpointError, read_json_file

FORMAT = "memascend-checkpoint"
VERSION = 1              # whole tensors (one process, or replicated ranks)
PARTITIONED_VERSION = 2  # per-rank pieces of the store tensors (see :mod:`.layout`)
VERSIONS = (VERSION, PARTITIONED_VERSION)
MAX_MANIFEST_BYTES = 256 << 20  # ~200 bytes per tensor: a million tensors
MAX_COUNTER = (1 << 63) - 1     # step counters are int64 wherever they go
TOP_KEYS = {"format", "version", "tag", "created_ns", "dtype", "optimizer_state_dtype", "optimizer",
            "gradient_accumulation_steps", "files", "tensors", "trainer", "lr_scheduler", "rng", "client_state",
            "world_size", "partition", "rng_files"}
TRAINER_KEYS = {"micro_steps", "global_steps", "skipped_steps", "last_grad_norm", "loss_scaler", "param_groups",
                "param_group_members"}
COUNTERS = ("micro_steps", "global_steps", "skipped_steps")
# Keys torch LR schedulers add to param groups; a checkpoint may hold them although the loading
# trainer has no scheduler yet.
SCHEDULER_GROUP_KEYS = {"initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum"}
NON_NEGATIVE_GROUP_KEYS = {"lr", "weight_decay", "eps"} | SCHEDULER_GROUP_KEYS


class _Fields:
    """Raises errors that name the manifest file and the field."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: field {field!r} {problem}")

    def integer(self, value: Any, field: str, low: int = 0, high: int = MAX_COUNTER) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(field, f"must be an integer in [{low}, {high}], got {_short(value)}")
        return value

    def number(self, value: Any, field: str, low: float = -math.inf, high: float = math.inf,
               finite: bool = True, below: bool = False) -> float:
        """A JSON number (not a bool) in ``[low, high]`` (``[low, high)`` with ``below``)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        ok = ok and (not finite or math.isfinite(value)) and low <= value and (value < high if below else value <= high)
        if not ok:
            bound = f"[{low}, {high}{')' if below else ']'}" + (", finite" if finite else "")
            raise self.fail(field, f"must be a number in {bound}, got {_short(value)}")
        return float(value)

    def mapping(self, value: Any, field: str, allowed: Optional[set] = None, required: Optional[set] = None) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be a JSON object, got {_short(value)}")
        if allowed is not None and set(value) - allowed:
            raise self.fail(field, f"has unknown key(s) {sorted(set(value) - allowed)}; allowed: {sorted(allowed)}")
        if required is not None and required - set(value):
            raise self.fail(field, f"lacks key(s) {sorted(required - set(value))}")
        return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------- structure
def read_manifest(path: str) -> dict:
    """Reads the manifest of checkpoint directory ``path`` and checks everything that does not
    depend on the trainer (types, ranges, finiteness, allowed keys, per-file CRCs)."""
    file = os.path.join(path, MANIFEST)
    manifest = read_json_file(file, "manifest", MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("version") not in VERSIONS:
        raise CheckpointError(f"{file}: checkpoint format version {_short(manifest.get('version'))}; this engine "
                              f"reads versions {list(VERSIONS)}")
    f = _Fields(file)
    f.mapping(manifest, "(top level)", allowed=TOP_KEYS, required={"files", "tensors", "trainer"})
    for key in ("dtype", "optimizer_state_dtype", "optimizer", "tag"):
        if key in manifest and not isinstance(manifest[key], str):
            raise f.fail(key, f"must be a string, got {_short(manifest[key])}")
    if "gradient_accumulation_steps" in manifest:
        f.integer(manifest["gradient_accumulation_steps"], "gradient_accumulation_steps", low=1)
    if "created_ns" in manifest:
        f.integer(manifest["created_ns"], "created_ns")
    if "world_size" in manifest:
        f.integer(manifest["world_size"], "world_size", low=1)
    partition = manifest.get("partition")
    if partition is not None:
        f.mapping(partition, "partition", allowed={"world_size", "align_elements", "rule"},
                  required={"world_size", "align_elements"})
        f.integer(partition["world_size"], "partition.world_size", low=1, high=1 << 20)
        f.integer(partition["align_elements"], "partition.align_elements", low=1, high=1 << 30)
    if (partition is not None) != (manifest["version"] == PARTITIONED_VERSION):
        raise f.fail("partition", f"must be given exactly in version {PARTITIONED_VERSION} manifests")
    _check_files(f, manifest["files"])
    if "rng_files" in manifest:  # ranks >= 1: rng-rank-<r>.json, sized and checksummed
        for name, info in f.mapping(manifest["rng_files"], "rng_files").items():
            f.mapping(info, f"rng_files.{name}", allowed={"bytes", "crc32c"}, required={"bytes", "crc32c"})
            f.integer(info["bytes"], f"rng_files.{name}.bytes")
            f.integer(info["crc32c"], f"rng_files.{name}.crc32c", high=0xFFFFFFFF)
    _check_tensors(f, manifest["tensors"], manifest["files"], partition is not None)
    _check_trainer(f, manifest["trainer"])
    if manifest.get("lr_scheduler") is not None:
        f.mapping(manifest["lr_scheduler"], "lr_scheduler")
    if manifest.get("rng") is not None:
        parse_rng(manifest["rng"], file, check_cuda=False)  # against this process's devices: when it is loaded
    return manifest


def _check_files(f: _Fields, files: Any) -> None:
    for name, info in f.mapping(files, "files").items():
        field = f"files.{name}"
        f.mapping(info, field, allowed={"bytes", "crc32c", "rank"}, required={"bytes", "crc32c"})
        f.integer(info["bytes"], f"{field}.bytes")
        if "rank" in info:  # the rank that wrote it (partitioned checkpoints)
            f.integer(info["rank"], f"{field}.rank")
        f.integer(info["crc32c"], f"{field}.crc32c", high=0xFFFFFFFF)  # required: whole-file verification


def _check_tensors(f: _Fields, tensors: Any, files: dict, partitioned: bool) -> None:
    """Whole tensors name their ``file``; partitioned ones (``partitioned: true``) their ``shards``,
    one piece ``[start, stop)`` per owning rank (checked against the rule by :mod:`.layout`)."""
    for name, entry in f.mapping(tensors, "tensors").items():
        field = f"tensors.{name}"
        if isinstance(entry, dict) and entry.get("partitioned") is True:
            if not partitioned:
                raise f.fail(f"{field}.partitioned", "is set, but the checkpoint records no partition")
            f.mapping(entry, field, allowed={"dtype", "shape", "partitioned", "shards"},
                      required={"dtype", "shape", "partitioned", "shards"})
            if not isinstance(entry["shards"], list):
                raise f.fail(f"{field}.shards", f"must be a list, got {_short(entry['shards'])}")
            for i, shard in enumerate(entry["shards"]):
                where = f"{field}.shards[{i}]"
                f.mapping(shard, where, allowed={"file", "start", "stop", "crc32c", "rank"},
                          required={"file", "start", "stop", "crc32c", "rank"})
                _listed(f, shard["file"], files, f"{where}.file")
                for key in ("start", "stop", "rank"):
                    f.integer(shard[key], f"{where}.{key}")
                f.integer(shard["crc32c"], f"{where}.crc32c", high=0xFFFFFFFF)
        else:
            f.mapping(entry, field, allowed={"file", "dtype", "shape", "crc32c", "partitioned"},
                      required={"file", "dtype", "shape", "crc32c"})
            if entry.get("partitioned", False) is not False:
                raise f.fail(f"{field}.partitioned", f"must be true or false, got {_short(entry['partitioned'])}")
            _listed(f, entry["file"], files, f"{field}.file")
            f.integer(entry["crc32c"], f"{field}.crc32c", high=0xFFFFFFFF)
        if entry["dtype"] not in ST_TO_DTYPE:
            raise f.fail(f"{field}.dtype", f"must be one of {sorted(ST_TO_DTYPE)}, got {_short(entry['dtype'])}")
        if not isinstance(entry["shape"], list):
            raise f.fail(f"{field}.shape", f"must be a list of integers, got {_short(entry['shape'])}")
        for i, size in enumerate(entry["shape"]):
            f.integer(size, f"{field}.shape[{i}]")


def _listed(f: _Fields, name: Any, files: dict, field: str) -> None:
    if not isinstance(name, str) or name not in files:
        raise f.fail(field, f"names {_short(name)}, which 'files' does not list")


def _check_trainer(f: _Fields, saved: Any) -> None:
    f.mapping(saved, "trainer", allowed=TRAINER_KEYS, required=set(COUNTERS) | {"param_groups"})
    for key in COUNTERS:
        f.integer(saved[key], f"trainer.{key}")
    if saved.get("last_grad_norm") is not None:  # inf: the last step overflowed (fp16) and was skipped
        f.number(saved["last_grad_norm"], "trainer.last_grad_norm", low=0.0, finite=False)
    if saved.get("loss_scaler") is not None:
        check_scaler(f, saved["loss_scaler"])
    groups = saved["param_groups"]
    if not isinstance(groups, list):
        raise f.fail("trainer.param_groups", f"must be a list, got {_short(groups)}")
    members = saved.get("param_group_members")
    if members is not None and (not isinstance(members, list) or len(members) != len(groups) or not all(
            isinstance(m, list) and all(isinstance(n, str) for n in m) for m in members)):
        raise f.fail("trainer.param_group_members", f"must be a list of name lists, one per param group, "
                                                    f"got {_short(members)}")
    for i, group in enumerate(groups):
        field = f"trainer.param_groups[{i}]"
        f.mapping(group, field)
        if "params" in group:
            raise f.fail(f"{field}.params", "is not restored from a checkpoint (the trainer owns its parameters); "
                                            "remove it")


def check_scaler(f: _Fields, state: Any) -> None:
    """The fp16 loss scaler's state (see :class:`~engine.offload.loss_scaler.DynamicLossScaler`)."""
    keys = {"scale", "hysteresis_left", "good_steps", "overflows"}
    f.mapping(state, "trainer.loss_scaler", allowed=keys, required=keys)
    f.number(state["scale"], "trainer.loss_scaler.scale", low=math.ulp(0.0))
    for key in ("hysteresis_left", "good_steps", "overflows"):
        f.integer(state[key], f"trainer.loss_scaler.{key}")


# ---------------------------------------------------------------------------------------------- against the trainer
def group_updates(file: str, saved: list[dict], groups: list[dict]) -> list[dict]:
    """The values to write into the trainer's optimizer ``groups``: every saved key must be one
    the group has (or an LR scheduler's), of the same kind, and lr / weight decay / eps
    non-negative and finite, betas in [0, 1)."""
    f = _Fields(file)
    updates = []
    for i, (values, group) in enumerate(zip(saved, groups)):
        update = {}
        for key, value in values.items():
            field = f"trainer.param_groups[{i}].{key}"
            if key not in group and key not in SCHEDULER_GROUP_KEYS:
                raise f.fail(field, f"is not a key of this trainer's optimizer param groups ({sorted(group)})")
            if key in NON_NEGATIVE_GROUP_KEYS:
                update[key] = f.number(value, field, low=0.0)
            elif key == "betas":
                if not isinstance(value, list) or len(value) != 2:
                    raise f.fail(field, f"must be a list of two numbers, got {_short(value)}")
                update[key] = tuple(f.number(b, f"{field}[{j}]", 0.0, 1.0, below=True) for j, b in enumerate(value))
            else:
                _same_kind(f, value, group[key], field)
                update[key] = tuple(value) if isinstance(group[key], tuple) else value
        updates.append(update)
    return updates


def check_scheduler_state(file: str, saved: Any, current: dict) -> dict:
    """A saved LR scheduler ``state_dict`` against the passed scheduler's own: the same keys (its
    ``load_state_dict`` is a ``__dict__`` update, so any other key would overwrite an attribute),
    values of the same kind."""
    f = _Fields(file)
    f.mapping(saved, "lr_scheduler", allowed=set(current))
    for key, value in saved.items():
        _same_kind(f, value, current[key], f"lr_scheduler.{key}")
    return saved


def _same_kind(f: _Fields, value: Any, current: Any, field: str) -> None:
    """``value`` is the JSON form of something like ``current`` (None in ``current``: anything)."""
    if current is None:
        return
    if isinstance(current, bool) or isinstance(value, bool):
        ok = isinstance(current, bool) and isinstance(value, bool)
    elif isinstance(current, int):  # a counter (last_epoch, _step_count): 1.5 would break it later
        ok = isinstance(value, int)
    elif isinstance(current, float):
        # Finite, unless the current value is not either (ReduceLROnPlateau's ``best`` starts at inf).
        ok = isinstance(value, (int, float)) and not math.isnan(value) and \
            (math.isfinite(value) or not math.isfinite(current))
    elif isinstance(current, str):
        ok = isinstance(value, str)
    elif isinstance(current, (list, tuple)):
        ok = isinstance(value, list) and len(value) == len(current)
        if ok:
            for i, (v, c) in enumerate(zip(value, current)):
                _same_kind(f, v, c, f"{field}[{i}]")
    elif isinstance(current, dict):
        ok = isinstance(value, dict)
    else:  # a tensor or another object: JSON cannot hold it
        ok = False
    if not ok:
        raise f.fail(field, f"must be like {_short(current)} ({type(current).__name__}), got {_short(value)}")


# ---------------------------------------------------------------------------------------------- RNG
@dataclass
class RngState:
    """RNG states parsed and checked, ready to be set without failing half-way."""

    torch: torch.Tensor
    python: tuple
    numpy: tuple
    cuda: Optional[list[torch.Tensor]]


def parse_rng(state: Any, file: str, check_cuda: bool = True) -> RngState:
    """The saved RNG states, checked so that setting them cannot fail. ``check_cuda``: also against
    this process's CUDA devices (which initializes CUDA; off for a structural check of a manifest)."""
    f = _Fields(file)
    f.mapping(state, "rng", allowed={"torch", "python", "numpy", "cuda"}, required={"torch", "python", "numpy"})
    cpu = _hex_bytes(f, state["torch"], "rng.torch")
    if cpu.numel() != torch.get_rng_state().numel():
        raise f.fail("rng.torch", f"holds {cpu.numel()} bytes, torch's CPU generator state has "
                                  f"{torch.get_rng_state().numel()}")
    try:
        version, internal, gauss = state["python"]
        python = (version, tuple(internal), gauss)
        # setstate keeps any object as the cached gauss value (random.gauss() would return it)
        if gauss is not None and not (isinstance(gauss, float) and math.isfinite(gauss)):
            raise ValueError(f"the cached gauss value must be null or a finite number, got {_short(gauss)}")
        random.Random().setstate(python)  # validates the rest on a scratch generator
    except (TypeError, ValueError, OverflowError) as exc:
        raise f.fail("rng.python", f"is not a Python random state ({exc})") from None
    numpy = _numpy_state(f, state["numpy"])
    cuda = None
    if state.get("cuda") is not None:
        if not isinstance(state["cuda"], list):
            raise f.fail("rng.cuda", f"must be a list of hex strings, got {_short(state['cuda'])}")
        cuda = [_hex_bytes(f, h, f"rng.cuda[{i}]") for i, h in enumerate(state["cuda"])]
        if check_cuda:
            cuda = _usable_cuda_states(f, cuda)
    return RngState(cpu, python, numpy, cuda)


def _numpy_state(f: _Fields, saved: Any) -> tuple:
    """numpy's legacy MT19937 state, every field checked: ``set_state`` accepts a position outside
    the key array (a later draw reads out of bounds: garbage, or a segfault) and float keys (truncated)."""
    if not isinstance(saved, list) or len(saved) != 5 or saved[0] != "MT19937":
        raise f.fail("rng.numpy", f"must be ['MT19937', 624 keys, pos, has_gauss, cached], got {_short(saved)}")
    _, keys, pos, has_gauss, cached = saved
    if not isinstance(keys, list) or len(keys) != 624:
        raise f.fail("rng.numpy[1]", f"must be a list of 624 integers, got {_short(keys)}")
    for i, key in enumerate(keys):
        f.integer(key, f"rng.numpy[1][{i}]", high=0xFFFFFFFF)
    state = ("MT19937", np.array(keys, dtype=np.uint32), f.integer(pos, "rng.numpy[2]", high=624),
             f.integer(has_gauss, "rng.numpy[3]", high=1), f.number(cached, "rng.numpy[4]"))
    try:
        np.random.RandomState().set_state(state)  # on a scratch generator: anything else it refuses, here
    except (TypeError, ValueError, OverflowError) as exc:
        raise f.fail("rng.numpy", f"is not a numpy random state ({exc})") from None
    return state


def _usable_cuda_states(f: _Fields, states: list[torch.Tensor]) -> Optional[list[torch.Tensor]]:
    """The CUDA generator states to set (None: not restored, said once), each checked against its
    device's state size now, so setting them cannot fail after the trainer was written."""
    if not torch.cuda.is_available():
        return None
    if len(states) != torch.cuda.device_count():
        logger.warning("checkpoint: CUDA RNG states for %d devices, %d present; not restored", len(states),
                       torch.cuda.device_count())
        return None
    for i, saved in enumerate(states):
        size = torch.cuda.get_rng_state(i).numel()
        if saved.numel() != size:
            raise f.fail(f"rng.cuda[{i}]", f"holds {saved.numel()} bytes, CUDA device {i}'s generator state has {size}")
    return states


def _hex_bytes(f: _Fields, value: Any, field: str) -> torch.Tensor:
    try:
        return torch.frombuffer(bytearray.fromhex(value), dtype=torch.uint8).clone()
    except (TypeError, ValueError):
        raise f.fail(field, "must be a string of hex digits") from None
