"""``merge_and_export``: merged weights streamed to safetensors shards, one tensor at a time.

Every tensor of the base model (Hugging Face names: ``q_proj.base_layer.weight`` is
exported as ``q_proj.weight``; adapter parameters are not exported) is read on its own -
frozen streamed weights from the store - merged with its LoRA update
(``W + scaling * B @ A`` in fp32, rounded once to the output dtype) and written straight
into its shard. The safetensors header of a shard needs only names, dtypes and shapes, so
it is written first and the data follows tensor by tensor: peak memory is the largest
tensor (plus its fp32 merge), never the model. Shards and the index follow transformers'
naming (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` plus
``model.safetensors.index.json`` when there are several), and ``config.json`` is written
with them, so ``AutoModelForCausalLM.from_pretrained(directory)`` loads the result.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, Optional, Union

import torch
from torch import nn

from ..checkpoint.atomic import PrivateOutput, json_bytes
from ..checkpoint.format import split_shards
from ..units import parse_bytes
from .adapters import _values, base_model, lora_layers

if TYPE_CHECKING:
    from ..offload.trainer import Trainer

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class _Entry:
    name: str                         # exported (Hugging Face) name
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]  # the merged value, produced when it is written

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def merge_and_export(source: Union["Trainer", nn.Module], directory: Union[str, "os.PathLike[str]"], *,
                     max_shard_size: Union[int, str] = "5GB", dtype: Optional[torch.dtype] = None) -> list[str]:
    """Writes the base model with its LoRA adapters merged to ``directory`` as safetensors shards.

    ``source``: an engine Trainer (weights read from the store one at a time, adapters from the
    fp32 masters) or an in-memory model with LoRA (built-in or peft). ``dtype``: the dtype of
    the exported floating-point tensors (default: each tensor's current dtype - the base's
    ``frozen_dtype``). Returns the paths written (shards, index, config).
    """
    model, value = _values(source)
    limit = parse_bytes(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    if dtype is not None and dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors")
    entries = _entries(model, value, dtype)
    shards = split_shards(entries, limit)
    names = [SINGLE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with PrivateOutput(directory) as out:
        for fname, shard in zip(names, shards):
            with out.open(fname) as f:
                _write_shard(f, shard)
            out.commit(fname)
        if len(shards) > 1:
            index = dict(metadata=dict(total_size=sum(e.nbytes for e in entries)),
                         weight_map={e.name: fname for fname, shard in zip(names, shards) for e in shard})
            out.write(INDEX, json_bytes(index))
        config = getattr(base_model(model), "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            config = copy.deepcopy(config)  # the user's model keeps its own
            floating = [e.dtype for e in entries if e.dtype.is_floating_point]
            if floating:  # what the weights are stored in (e.g. the bf16 base), so loaders keep it
                config.dtype = max(set(floating), key=floating.count)
            out.write("config.json", config.to_json_string(use_diff=True).encode())  # as config.save_pretrained
        return out.written


def _entries(model: nn.Module, value: Callable[[str], torch.Tensor], dtype: Optional[torch.dtype]) -> list[_Entry]:
    """What to export, in the base model's state-dict order, without reading any data."""
    layers = {layer.base_weight: layer for layer in lora_layers(model)}
    adapter_names = {n for layer in layers.values() for n in (layer.lora_A, layer.lora_B)}
    base = base_model(model)
    params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    seen: set[int] = set()
    entries: list[_Entry] = []
    for key, tensor in base.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # tied weights: transformers saves them once
        seen.add(id(tensor))
        full = params.get(id(tensor))
        if full in adapter_names or (full is None and _is_adapter_key(key)):
            continue
        name = key.replace(".base_layer.", ".")
        out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if out_dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {tensor.dtype} cannot be written to safetensors")
        if full is None:  # a buffer
            read = (lambda t=tensor, d=out_dtype: t.detach().to(d))
        elif full in layers:
            read = _merged(layers[full], value, out_dtype)
        else:
            read = (lambda n=full, d=out_dtype: value(n).to(d))
        entries.append(_Entry(name, tuple(tensor.shape), out_dtype, read))
    return entries


def _is_adapter_key(key: str) -> bool:
    return ".lora_" in key


def _merged(layer, value: Callable[[str], torch.Tensor], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        weight = value(layer.base_weight).float()
        a, b = value(layer.lora_A).float(), value(layer.lora_B).float()
        delta = (b @ a) * layer.scaling
        if layer.fan_in_fan_out:
            delta = delta.t()
        return (weight + delta).to(dtype)
    return read



def _write_shard(f: BinaryIO, entries: list[_Entry]) -> None:
    """The safetensors format: 8-byte little-endian header size, JSON header, then the data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = dict(dtype=SAFETENSORS_DTYPES[e.dtype], shape=list(e.shape),
                              data_offsets=[offset, offset + e.nbytes])
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for e in entries:
        t = e.read()
        if tuple(t.shape) != e.shape or t.dtype != e.dtype:
            raise RuntimeError(f"{e.name}: produced {t.dtype}{list(t.shape)}, expected {e.dtype}{list(e.shape)}")
        if t.numel():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
        del t
