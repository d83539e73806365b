"""Materializing a meta-device model straight into the TensorStore.

A model too large for DRAM is built on the meta device (``with torch.device("meta"):
model = LlamaForCausalLM(config)``) and its parameters are produced one at a time -
by an initializer callback or from a state-dict iterator (e.g. a safetensors
checkpoint read tensor by tensor) - and written to the store through a pinned
staging block. Peak host memory is one tensor (plus the producer's own), not the
model. Large parameters become placeholders backed by the store (then
:class:`~engine.offload.ParameterStreamer` streams them without writing them
again); small ones become ordinary resident tensors on ``device``.

:func:`offload_parameters` is the same move for a model whose parameters are in memory (what
the streamer does on attach); both write a value through :func:`write_to_store`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .._log import logger
from ..distributed import Partition
from ..errors import InitializationError, PoolExhaustedError
from ..memory.pool import PinnedPool
from ..units import format_bytes
from .buffers import StagingSlot
from .params import (
    DEFAULT_RESIDENT_THRESHOLD,
    KEY_ATTR,
    STREAMER_ATTR,
    ModelParams,
    StreamedParam,
    StreamedParameter,
    discover,
    is_placeholder,
    placeholder,
    replace_parameter,
)

Initializer = Callable[[str, tuple[int, ...]], Optional[torch.Tensor]]
StateDictSource = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def initialize_into_store(model: nn.Module, store, initializer: Optional[Initializer] = None, *,
                          state_dict: Optional[StateDictSource] = None,
                          buffer_initializer: Optional[Initializer] = None,
                          resident_threshold_bytes: int = DEFAULT_RESIDENT_THRESHOLD,
                          device: Union[str, torch.device] = "cpu", pool: Optional[PinnedPool] = None,
                          resident_trainable: bool = False, partition: Optional[Partition] = None) -> dict:
    """Gives every meta parameter (and meta buffer) of ``model`` its value; large parameters go to ``store``.

    Exactly one source of parameters:

    ``initializer(name, shape) -> tensor``
        called once per parameter (tied parameters once, under their first name) in
        registration order - never for a buffer.
    ``state_dict``
        a mapping or an iterator of ``(name, tensor)`` pairs; a tied parameter may come under
        any of its names (the first one wins). Buffers in it are used too. Names the model
        does not have are reported in ``unexpected``.

    Buffers left on the meta device (non-persistent ones such as rotary ``inv_freq``) are
    computed as the model computes them, see :func:`initialize_meta_buffers`;
    ``buffer_initializer(name, shape) -> tensor or None`` opts in to giving them first (None:
    computed by the model).

    Values are cast to the parameter's dtype. Streamed parameters (more than
    ``resident_threshold_bytes``; use the same threshold as the streamer) are written to key
    ``("param", name)`` through a pinned block of ``pool`` (default: a private pool of two
    blocks of the largest tensor, so writing one tensor overlaps producing the next; a shared
    pool with room for one falls back to one write at a time).

    ``resident_trainable``: parameters with ``requires_grad`` stay resident whatever their size
    (as the streamer's option of that name). Parameters already off the meta device are left alone.
    ``partition`` (several ranks, partitioned state): each streamed value is produced whole on every
    rank and only this rank's shard is written (the streamer must get the same partition).
    Returns a summary with ``streamed``, ``resident``, ``bytes_written``, ``unexpected``
    (state-dict names the model lacks), ``buffers``.
    Raises ValueError for missing parameters or wrong shapes, or a meta buffer nothing computes.
    """
    if (initializer is None) == (state_dict is None):
        raise ValueError("pass exactly one of initializer and state_dict")
    device = torch.device(device)
    params = discover(model, resident_threshold_bytes, resident_trainable=resident_trainable, partition=partition)
    streamed_ids = {id(sp.param): sp for sp in params.streamed.values()}
    # every meta parameter, deduplicated, with all its names
    targets: dict[str, tuple[nn.Parameter, str]] = {}  # any name -> (param, canonical name)
    canonical_of: dict[int, str] = {}
    order: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.device.type != "meta":
            continue
        if id(param) not in canonical_of:
            canonical_of[id(param)] = name
            order.append((name, param))
        targets[name] = (param, canonical_of[id(param)])
    meta_buffers = {name: buf for name, buf in model.named_buffers(remove_duplicate=False) if buf.device.type == "meta"}

    largest = max((sp.write_nbytes for sp in params.streamed.values() if id(sp.param) in canonical_of), default=0)
    own_pool = pool is None and largest > 0
    if own_pool:
        pool = PinnedPool(2 * largest)
    blocks: list = []
    pending: list = []  # in-flight (request, block)
    summary = dict(streamed=0, resident=0, bytes_written=0, unexpected=[], buffers=0)
    done: set[int] = set()

    def take_block(nbytes: int):
        for i, idle in enumerate(blocks):
            if idle.size >= nbytes:
                return blocks.pop(i)
        blocks.clear()  # idle blocks too small for this tensor: give them back
        try:
            return pool.alloc(largest if own_pool else nbytes)
        except PoolExhaustedError:
            if not pending:
                raise
            # a shared pool with room for one tensor only: finish the writes in flight first
            while pending:
                pending.pop(0)[0].wait()  # (its block is freed with the tuple)
            return pool.alloc(nbytes)

    def put(name: str, value: torch.Tensor) -> None:
        param, canonical = targets[name]
        if id(param) in done:
            return
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{canonical}: got a tensor of shape {list(value.shape)}, the model expects "
                             f"{list(param.shape)}")
        value = value.detach()
        owners = params.owners[id(param)]
        sp = streamed_ids.get(id(param))
        if sp is not None:
            store.allocate(sp.key, sp.store_shape, sp.dtype)  # before waiting for a block, as always
            if len(pending) == 2:
                request, idle = pending.pop(0)
                request.wait()
                blocks.append(idle)
                del idle  # a block is freed when its last reference goes
            block = take_block(sp.write_nbytes)
            pending.append((write_to_store(store, sp, value, block), block))
            new = replace_parameter(owners, param, placeholder(sp.shape, sp.dtype, device))
            setattr(new, KEY_ATTR, sp.key)
            sp.param = new
            summary["streamed"] += 1
            summary["bytes_written"] += sp.write_nbytes
        else:
            replace_parameter(owners, param, value.to(device=device, dtype=param.dtype, copy=True))
            summary["resident"] += 1
        done.add(id(param))

    try:
        if initializer is not None:
            for name, param in order:
                value = initializer(name, tuple(param.shape))
                if value is None:
                    raise ValueError(f"initializer returned None for parameter {name}")
                put(name, value)
        else:
            items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
            for name, value in items:
                if name in targets:
                    put(name, value)
                elif name in meta_buffers:
                    _set_buffer(model, name, value, device)
                    del meta_buffers[name]
                else:
                    summary["unexpected"].append(name)
        for request, _block in pending:
            request.wait()
        pending.clear()
    finally:
        for request, _block in pending:
            try:
                request.wait()
            except Exception:  # the first error is already propagating
                pass
        pending.clear()
        blocks.clear()
        if own_pool:
            pool.close()
    missing = [name for name, param in order if id(param) not in done]
    if missing:
        raise ValueError(f"no value for {len(missing)} parameter(s): {', '.join(missing[:8])}"
                         f"{' ...' if len(missing) > 8 else ''}")
    summary["buffers"] = initialize_meta_buffers(model, buffer_initializer, device, only=set(meta_buffers))
    logger.info("initialize_into_store: %d tensors (%s) to the store, %d resident", summary["streamed"],
                format_bytes(summary["bytes_written"]), summary["resident"])
    return summary


def write_to_store(store, sp: StreamedParam, value: torch.Tensor, block: Any, io_buffer: Any = None):
    """Starts writing ``value`` (cast to ``sp.dtype``) to ``sp.key`` through the pinned ``block``
    (a PoolBlock or a staging slot; ``io_buffer``: what the store writes from, default the block).
    Partitioned: only this rank's shard of it. Allocates the store entry; returns the store request."""
    store.allocate(sp.key, sp.store_shape, sp.dtype)
    if sp.partition is not None:
        value = sp.partition.own_slice(value.reshape(-1))
    block.tensor(sp.store_shape, sp.dtype).copy_(value)
    return store.write_from(sp.key, block if io_buffer is None else io_buffer)


def offload_parameters(model: nn.Module, params: ModelParams, store, device: torch.device, *,
                       partition: Optional[Partition] = None, acquire: Callable[[int], StagingSlot],
                       release: Callable[[StagingSlot], None],
                       mark: Callable[[StreamedParam], None], stats: dict) -> None:
    """Streamed parameters of ``model`` go to the store (``mark`` makes each one a placeholder);
    resident ones and the buffers go to ``device``. Wherever a parameter lives (CPU, or a model
    handed over already on a GPU: a D2H copy into the staging slot), it is read from there.

    A streamed parameter already a placeholder in the store (:func:`initialize_into_store`) is
    checked, not written again. ``acquire(nbytes)``/``release(slot)``: a staging slot to write
    through; ``stats["bytes_written"]`` counts the bytes written. ``partition``: the store holds this
    rank's shard of each tensor (only it is written)."""
    for sp in params.streamed.values():
        param = sp.param
        if getattr(param, KEY_ATTR, None) == sp.key and is_placeholder(param.data):
            if sp.key not in store:
                raise KeyError(f"{sp.name} is a placeholder but {sp.key!r} is not in the store")
            meta = store.meta(sp.key)
            if tuple(meta.shape) != sp.store_shape or meta.dtype != sp.dtype:
                raise ValueError(f"{sp.name}: the store holds {meta.dtype}{list(meta.shape)}, "
                                 f"the model expects {sp.dtype}{list(sp.store_shape)}")
            mark(sp)
            continue
        if param.device.type == "meta":
            raise ValueError(f"{sp.name} is on the meta device: materialize the model into the store first "
                             "(engine.offload.initialize_into_store)")
        slot = None
        try:
            store.allocate(sp.key, sp.store_shape, sp.dtype)  # before the slot, as always
            slot = acquire(sp.write_nbytes)
            write_to_store(store, sp, param.detach(), slot, slot.io_buffer).wait()
            stats["bytes_written"] += sp.write_nbytes
        finally:
            if slot is not None:
                release(slot)
        setattr(param, KEY_ATTR, sp.key)
        mark(sp)
    for name, param in params.resident:
        if is_placeholder(param.data) and getattr(param, KEY_ATTR, None) in store:
            # made resident again (a larger threshold than the one it was stored with); partitioned: gathered
            key = getattr(param, KEY_ATTR)
            value = store.get(key) if partition is None else \
                partition.full_from_store(store, key, tuple(param.shape), param.dtype)
            param.data = value.view(param.shape).to(device)
            delattr(param, KEY_ATTR)
            if type(param) is StreamedParameter:
                param.__class__ = nn.Parameter
        elif param.device.type == "meta":
            raise ValueError(f"{name} is on the meta device: materialize the model first "
                             "(engine.offload.initialize_into_store)")
        elif param.device != device:
            param.data = param.data.to(device)
    for module in model.modules():  # buffers to the compute device too (a CUDA model computing on the CPU)
        for bname, buf in module._buffers.items():
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[bname] = buf.to(device)


def give_back(params: ModelParams, data: dict) -> None:
    """A failed attach: the streamed parameters it made placeholders get their own memory
    (``data``: key -> the tensor each held before) back, and lose the streamer's marks."""
    for key, tensor in data.items():
        sp = params.streamed[key]
        sp.set_data(tensor)
        for attr in (KEY_ATTR, STREAMER_ATTR):
            if hasattr(sp.param, attr):
                delattr(sp.param, attr)


class Homes:
    """Where the model's tensors lived before an attach moved them to the compute device, so a
    detach that restores (or a failed attach) gives the model back as it was given: a model
    handed over on the CPU is on the CPU again, never left whole on a GPU it may not fit, and
    one handed over on a GPU is on that GPU again (its streamed weights read back from the store)."""

    def __init__(self, model: nn.Module, params: ModelParams):
        cpu = torch.device("cpu")
        # streamed: a placeholder (meta-initialized) or a CPU tensor comes back to the CPU
        self.streamed = {key: (cpu if is_placeholder(sp.param.data) else sp.param.device)
                         for key, sp in params.streamed.items()}
        self.resident = [(param, param.device) for _, param in params.resident if param.device.type != "meta"]
        self.buffers = [(module, name, buf.device) for module in model.modules()
                        for name, buf in module._buffers.items() if buf is not None and buf.device.type != "meta"]

    def restore_residents(self) -> None:
        """Resident parameters and buffers back where they lived (no copy when they never moved)."""
        for param, home in self.resident:
            if param.device != home:
                param.data = param.data.to(home)
        for module, name, home in self.buffers:
            buf = module._buffers.get(name)
            if buf is not None and buf.device != home:
                module._buffers[name] = buf.to(home)


def _set_buffer(model: nn.Module, name: str, value: torch.Tensor, device: torch.device) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._buffers[attr]
    if tuple(value.shape) != tuple(old.shape):
        raise ValueError(f"buffer {name}: got shape {list(value.shape)}, the model expects {list(old.shape)}")
    module._buffers[attr] = value.detach().to(device=device, dtype=old.dtype, copy=True)


def initialize_meta_buffers(model: nn.Module, buffer_initializer: Optional[Initializer] = None,
                            device: Union[str, torch.device] = "cpu", *, only: Optional[set[str]] = None) -> int:
    """Gives every meta buffer of ``model`` (those named in ``only``, if given) its value; returns how many.

    ``buffer_initializer(name, shape)`` is asked first (opt-in; None: not its business). The rest
    are computed the way a Hugging Face model computes them for a meta-built model: its
    ``_init_weights`` on each parameter-free module that owns them (rotary embeddings). Anything
    else - a plain module's buffer computed in ``__init__``, or one ``_init_weights`` leaves
    untouched - is an :class:`~engine.errors.InitializationError` naming the buffers and the fix;
    never an uninitialized value.
    """
    device = torch.device(device)
    pending = {name: buf for name, buf in model.named_buffers(remove_duplicate=False)
               if buf.device.type == "meta" and (only is None or name in only)}
    count = 0
    if buffer_initializer is not None:
        for name in list(pending):
            value = buffer_initializer(name, tuple(pending[name].shape))
            if value is not None:
                _set_buffer(model, name, value, device)
                del pending[name]
                count += 1
    return count + _compute_meta_buffers(model, pending, device)


def _compute_meta_buffers(model: nn.Module, meta_buffers: dict[str, torch.Tensor], device: torch.device) -> int:
    """Computes the remaining meta buffers with the HF model's ``_init_weights``, module by module."""
    if not meta_buffers:
        return 0
    init = getattr(model, "_init_weights", None)
    modules: dict[int, tuple[nn.Module, list[str]]] = {}
    stuck: list[str] = []
    for name in meta_buffers:
        module = model.get_submodule(name.rpartition(".")[0])
        # _init_weights would also re-initialize the module's own (already given) parameters
        if init is None or any(True for _ in module.parameters(recurse=False)):
            stuck.append(name)
        else:
            modules.setdefault(id(module), (module, []))[1].append(name)
    for module, names in modules.values():
        stuck += _run_init(init, module, names, device)
    if stuck:
        raise InitializationError(
            f"no value for meta buffer(s) {', '.join(stuck)}: the model does not compute them itself (no "
            "_init_weights that does, on a module without parameters). Pass buffer_initializer=fn(name, shape) -> "
            "tensor to engine.initialize, include them in the state dict, or create the module that owns them on "
            "the CPU")
    return len(meta_buffers)


def _run_init(init: Callable[[nn.Module], None], module: nn.Module, names: list[str],
              device: torch.device) -> list[str]:
    """Runs ``init(module)`` over two different fills of its meta buffers; returns the names it did
    not determine (still showing the fill), which are left on the meta device."""
    attrs = {attr: buf for attr, buf in module._buffers.items() if buf is not None and buf.device.type == "meta"}
    given = {attr: buf for attr, buf in module._buffers.items() if buf is not None and attr not in attrs}
    results = []
    for fill in (0, 1):
        for attr, buf in attrs.items():
            module._buffers[attr] = torch.full(buf.shape, fill, dtype=buf.dtype, device=device)
        for attr, buf in given.items():  # init writes all of the module's buffers: keep the given values
            module._buffers[attr] = buf.clone()
        init(module)
        results.append({attr: module._buffers[attr] for attr in attrs})
    module._buffers.update(given)
    undetermined = [attr for attr in attrs if not torch.equal(results[0][attr], results[1][attr])]
    for attr in undetermined:
        module._buffers[attr] = attrs[attr]
    prefix = names[0].rpartition(".")[0]
    return [f"{prefix}.{attr}" if prefix else attr for attr in undetermined]
