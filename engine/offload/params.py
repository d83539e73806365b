"""Which parameters are streamed, which modules use them, and their placeholders.

A parameter is *streamed* when it holds more than ``resident_threshold_bytes``;
smaller ones (norms, biases) stay resident. A *unit* is a module that owns
streamed parameters directly (``recurse=False``): the streamer hooks units, and
a unit's forward is the moment its weights must be real. Tied parameters (one
``nn.Parameter`` registered under several names, e.g. ``embed_tokens.weight`` /
``lm_head.weight``) are one streamed tensor with one store key, named by the
first name ``named_modules`` reaches; every module owning it is a unit.

While a parameter is streamed, its ``.data`` is a *placeholder*: a zero-stride
expansion of a single element (NaN for floating dtypes) with the parameter's
shape, dtype and device, so ``param.shape``, ``param.dtype``, ``model.device``,
tied-weight checks and the like keep working while the parameter holds no
memory. Computing with a placeholder outside the streamer's hooks gives NaN, and
writing to it raises (its elements all share one memory location).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Optional

import torch
from torch import nn

from ..memory.pool import IO_ALIGNMENT

DEFAULT_RESIDENT_THRESHOLD = 1 << 20
"""Default ``resident_threshold_bytes``: parameters of at most 1 MiB stay resident."""

KEY_ATTR = "_offload_key"
"""Attribute set on a streamed ``nn.Parameter``: its TensorStore key."""

_PLACEHOLDER_BASES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def round_up(n: int, alignment: int = IO_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def param_key(name: str) -> tuple[str, str]:
    """The TensorStore key of the parameter named ``name``."""
    return ("param", name)


def placeholder(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` on ``device`` that holds one element (all strides 0)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    base = _PLACEHOLDER_BASES.get((dtype, device))
    if base is None:
        fill = float("nan") if (dtype.is_floating_point or dtype.is_complex) else 0
        base = torch.full((), fill, dtype=dtype, device=device)
        _PLACEHOLDER_BASES[(dtype, device)] = base
    return base.expand(tuple(shape))


def is_placeholder(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` (or a parameter's data) is a streamer placeholder holding no real data."""
    if tensor.device.type == "meta" or tensor.numel() <= 1:
        return False
    return all(s == 0 for s in tensor.stride()) and tensor.untyped_storage().nbytes() <= tensor.element_size()


@dataclass(eq=False)
class StreamedParam:
    """One streamed parameter (tied aliases share one)."""

    name: str
    key: Hashable
    param: nn.Parameter
    shape: tuple[int, ...]
    dtype: torch.dtype
    aliases: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def slot_nbytes(self) -> int:
        """Staging-buffer bytes: the size rounded up to the I/O alignment (as ``TensorStore.buffer_nbytes``)."""
        return round_up(self.nbytes)


@dataclass(eq=False)
class Unit:
    """A module owning streamed parameters directly."""

    index: int
    name: str
    module: nn.Module
    params: list[tuple[str, StreamedParam]]

    @property
    def keys(self) -> tuple[Hashable, ...]:
        return tuple(dict.fromkeys(sp.key for _, sp in self.params))


@dataclass(eq=False)
class ModelParams:
    """The streamed/resident split of a model's parameters, in registration order."""

    streamed: dict[Hashable, StreamedParam]
    units: list[Unit]
    resident: list[tuple[str, nn.Parameter]]
    owners: dict[int, list[tuple[nn.Module, str]]]  # id(param) -> every (module, attribute) holding it

    @property
    def streamed_bytes(self) -> int:
        return sum(sp.nbytes for sp in self.streamed.values())

    @property
    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.resident)


def discover(model: nn.Module, resident_threshold_bytes: int, *, resident_trainable: bool = False,
             dtype_of: Optional[Callable[[nn.Parameter], torch.dtype]] = None) -> ModelParams:
    """Splits ``model``'s parameters into streamed and resident ones and finds the units.

    Works on models built on the meta device (only shapes and dtypes are read).
    ``resident_trainable``: parameters with ``requires_grad`` stay resident whatever their size
    (their optimizer state is in memory too). ``dtype_of(param)``: the dtype the parameter will
    have when streamed (the planner sizes a model before it is cast); default its own.
    """
    if resident_threshold_bytes < 0:
        raise ValueError(f"resident_threshold_bytes must be >= 0, got {resident_threshold_bytes}")
    streamed: dict[Hashable, StreamedParam] = {}
    by_id: dict[int, Optional[StreamedParam]] = {}
    resident: list[tuple[str, nn.Parameter]] = []
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    units: list[Unit] = []
    for mod_name, module in model.named_modules():
        unit_params: list[tuple[str, StreamedParam]] = []
        for attr, param in module._parameters.items():
            if param is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            owners.setdefault(id(param), []).append((module, attr))
            if id(param) in by_id:
                sp = by_id[id(param)]
                if sp is not None:
                    sp.aliases.append(full)
                    unit_params.append((attr, sp))
                continue
            dtype = dtype_of(param) if dtype_of is not None else param.dtype
            nbytes = param.numel() * torch.empty((), dtype=dtype).element_size()
            if nbytes > resident_threshold_bytes and param.numel() > 1 and not (resident_trainable and param.requires_grad):
                existing = getattr(param, KEY_ATTR, None)
                key = existing if existing is not None else param_key(full)
                sp = StreamedParam(full, key, param, tuple(param.shape), dtype, [full])
                streamed[key] = sp
                by_id[id(param)] = sp
                unit_params.append((attr, sp))
            else:
                by_id[id(param)] = None
                resident.append((full, param))
        if unit_params:
            units.append(Unit(len(units), mod_name, module, unit_params))
    return ModelParams(streamed, units, resident, owners)


def replace_parameter(owners: list[tuple[nn.Module, str]], old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """Registers a new ``nn.Parameter`` holding ``data`` everywhere ``old`` was (keeps ties and attributes).

    Needed where ``old.data = data`` is refused (a meta parameter cannot take CPU/CUDA data).
    """
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    for name, value in vars(old).items():
        setattr(new, name, value)
    for module, attr in owners:
        if module._parameters.get(attr) is old:
            module._parameters[attr] = new
    return new


def persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(qualified name, buffer)`` of each persistent buffer once (what ``state_dict`` saves)."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, buf in module._buffers.items():
            if buf is None or attr in module._non_persistent_buffers_set or id(buf) in seen:
                continue
            seen.add(id(buf))
            yield (f"{module_name}.{attr}" if module_name else attr), buf
