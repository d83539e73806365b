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
memory. Writing to it raises: an in-place op or ``out=`` on a streamed parameter
(``mul_``, ``copy_``, ``w[0] = 1``, ``nn.init.*``, ``load_state_dict``) is refused with a
:class:`~engine.errors.StreamingError` naming it, because the write would land in a
temporary staging copy and the store (the weight's only home) would never see it. The
engine itself writes through the store or ``.data`` assignment, never through the placeholder.

A streamed parameter whose data is a placeholder has the class
:class:`StreamedParameter` (an ``nn.Parameter`` subclass); while its data is real
(inside its unit's forward) it is a plain ``nn.Parameter`` again, so the hot path
pays nothing. Any op that would compute with the placeholder - a parent module's
``F.linear(x, self.child.weight)``, Mamba's mixer passing ``conv1d.weight`` to a
function, user code between steps - reaches ``StreamedParameter.__torch_function__``,
which asks the owning streamer to fetch the weight first (fetch on access). Metadata
(shape, dtype, device, grad, ...) never needs the data and passes straight through.
Outside a forward, ``.data``, ``.detach()`` and ``.to()`` (what ``nn.Module.to`` and
``state_dict`` use) answer with the placeholder itself, which holds NaN: read a weight's
value with ``trainer.parameter(name)``. Once the streamer is detached without restoring the
weights (``trainer.close()``), everything else raises :class:`~engine.errors.StreamerDetachedError`
(a :class:`~engine.errors.TrainerClosedError`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Optional

import torch
from torch import nn

from .. import dtypes
from ..distributed import Partition
from ..errors import StreamerDetachedError, StreamingError
from ..memory.pool import IO_ALIGNMENT
from .keys import StoreKey

DEFAULT_RESIDENT_THRESHOLD = 1 << 20
"""Default ``resident_threshold_bytes``: parameters of at most 1 MiB stay resident."""

KEY_ATTR = "_offload_key"
"""Attribute set on a streamed ``nn.Parameter``: its TensorStore key."""

STREAMER_ATTR = "_offload_streamer"
"""Attribute set on a streamed ``nn.Parameter``: a weak reference to the streamer that serves it."""

_PLACEHOLDER_BASES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def round_up(n: int, alignment: int = IO_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def param_key(name: str) -> StoreKey:
    """The TensorStore key of the parameter named ``name``."""
    return StoreKey.param(name)


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


# Tensor methods and attributes that read only metadata: a placeholder answers them correctly.
_METADATA_METHODS = frozenset(getattr(torch.Tensor, n) for n in (
    "size", "dim", "ndimension", "numel", "nelement", "stride", "element_size", "is_floating_point", "is_complex",
    "is_contiguous", "storage_offset", "untyped_storage", "data_ptr", "__hash__", "requires_grad_", "register_hook",
    "register_post_accumulate_grad_hook", "__reduce_ex__", "__deepcopy__", "__setstate__", "__repr__", "get_device",
    "__len__", "is_pinned", "is_shared", "is_inference", "_is_view", "dim_order") if hasattr(torch.Tensor, n)) | {
    torch._has_compatible_shallow_copy_type}
# What the placeholder answers outside a forward (what nn.Module.to / state_dict / engine code do
# with a parameter): no compute, the placeholder itself is the right answer.
_STRUCTURAL_METHODS = frozenset(getattr(torch.Tensor, n) for n in (
    "detach", "to", "cpu", "cuda", "float", "half", "bfloat16", "double", "type", "share_memory_"))
_DATA_ATTRIBUTES = frozenset(("data", "T", "mT", "H", "mH", "real", "imag"))
# Python's in-place operators and item assignment (in-place methods end in one "_": ``mul_``).
_INPLACE_DUNDERS = frozenset(f"__{n}__" for n in (
    "setitem", "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
    "ilshift", "irshift"))


def _needs_data(func: Callable) -> bool:
    if func in _METADATA_METHODS:
        return False
    name = getattr(func, "__name__", None)
    if name in ("__get__", "__set__", "__delete__"):  # attribute access
        return name == "__get__" and _attribute(func) in _DATA_ATTRIBUTES
    return True


def _attribute(func: Callable) -> Optional[str]:
    return getattr(getattr(func, "__self__", None), "__name__", None)


def _placeholders_in(args: tuple, kwargs: dict) -> list["StreamedParameter"]:
    found = []
    for a in (*args, *kwargs.values()):
        if type(a) is StreamedParameter:
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if type(x) is StreamedParameter)
    return found


def _written_param(func: Callable, args: tuple, kwargs: dict) -> Optional["StreamedParameter"]:
    """The streamed parameter ``func`` writes into (an in-place op or ``out=`` on it), or None."""
    targets = [kwargs["out"]] if kwargs.get("out") is not None else []
    name = getattr(func, "__name__", None) or ""
    if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")) or kwargs.get("inplace") is True:
        # the written tensor comes first: ``w.mul_(2)``, ``F.relu(w, inplace=True)``; nn.init passes ``tensor=``
        first = args[0] if args else next((kwargs[k] for k in ("self", "input", "tensor") if k in kwargs), None)
        targets.append(first)
    for target in targets:
        for t in (target if isinstance(target, (list, tuple)) else (target,)):
            if type(t) is StreamedParameter:
                return t
    return None


def write_error(name: str, how: str) -> StreamingError:
    """The error for a write into the streamed parameter ``name`` (``how``: the op or state_dict key)."""
    return StreamingError(
        f"the streamed parameter {name!r} cannot be written in place ({how}): its data lives in the "
        f"store and the write would land in a temporary staging copy and be lost. Train it through "
        f"the trainer; to load weights use trainer.load_checkpoint, engine.from_pretrained or "
        f"engine.initialize(..., initializer=...); or first detach with restore "
        f"(trainer.close(restore_weights=True) / streamer.detach(restore=True)) and write to the model in memory.")


def _name_of(param: nn.Parameter) -> object:
    key = getattr(param, KEY_ATTR, None)
    return key[1] if isinstance(key, tuple) else key


class StreamedParameter(nn.Parameter):
    """The class of a streamed ``nn.Parameter`` while its data is a placeholder (see the module docs)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _needs_data(func):
            params = _placeholders_in(args, kwargs)
            if params:
                streamer = _live_streamer(params[0])
                structural = is_structural(func)
                if streamer is None and not structural:  # .data / .to / .detach of a detached one: its placeholder
                    raise _detached_error(params[0])
                if streamer is not None:
                    written = None if structural else _written_param(func, args, kwargs)
                    if written is not None:
                        raise write_error(_name_of(written), getattr(func, "__name__", repr(func)))
                    return streamer.call_with_weights(func, args, kwargs, params)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _live_streamer(param: nn.Parameter):
    """The attached streamer serving ``param``, None when it was detached or collected."""
    ref = getattr(param, STREAMER_ATTR, None)
    streamer = ref() if ref is not None else None
    return streamer if streamer is not None and streamer.attached else None


def _detached_error(param: nn.Parameter) -> StreamerDetachedError:
    return StreamerDetachedError(
        f"the streamed parameter {_name_of(param)!r} was used after its "
        f"ParameterStreamer was detached without restoring it (the trainer is closed): its data is only "
        f"in the store. Use the model before close(), or close(restore_weights=True) / detach(restore=True) "
        f"to get the weights back in memory.")


def is_structural(func: Callable) -> bool:
    """True for ops that answer with the placeholder itself outside a forward (``.data``, ``to``, ``detach``, ...)."""
    return func in _STRUCTURAL_METHODS or (getattr(func, "__name__", None) == "__get__" and _attribute(func) == "data")


@dataclass(eq=False)
class StreamedParam:
    """One streamed parameter (tied aliases share one)."""

    name: str
    key: Hashable
    param: nn.Parameter
    shape: tuple[int, ...]
    dtype: torch.dtype
    aliases: list[str] = field(default_factory=list)
    param_class: type = nn.Parameter  # its class while its data is real
    partition: Optional[Partition] = None  # several ranks, partitioned: the store holds this rank's shard

    def set_placeholder(self, device: torch.device) -> None:
        """Data becomes the placeholder; ops that need the data then ask the streamer (fetch on access)."""
        self.param.data = placeholder(self.shape, self.dtype, device)
        if self.param_class is nn.Parameter:  # other Parameter subclasses keep their own class
            self.param.__class__ = StreamedParameter

    def set_data(self, data: torch.Tensor) -> None:
        """Data becomes ``data`` (a staging slot or the restored weight): the plain class, no hook cost."""
        if type(self.param) is StreamedParameter:
            self.param.__class__ = self.param_class  # first: the plain class sets .data without a Python hook
        self.param.data = data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def slot_nbytes(self) -> int:
        """Staging-buffer bytes: the size rounded up to the I/O alignment (as ``TensorStore.buffer_nbytes``);
        partitioned, the gathered buffer (every rank's chunk, :meth:`Partition.padded`)."""
        if self.partition is not None:
            return self.partition.padded_nbytes(self.numel, self.dtype)
        return round_up(self.nbytes)

    @property
    def store_shape(self) -> tuple[int, ...]:
        """The shape of its store entry: the whole tensor, or (partitioned) the owned elements, flat."""
        if self.partition is not None:
            return (self.partition.own(self.numel),)
        return self.shape

    @property
    def store_nbytes(self) -> int:
        """Bytes of its store entry (the shard, partitioned)."""
        return math.prod(self.store_shape) * dtypes.itemsize(self.dtype)

    @property
    def write_nbytes(self) -> int:
        """Staging bytes to write its store entry from (the shard, partitioned; else ``slot_nbytes``)."""
        return round_up(self.store_nbytes)

    def shard_offset_nbytes(self) -> int:
        """Partitioned: where this rank's chunk starts in the gathered slot (4 KiB-aligned)."""
        assert self.partition is not None
        return self.partition.rank * self.partition.chunk(self.numel) * dtypes.itemsize(self.dtype)


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
             dtype_of: Optional[Callable[[nn.Parameter], torch.dtype]] = None,
             partition: Optional[Partition] = None) -> ModelParams:
    """Splits ``model``'s parameters into streamed and resident ones and finds the units.

    Works on models built on the meta device (only shapes and dtypes are read).
    ``resident_trainable``: parameters with ``requires_grad`` stay resident whatever their size
    (their optimizer state is in memory too). ``dtype_of(param)``: the dtype the parameter will
    have when streamed (the planner sizes a model before it is cast); default its own.
    ``partition``: several ranks with partitioned state (each streamed tensor's store entry is a shard).
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
            nbytes = param.numel() * dtypes.itemsize(dtype)
            if (nbytes > resident_threshold_bytes and param.numel() > 1
                    and not (resident_trainable and param.requires_grad)):
                existing = getattr(param, KEY_ATTR, None)
                key = existing if existing is not None else param_key(full)
                if partition is not None and dtypes.itemsize(dtype) < 2:
                    # a rank's chunk starts 2048 elements apart: 4 KiB-aligned (O_DIRECT) for 2- and 4-byte dtypes only
                    raise ValueError(f"{full}: a streamed {dtype} parameter cannot be partitioned (1-byte elements); "
                                     "keep it resident (raise resident_threshold_bytes above its size) or use "
                                     "state_partitioning='replicated'")
                cls = nn.Parameter if type(param) is StreamedParameter else type(param)
                sp = StreamedParam(full, key, param, tuple(param.shape), dtype, [full], cls, partition)
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
