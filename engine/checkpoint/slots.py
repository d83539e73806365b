"""The tensors of a training state ("slots"): what a checkpoint saves and where each loads to.

:func:`state_slots` lists every tensor of a runtime's state, parameter by parameter, from its
public surface (the store keys, :class:`~engine.offload.placement.TrainablePlacement`, the
in-DRAM backend's masters and CPUAdamW state); :func:`match_slots` pairs a checkpoint's tensors
with them and reports every problem in one :class:`CheckpointError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch

from .._log import logger
from ..distributed import Partition
from ..dtypes import nbytes
from ..offload.keys import MOMENTS, StoreKey
from ..offload.params import KEY_ATTR, persistent_buffers
from ..offload.placement import TrainablePlacement
from ..storage.store import TensorStore
from .format import CheckpointError
from .transfer import StoreSource, StoreTarget, TensorTarget

if TYPE_CHECKING:
    from ..offload.runtime import OffloadRuntime

# Where each checkpoint tensor goes: name -> (its file, the slot targets it loads into).
Plan = dict[str, tuple[str, list]]


@dataclass
class Slot:
    """One tensor of the training state: how to save it and where it loads to."""

    name: str                       # "param/<name>", "master/<name>", ... (str of its StoreKey)
    dtype: torch.dtype
    shape: tuple[int, ...]          # the FULL shape (also when this rank holds only a part)
    source: Union[StoreSource, torch.Tensor, None]  # None: nothing to save (optimizer state not created yet)
    target: Union[StoreTarget, TensorTarget]
    optional: bool = False          # may be absent from a checkpoint (in-memory moments before the first step)
    range: Optional[tuple[int, int]] = None  # partitioned: the elements [start, stop) this rank's store holds

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """What this rank holds (and writes): the full shape, or its 1-D piece."""
        return self.shape if self.range is None else (self.range[1] - self.range[0],)

    @property
    def nbytes(self) -> int:
        return nbytes(self.stored_shape, self.dtype)


def partition_of(runtime: "OffloadRuntime") -> Optional[Partition]:
    """The runtime's partition, None when its store tensors are whole (one process, or replicated)."""
    return runtime.partition


def _from_store(store: TensorStore, name: str, key: StoreKey, shape: tuple[int, ...], partition: Optional[Partition],
                target=None) -> Slot:
    """A store tensor of full ``shape``; partitioned, the key holds this rank's 1-D piece."""
    meta = store.meta(key)
    if partition is None:
        return Slot(name, meta.dtype, tuple(meta.shape), StoreSource(key), target or StoreTarget(key))
    start, stop = partition.range(math.prod(shape))
    if math.prod(meta.shape) != stop - start:
        raise CheckpointError(f"{name}: the store holds {math.prod(meta.shape)} elements, this rank owns "
                              f"[{start}, {stop}) of the tensor; this is an engine bug, please report it")
    return Slot(name, meta.dtype, tuple(shape), StoreSource(key), target or StoreTarget(key, start),
                range=(start, stop))


def state_slots(runtime: "OffloadRuntime") -> list[Slot]:
    """Every tensor of the runtime's state, in a stable order (parameter by parameter)."""
    store, model = runtime.store, runtime.module
    trainable = {spec.name for spec in runtime.trainable}
    in_memory = runtime.placement is TrainablePlacement.DRAM
    partition = partition_of(runtime)
    slots: list[Slot] = []
    for name, p in model.named_parameters():
        key = getattr(p, KEY_ATTR, None)
        shape = tuple(p.shape)  # a streamed parameter's placeholder has the full shape too
        if key is not None and key in store:
            slots.append(_from_store(store, f"param/{name}", key, shape, partition))
        elif name in runtime.resident_trainables:
            # A resident trainable parameter: the store copy is the truth, the module's follows it
            # (partitioned: the module's copy is whole on every rank, the store holds this rank's part).
            param_key = StoreKey.param(name)

            def accept(t: torch.Tensor, key: StoreKey = param_key, p=p) -> None:
                part = t if partition is None else partition.own_slice(t.reshape(-1))
                store.put(key, part.to(store.meta(key).dtype))
                p.data.copy_(t)

            slots.append(_from_store(store, f"param/{name}", param_key, shape, partition, TensorTarget(accept)))
        elif name in trainable and in_memory and _master_is_param(runtime, name):
            # a copying device: the fp32 host master is the parameter's value (saved and loaded as it)
            m = runtime.backend.master(name)  # type: ignore[attr-defined]
            slots.append(Slot(f"param/{name}", m.dtype, tuple(m.shape), m,
                              TensorTarget(lambda t, m=m, p=p: (m.copy_(t), p.data.copy_(m)))))
        else:
            slots.append(Slot(f"param/{name}", p.dtype, tuple(p.shape), p.detach(),
                              TensorTarget(lambda t, p=p: p.data.copy_(t))))
        if name in trainable and in_memory:
            slots.extend(_in_memory_slots(runtime, name, p))
        elif name in trainable:
            keys = ([StoreKey.master(name)] if runtime.mixed else []) + [StoreKey.moment(m, name) for m in MOMENTS]
            slots.extend(_from_store(store, str(k), k, shape, partition) for k in keys)
    for full, buf in persistent_buffers(model):
        slots.append(Slot(f"buffer/{full}", buf.dtype, tuple(buf.shape), buf.detach(),
                          TensorTarget(lambda t, buf=buf: buf.copy_(t))))
    return slots


def _master_is_param(runtime: "OffloadRuntime", name: str) -> bool:
    stands_for = getattr(runtime.backend, "stands_for_param", None)
    return bool(stands_for is not None and stands_for(name))


def _in_memory_slots(runtime: "OffloadRuntime", name: str, p: torch.nn.Parameter) -> list[Slot]:
    """Master and CPUAdamW state of a trainable parameter kept in DRAM (``TrainablePlacement.DRAM``)."""
    backend = runtime.backend
    master = backend.master(name)
    optimizer = backend.optimizer
    slots = []
    if master is not p.data and not _master_is_param(runtime, name):
        slots.append(Slot(f"master/{name}", master.dtype, tuple(master.shape), master,
                          TensorTarget(lambda t, m=master: m.copy_(t))))
    state = optimizer.state.get(master, {})

    def set_state(key: str, t: torch.Tensor, m=master) -> None:
        entry = optimizer.state[m]  # created here when the loading trainer never stepped
        entry[key] = t.to(optimizer.state_dtype if key != "step" else torch.float32).reshape(
            m.shape if key != "step" else ()).clone()

    for key in MOMENTS:
        slots.append(Slot(f"{key}/{name}", optimizer.state_dtype, tuple(master.shape), state.get(key),
                          TensorTarget(lambda t, key=key: set_state(key, t)), optional=True))
    step = state.get("step")
    slots.append(Slot(f"step/{name}", torch.float32, (), None if step is None else step.reshape(()),
                      TensorTarget(lambda t: set_state("step", t)), optional=True))
    return slots


def drop_absent_state(runtime: "OffloadRuntime", names: list[str]) -> None:
    """Forgets the in-DRAM optimizer state of ``names`` (a checkpoint saved before their first step)."""
    backend = runtime.backend
    for name in set(names):
        backend.optimizer.state.pop(backend.master(name), None)


def match_slots(runtime: "OffloadRuntime", ckpt: dict, manifest: dict, convert: bool, path: str) -> Plan:
    """For each checkpoint tensor, (file, [targets]); raises one error listing every problem."""
    saved_cfg = (manifest.get("dtype"), manifest.get("optimizer_state_dtype"))
    mine = (runtime.config.dtype, runtime.config.optimizer_state_dtype)
    if saved_cfg != mine and not convert:
        raise CheckpointError(
            f"checkpoint {path} was saved with dtype={saved_cfg[0]!r}, optimizer_state_dtype={saved_cfg[1]!r}; this "
            f"trainer uses dtype={mine[0]!r}, optimizer_state_dtype={mine[1]!r}. Pass convert_dtype=True to convert "
            "the tensors explicitly (fp32 master weights are used where saved), or load it into a trainer "
            "configured like the one that saved it")
    plan: Plan = {}
    missing, shapes, dtypes, names, optional_absent = [], [], [], set(), []
    for slot in state_slots(runtime):
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
