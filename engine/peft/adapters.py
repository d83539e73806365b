"""Finding LoRA layers (built-in or Hugging Face peft) and saving adapters in peft's format.

A saved adapter is the directory ``PeftModel.from_pretrained(base_model, directory)``
loads: ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``)
and ``adapter_config.json``. For a model wrapped with ``peft.get_peft_model`` peft's own
``save_pretrained`` writes both, given the trained values; for the built-in LoRA this
module writes them (through the engine's one safetensors writer). Values come from the
trainer or runtime (anything with ``.module``, ``.parameter(name)`` and ``.weight(name)``: a
:class:`WeightSource`): the fp32 master weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from ..checkpoint.private import PrivateOutput, json_bytes
from ..checkpoint.ranks import on_main
from ..checkpoint.transfer import Entry, write_safetensors
from ..distributed import DistributedSpec
from .lora import LoraConfig, LoraLinear

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@runtime_checkable
class WeightSource(Protocol):
    """A trainer or an offload runtime, structurally: its model and its parameters' current values."""

    module: nn.Module

    def parameter(self, name: str) -> torch.Tensor:
        """A trainable parameter's value (the fp32 master in mixed precision)."""

    def weight(self, name: str) -> torch.Tensor:
        """Any parameter's value, read on its own (frozen streamed weights from the store)."""


Source = Union[WeightSource, nn.Module]


@dataclass(frozen=True)
class AdapterLayer:
    """One LoRA-adapted linear layer; parameter names are relative to the model given."""

    module: str          # the LoRA module's name in the model
    path: str            # its name in the base model (peft's key naming)
    base_weight: str     # the frozen weight
    base_bias: Optional[str]
    lora_A: str
    lora_B: str
    scaling: float
    fan_in_fan_out: bool  # base weight stored (in, out) - GPT-2's Conv1D


def is_peft_model(model: nn.Module) -> bool:
    """True for a model wrapped by Hugging Face ``peft.get_peft_model``."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def base_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model: ``get_base_model()`` of a peft model, else ``model``."""
    return model.get_base_model() if is_peft_model(model) else model


def lora_layers(model: nn.Module) -> list[AdapterLayer]:
    """Every LoRA layer of ``model`` (built-in :class:`LoraLinear` or peft's ``LoraLayer``), in order.

    Raises NotImplementedError for peft variants this engine cannot merge (DoRA, several
    active adapters) and ValueError when the model has no LoRA layer.
    """
    peft_wrapped = is_peft_model(model)
    out: list[AdapterLayer] = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            path = name[len(PEFT_PREFIX):] if peft_wrapped and name.startswith(PEFT_PREFIX) else name
            out.append(AdapterLayer(name, path, f"{name}.base_layer.weight",
                                    f"{name}.base_layer.bias" if module.base_layer.bias is not None else None,
                                    f"{name}.lora_A.weight", f"{name}.lora_B.weight", module.scaling, False))
        elif peft_wrapped:
            layer = _peft_lora_layer(name, module)
            if layer is not None:
                out.append(layer)
    if not out:
        raise ValueError(f"{type(model).__name__} has no LoRA layers "
                         "(use engine.peft.apply_lora or peft.get_peft_model)")
    return out


def _peft_lora_layer(name: str, module: nn.Module) -> Optional[AdapterLayer]:
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        raise NotImplementedError(f"{name}: exactly one active LoRA adapter is supported, found {active}")
    adapter = active[0]
    if getattr(module, "use_dora", {}).get(adapter, False):
        raise NotImplementedError(f"{name}: DoRA adapters are not supported")
    base = module.get_base_layer()
    if not hasattr(base, "weight") or base.weight.dim() != 2:
        raise NotImplementedError(f"{name}: LoRA on {type(base).__name__} is not supported (linear layers only)")
    path = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
    base_name = next(n for n, m in module.named_modules() if m is base)
    prefix = f"{name}.{base_name}" if base_name else name
    return AdapterLayer(name, path, f"{prefix}.weight",
                        f"{prefix}.bias" if getattr(base, "bias", None) is not None else None,
                        f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight",
                        float(module.scaling[adapter]), bool(getattr(module, "fan_in_fan_out", False)))


def values_of(source: Source) -> tuple[nn.Module, Callable[[str], torch.Tensor]]:
    """The model and a reader of a parameter's current value (trainer/runtime: fp32 masters / the store)."""
    if not isinstance(source, nn.Module) and isinstance(source, WeightSource):
        return source.module, source.weight
    if isinstance(source, nn.Module):
        params = dict(source.named_parameters(remove_duplicate=False))
        return source, lambda name: params[name].detach()
    raise TypeError(f"expected an engine Trainer or an nn.Module, got {type(source).__name__}")


def save_adapter(source: Source, directory: Union[str, "os.PathLike[str]"], *,
                 base_model_name_or_path: Optional[str] = None, ranks: Optional[DistributedSpec] = None) -> list[str]:
    """Saves the LoRA adapters of a trainer (or an in-memory model) in peft's format.

    ``PeftModel.from_pretrained(base, directory)`` loads the result. A peft-wrapped model is
    saved by peft itself (with the trainer's values); a built-in LoRA model as peft would save
    it. Files are written privately (see :class:`PrivateOutput`). Returns the paths written.

    ``ranks`` (partitioned state, several ranks): COLLECTIVE - every rank calls it and reads the
    adapters' values (``weight`` gathers); rank 0 writes them, the others return ``[]``.
    """
    model, value = values_of(source)
    # The adapters' values first (small; with several ranks every rank reads them in the same order).
    if is_peft_model(model):
        seen, state = set(), {}
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                state[name] = value(name).detach().contiguous()
        values: dict[str, torch.Tensor] = state
    else:
        values = _builtin_values(model, value)

    def write() -> list[str]:
        with PrivateOutput(directory) as out:
            if is_peft_model(model):
                model.save_pretrained(out.tmp, state_dict=values)  # it writes with the umask: fixed by commit
                return out.commit_all()
            _save_builtin(model, values, out, base_model_name_or_path)
            return out.written
    if ranks is None or not ranks.is_distributed:
        return write()
    files = on_main(ranks, "save_adapter", write)
    return files if ranks.is_main else []


def _builtin_values(model: nn.Module, value: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The built-in LoRA adapters' values under peft's key names."""
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig):
        raise ValueError("the model has no built-in LoRA config: apply adapters with engine.peft.apply_lora "
                         "(or wrap it with peft.get_peft_model)")
    values = {}
    for layer in lora_layers(model):
        for which, name in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            values[f"{PEFT_PREFIX}{layer.path}.{which}.weight"] = value(name).detach().contiguous()
    return values


def _save_builtin(model: nn.Module, values: dict[str, torch.Tensor], out: "PrivateOutput",
                  base_model_name_or_path: Optional[str]) -> None:
    config = model.lora_config
    entries = [Entry(key, t.dtype, tuple(t.shape), t) for key, t in values.items()]
    write_safetensors(out.path(ADAPTER_WEIGHTS), entries, None, [], metadata={"format": "pt"}, dir_fd=out.tmp_fd)
    out.commit(ADAPTER_WEIGHTS)
    hf_config = getattr(model, "config", None)
    name = base_model_name_or_path or getattr(hf_config, "_name_or_path", None) or None
    causal = type(model).__name__.endswith("ForCausalLM")
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM" if causal else None, base_model_name_or_path=name,
               r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
               target_modules=config.target_modules, use_rslora=config.use_rslora, bias="none",
               fan_in_fan_out=False, init_lora_weights=True, inference_mode=True, modules_to_save=None,
               use_dora=False, layers_to_transform=None, revision=None)
    out.write(ADAPTER_CONFIG, json_bytes(cfg))
