"""Hugging Face safetensors checkpoints in and out, never holding the model in DRAM.

:func:`load_pretrained` builds the model on the meta device from its ``config.json`` and an
initializer that reads each tensor of the (sharded) safetensors checkpoint on its own;
``engine.from_pretrained`` hands both to the trainer, which streams them straight into the
TensorStore - peak DRAM is about the largest tensor (a few copies of it while it is cast)
plus the pinned pool, whatever the model size. Files are read with ``pread`` (see
:mod:`engine.checkpoint.format` for why not ``mmap``); ``pytorch_model.bin`` pickles are refused.

:func:`save_pretrained` writes ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json``), ``config.json`` and ``generation_config.json`` through
:mod:`.hf_writer`, copying store -> pool -> file one segment at a time. Tied weights are
written once, under the name Hugging Face keeps (the one not listed in ``_tied_weights_keys``).
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch import nn

from .._log import logger
from ..config import Config
from ..offload.keys import StoreKey
from ..offload.materialize import Initializer
from ..offload.params import KEY_ATTR, is_placeholder, persistent_buffers
from ..offload.placement import TrainablePlacement
from ..storage.staging import STAGING_BLOCKS, staging_blocks
from ..units import parse_bytes
from .format import (
    MAX_HEADER_BYTES,
    CheckpointError,
    SafetensorsFile,
    open_regular,
    read_header,
    read_json_file,
    read_tensor,
)
from .hf_writer import SAFE_INDEX, SAFE_WEIGHTS, write_model
from .private import PrivateOutput
from .ranks import export_collectively
from .slots import partition_of
from .transfer import Entry, StoreSource, staging_bytes_for

if TYPE_CHECKING:
    from ..offload.runtime import OffloadRuntime

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------- import
def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: a file, or a directory with ``model.safetensors``
    or ``model.safetensors.index.json``."""
    # lexists, not isfile: a FIFO or device is named and refused when opened (open_regular), not skipped.
    if not os.path.isdir(path):
        if not os.path.lexists(path):
            raise CheckpointError(f"{path}: no such file or directory")
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: not a .safetensors file")
        return [path]
    index = os.path.join(path, SAFE_INDEX)
    if os.path.lexists(index):
        body = read_json_file(index, "index", MAX_HEADER_BYTES)
        weight_map = body.get("weight_map") if isinstance(body, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
            raise CheckpointError(f"{index}: malformed index ('weight_map' must map tensor names to file names)")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or os.path.basename(name) != name or name in (".", ".."):
                raise CheckpointError(f"{index}: refusing shard {name!r}: not a plain file name in {path}")
            full = os.path.join(path, name)
            if os.path.dirname(os.path.realpath(full)) != os.path.realpath(path):
                raise CheckpointError(f"{index}: refusing shard {name!r}: it resolves outside {path}")
            files.append(full)
        return files
    single = os.path.join(path, SAFE_WEIGHTS)
    if os.path.lexists(single):
        return [single]
    pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
    hint = f" ({', '.join(pickles)} are pickle files, which this engine does not load: convert them to safetensors)" \
        if pickles else ""
    raise CheckpointError(f"{path}: no {SAFE_WEIGHTS} or {SAFE_INDEX}{hint}")


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Every parameter's names (tied parameters have several), in registration order."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return list(groups.values())


class PretrainedSource:
    """A meta-device model and the initializer that fills it from a Hugging Face checkpoint.

    ``model``: built on the meta device (after ``prepare``); ``config``: the engine
    :class:`~engine.config.Config`; ``initializer(name, shape)``: one parameter or buffer read
    from its file (None: a buffer the model computes itself), also the buffer initializer;
    ``path``: the checkpoint. A context manager: leaving it closes the files' descriptors."""

    def __init__(self, model: nn.Module, config: Config, initializer: Initializer, path: str, fds: dict[str, int]):
        self.model, self.config, self.initializer, self.path = model, config, initializer, path
        self._fds = fds

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "PretrainedSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _candidates(names: list[str], prefix: str) -> list[str]:
    """Checkpoint names a parameter (all its tied names) may have."""
    # A LoRA layer (engine.peft or peft) keeps the original Linear as ``base_layer``.
    names = list(names) + [n.replace(".base_layer.", ".") for n in names if ".base_layer." in n]
    candidates = list(names)
    if prefix:
        # As transformers does, a checkpoint of the bare base model (no "model." prefix) or of a
        # model with a head (prefixed) fits the other kind too.
        candidates += [n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")]
        candidates += [f"{prefix}.{n}" for n in names if not n.startswith(prefix + ".")]
    return candidates


def load_pretrained(path: PathLike, config: Any = None, *, hf_config: Any = None, model_class: Any = None,
                    trust_remote_code: bool = False,
                    prepare: Optional[Callable[[nn.Module], Any]] = None) -> PretrainedSource:
    """The meta model and safetensors initializer of :func:`engine.from_pretrained`; every check
    (files, names, shapes) is done before anything is written. ``prepare(model)`` changes the
    meta model before names are matched (e.g. ``engine.peft.apply_lora``: its ``base_layer``
    names are matched to the checkpoint's); parameters it creates with values (adapters on the
    CPU) need no checkpoint tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    files = checkpoint_files(path)
    if hf_config is None:
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        config_file = os.path.join(directory, "config.json")
        if os.path.lexists(config_file):  # transformers would block forever opening a FIFO
            os.close(open_regular(config_file, "model config"))
        hf_config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    builder = model_class or AutoModelForCausalLM
    with torch.device("meta"):
        model = builder.from_config(hf_config, trust_remote_code=trust_remote_code) if hasattr(builder, "from_config") \
            else builder(hf_config)
    if prepare is not None:
        prepare(model)

    # Where each tensor is; then every problem at once, before anything is written.
    where: dict[str, SafetensorsFile] = {}
    for file in files:
        parsed = read_header(file)
        for name in parsed.tensors:
            if name in where:
                raise CheckpointError(f"tensor {name!r} is in both {where[name].path} and {file}")
            where[name] = parsed
    source: dict[str, str] = {}  # model name -> checkpoint name
    missing, shapes = [], []
    prefix = getattr(model, "base_model_prefix", "") or ""
    for names in _alias_groups(model):
        param = model.get_parameter(names[0])
        found = next((n for n in _candidates(names, prefix) if n in where), None)
        if found is None:
            if param.device.type == "meta":  # only a parameter without values must come from the file
                missing.append(names[0])
            continue
        shape = tuple(param.shape)
        got = where[found].tensors[found].shape
        if got != shape:
            shapes.append(f"{found}: checkpoint {list(got)}, model {list(shape)}")
        for n in names:
            source[n] = found
    buffers = {name for name, _ in model.named_buffers()}
    for name in buffers & set(where):
        source[name] = name
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes))
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing: " + ", ".join(missing[:12]) +
                        (" ..." if len(missing) > 12 else ""))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match {type(model).__name__}: " + " | ".join(problems))
    unused = sorted(set(where) - set(source.values()))
    if unused:
        logger.warning("from_pretrained: %d checkpoint tensor(s) the model does not use: %s", len(unused),
                       ", ".join(unused[:12]))

    fds: dict[str, int] = {}
    engine_config = Config.load(config if config is not None else Config())
    # bf16/fp16 training keeps an fp32 master of each trainable weight: those are read as fp32
    # directly (converted chunk by chunk), one full-size copy fewer at the peak.
    as_fp32 = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad} \
        if engine_config.dtype != "fp32" else set()

    def initializer(name: str, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
        found = source.get(name)
        if found is None:
            return None  # a buffer the model computes itself (rotary inv_freq)
        parsed = where[found]
        if parsed.path not in fds:
            fds[parsed.path] = open_regular(parsed.path)
        # One tensor at a time, cast by the trainer to the configured dtype.
        floating = parsed.tensors[found].dtype.is_floating_point
        return read_tensor(parsed, found, fds[parsed.path],
                           dtype=torch.float32 if name in as_fp32 and floating else None)

    return PretrainedSource(model, engine_config, initializer, path, fds)


# ---------------------------------------------------------------------------------------------- export
def _kept_name(model: nn.Module, names: list[str]) -> str:
    """The name Hugging Face keeps for a tied group: one not declared as a tied copy."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    patterns = list(tied.keys()) if isinstance(tied, dict) else list(tied)
    for name in names:
        if not any(re.search(p, name) for p in patterns):
            return name
    return names[0]


def export_entries(runtime: "OffloadRuntime", dtype: Optional[torch.dtype] = None, gather: bool = False) -> list[Entry]:
    """The model's weights (and persistent buffers) as Hugging Face names them, each from where it
    lives now: the store, the runtime's in-memory masters, or the module. ``gather`` (partitioned
    state): a store tensor is read whole when its turn comes, through ``runtime.parameter`` /
    ``runtime.weight`` (a gather, collective: see :func:`~.ranks.export_collectively`)."""
    model, store = runtime.module, runtime.store
    trainable = {spec.name for spec in runtime.trainable}
    in_memory = runtime.placement is TrainablePlacement.DRAM
    entries = []
    for names in _alias_groups(model):
        canonical = names[0]
        p = model.get_parameter(canonical)
        want = dtype or p.dtype
        key = getattr(p, KEY_ATTR, None)
        source: Any
        if want == torch.float32 and runtime.mixed and canonical in trainable:  # the fp32 master
            source = runtime.backend.master(canonical) if in_memory else StoreSource(StoreKey.master(canonical))
        elif key is not None and key in store and is_placeholder(p.data):
            source = StoreSource(key)
        elif canonical in runtime.resident_trainables:
            source = StoreSource(StoreKey.param(canonical))  # the store copy is the truth
        else:
            source = p.detach()
        if gather and isinstance(source, StoreSource):
            source = _gathered(runtime, canonical, master=source.key == StoreKey.master(canonical), dtype=want)
        entries.append(Entry(_kept_name(model, names), want, tuple(p.shape), source))
    for full, buf in persistent_buffers(model):
        entries.append(Entry(full, buf.dtype if not buf.is_floating_point() else (dtype or buf.dtype),
                             tuple(buf.shape), buf.detach()))
    return entries


def _gathered(runtime: "OffloadRuntime", name: str, master: bool, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """The whole value of parameter ``name`` when its turn comes (the fp32 master, or its weight)."""
    def read() -> torch.Tensor:
        value = runtime.parameter(name) if master else runtime.weight(name)
        return value.detach().to("cpu", dtype).contiguous()
    return read


def save_pretrained(runtime: "OffloadRuntime", save_dir: PathLike, *, max_shard_size: Union[int, str] = "5GB",
                    dtype: Optional[torch.dtype] = None) -> list[str]:
    """See :meth:`Trainer.save_pretrained`. Partitioned state (``runtime.partition``): COLLECTIVE,
    every rank calls it; each tensor is gathered and written by rank 0, one at a time; the other
    ranks return ``[]``."""
    save_dir = os.fspath(save_dir)
    limit = parse_bytes(max_shard_size)
    if partition_of(runtime) is not None:
        entries = export_entries(runtime, dtype, gather=True)

        def write(gathered: list[Entry]) -> list[str]:
            return _write_pretrained(runtime, save_dir, limit, gathered, dtype)
        return export_collectively(runtime.distributed, entries, write, "save_pretrained")
    return _write_pretrained(runtime, save_dir, limit, export_entries(runtime, dtype), dtype)


def _write_pretrained(runtime: "OffloadRuntime", save_dir: str, limit: int, entries: list[Entry],
                      dtype: Optional[torch.dtype]) -> list[str]:
    store, module = runtime.store, runtime.module
    largest = max((e.nbytes for e in entries if isinstance(e.source, StoreSource)), default=1)
    config = getattr(module, "config", None)
    generation = getattr(module, "generation_config", None)
    if not getattr(module, "can_generate", lambda: False)():
        generation = None
    # Each file is written in a private temporary directory, fsync'ed and renamed; the index comes last.
    with PrivateOutput(save_dir) as out:
        with staging_blocks(runtime.pool, staging_bytes_for(store, 4 * largest), 2 * STAGING_BLOCKS) as blocks:
            count = write_model(out, entries, limit, config=config, config_dtype=dtype or runtime.compute_dtype,
                                generation_config=generation, store=store, blocks=blocks, io=runtime.io)
    logger.info("save_pretrained: %d tensors in %d file(s) in %s", len(entries), count, save_dir)
    return out.written
