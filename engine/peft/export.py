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

import os
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..checkpoint.hf_writer import write_model
from ..checkpoint.private import PrivateOutput
from ..checkpoint.ranks import export_collectively
from ..checkpoint.transfer import Entry
from ..distributed import DistributedSpec
from ..dtypes import TO_SAFETENSORS
from ..units import parse_bytes
from .adapters import Source, base_model, lora_layers, values_of


def merge_and_export(source: Source, directory: Union[str, "os.PathLike[str]"], *,
                     max_shard_size: Union[int, str] = "5GB", dtype: Optional[torch.dtype] = None,
                     ranks: Optional[DistributedSpec] = None) -> list[str]:
    """Writes the base model with its LoRA adapters merged to ``directory`` as safetensors shards.

    ``source``: an engine trainer or runtime (weights read from the store one at a time, adapters
    from the fp32 masters) or an in-memory model with LoRA (built-in or peft). ``dtype``: the dtype
    of the exported floating-point tensors (default: each tensor's current dtype - the base's
    ``frozen_dtype``). Returns the paths written (shards, index, config).

    ``ranks`` (partitioned state, several ranks): COLLECTIVE - every rank calls it; each tensor is
    gathered (``weight``) and merged on every rank, written by rank 0; the others return ``[]``.
    """
    model, value = values_of(source)
    limit = parse_bytes(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    if dtype is not None and dtype not in TO_SAFETENSORS:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors")
    entries = _entries(model, value, dtype)
    config = getattr(base_model(model), "config", None)
    if config is not None and not hasattr(config, "to_json_string"):
        config = None
    floating = [e.dtype for e in entries if e.dtype.is_floating_point]
    # config.json names what the weights are stored in (e.g. the bf16 base), so loaders keep it.
    config_dtype = max(set(floating), key=floating.count) if floating else None

    def write(produced: list[Entry]) -> list[str]:
        with PrivateOutput(directory) as out:
            write_model(out, produced, limit, config=config, config_dtype=config_dtype)
            return out.written
    if ranks is not None and ranks.is_distributed:
        return export_collectively(ranks, entries, write, "merge_and_export")
    return write(entries)


def _entries(model: nn.Module, value: Callable[[str], torch.Tensor], dtype: Optional[torch.dtype]) -> list[Entry]:
    """What to export, in the base model's state-dict order, without reading any data."""
    layers = {layer.base_weight: layer for layer in lora_layers(model)}
    adapter_names = {n for layer in layers.values() for n in (layer.lora_A, layer.lora_B)}
    base = base_model(model)
    params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    seen: set[int] = set()
    entries: list[Entry] = []
    for key, tensor in base.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # tied weights: transformers saves them once
        seen.add(id(tensor))
        full = params.get(id(tensor))
        if full in adapter_names or (full is None and _is_adapter_key(key)):
            continue
        name = key.replace(".base_layer.", ".")
        out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if out_dtype not in TO_SAFETENSORS:
            raise ValueError(f"{key}: dtype {tensor.dtype} cannot be written to safetensors")
        if full is None:  # a buffer
            read = _converted(tensor, out_dtype)
        elif full in layers:
            read = _merged(layers[full], value, out_dtype)
        else:
            read = _stored(value, full, out_dtype)
        entries.append(Entry(name, out_dtype, tuple(tensor.shape), read))
    return entries


def _is_adapter_key(key: str) -> bool:
    return ".lora_" in key


def _converted(tensor: torch.Tensor, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A buffer, cast to ``dtype`` when its turn comes."""
    def read() -> torch.Tensor:
        return tensor.detach().to(dtype)

    return read


def _stored(value: Callable[[str], torch.Tensor], name: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A parameter without LoRA, read (from the store when streamed) and cast when its turn comes."""
    def read() -> torch.Tensor:
        return value(name).to(dtype)

    return read


def _merged(layer, value: Callable[[str], torch.Tensor], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        weight = value(layer.base_weight).float()
        a, b = value(layer.lora_A).float(), value(layer.lora_B).float()
        delta = (b @ a) * layer.scaling
        if layer.fan_in_fan_out:
            delta = delta.t()
        return (weight + delta).to(dtype)
    return read
