"""How an :class:`~engine.offload.runtime.OffloadRuntime` is put together, in the order it is built.

1. :func:`check_supported` - refuse what the engine does not do, before anything is touched.
2. :func:`open_storage` - the pinned pool, the I/O ring and the TensorStore, sized by the plan;
   the disk is checked first (:func:`~engine.offload.planner.check_disk`), so a run that
   cannot fit writes nothing.
3. :func:`materialize` - parameters cast to their dtypes; a meta-device model goes straight
   into the store tensor by tensor, its trainable values also seeding the fp32 masters.
4. :func:`open_streamer` - the streamer attached to the model.
5. :func:`nvme_placement` / :func:`dram_placement` - the gradient sink and optimizer backend.
6. :func:`loss_scaler` - fp16 only.

Each function fills what it opens into the runtime's :class:`~engine.offload.lifecycle.Resources`
as soon as it exists, so a failure part-way releases exactly what was made.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..config import Config
from ..devices import ComputeDeviceSpec
from ..distributed import SINGLE, DistributedSpec, Partition, rank_paths
from ..dtypes import BY_NAME
from ..memory.pool import PinnedPool
from ..storage import cleanup
from ..storage.aio import AsyncIO
from ..storage.segments import STRIPE_ELEMENT_BYTES
from ..storage.staging import put_chunked  # segment by segment: no full-size staging copy
from ..storage.store import TensorStore
from ..units import parse_bytes
from .gradients import GradientOffload
from .keys import StoreKey
from .lifecycle import Resources
from .loss_scaler import DynamicLossScaler
from .materialize import Initializer, initialize_into_store
from .planner import MemoryPlan, check_disk
from .resident import DramGradients, DramOptimizer
from .sharded_gradients import ShardedGradients
from .stepper import OptimizerStepper, ParamSpec
from .streamer import ParameterStreamer

HParams = Callable[[int], tuple[float, float]]


def check_supported(config: Config, distributed: DistributedSpec = SINGLE) -> None:
    if config.offload_params != "nvme" or config.offload_optimizer != "nvme":
        raise NotImplementedError("this engine currently offloads both parameters and optimizer states to NVMe "
                                  "(offload_params='nvme', offload_optimizer='nvme')")
    if distributed.is_distributed and config.grad_buffer == "flat":
        raise NotImplementedError(f"grad_buffer='flat' (the ZeRO-Infinity-like ablation) is not supported with "
                                  f"{distributed.world_size} ranks; use grad_buffer='streamed' (the default)")


def check_optimizer(config: Config) -> None:
    if config.optimizer.type == "sgd":
        raise NotImplementedError("SGD is not implemented for NVMe offload yet; use adamw or adam")


def open_storage(res: Resources, config: Config, plan: MemoryPlan, distributed: DistributedSpec = SINGLE) -> None:
    """Pool, ring and store into ``res``; the store's extents are reserved up front (no ENOSPC mid-step).
    ``{rank}`` / ``{local_rank}`` in ``nvme_path`` are this rank's (engine.distributed.paths)."""
    paths = config.nvme_paths
    if paths is not None:
        paths = rank_paths(paths, distributed)
    if paths is None:  # the store makes its private swap directory in there and removes it
        paths = [cleanup.default_swap_root()]
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(2, f"NVMe path {p!r} does not exist or is not a directory", p)
    check_disk(plan, paths)
    res.pool = PinnedPool(plan.pool_bytes)
    res.io = AsyncIO(config.aio_backend, queue_depth=config.queue_depth, block_size=parse_bytes(config.block_size),
                     pool=res.pool)
    res.store = TensorStore(paths, layout=config.store, io=res.io, checksum=config.checksum,
                            stripe_size=plan.segment_elements * STRIPE_ELEMENT_BYTES)
    res.store.ensure_capacity(plan.disk_bytes, plan.disk_largest_extent)


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters, tied ones once (by their first name)."""
    seen, names = set(), set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            names.add(name)
    return names


def cast_parameters(model: nn.Module, compute: torch.dtype, frozen: torch.dtype) -> None:
    """Trainable parameters to the compute dtype, frozen ones to ``frozen``."""
    if frozen == compute:
        if compute != torch.float32:
            model.to(compute)
        return
    for p in {id(p): p for p in model.parameters()}.values():
        target = compute if p.requires_grad else frozen
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)


def materialize(res: Resources, model: nn.Module, config: Config, initializer: Optional[Initializer], *,
                trainable: set[str], compute: torch.dtype, frozen: torch.dtype,
                in_memory: bool, partition: Optional[Partition] = None) -> dict[str, torch.Tensor]:
    """Casts the parameters and, for a meta-device model, initializes them into the store.

    Returns the fp32 masters of in-memory trainable parameters (mixed precision); on the NVMe
    path the masters go to ``StoreKey.master(name)`` as the values are first seen, so the
    fp32 value is the original, not a round trip through the compute dtype (``partition``:
    this rank's shard of it)."""
    store, pool = res.store, res.pool
    assert store is not None and pool is not None
    mixed = compute != torch.float32
    masters: dict[str, torch.Tensor] = {}

    def keep_master(name: str, value: torch.Tensor) -> None:
        if not mixed:
            return
        if in_memory:
            # a host tensor whatever the model's device (the DRAM optimizer's masters): a model
            # already on the GPU gives its fp32 master by a D2H copy
            masters[name] = value.detach().to("cpu", torch.float32, copy=True)
        elif partition is not None:
            partition.write_own(store, StoreKey.master(name), value.detach().float(), pool)
        else:
            put_chunked(store, StoreKey.master(name), value.detach().float(), pool)

    on_meta = any(p.device.type == "meta" for p in model.parameters())
    for name, p in model.named_parameters():  # real trainable ones (e.g. adapters on a meta base)
        if name in trainable and p.device.type != "meta":
            keep_master(name, p)
    cast_parameters(model, compute, frozen)
    if on_meta:
        assert initializer is not None
        user_init = initializer

        def init(name: str, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
            value = user_init(name, shape)
            if value is not None and name in trainable:
                keep_master(name, value)
            return value  # cast to the parameter's dtype by initialize_into_store

        initialize_into_store(model, store, init, resident_threshold_bytes=config.resident_threshold_bytes,
                              pool=pool, resident_trainable=in_memory, partition=partition)
    return masters


def open_streamer(res: Resources, model: nn.Module, config: Config, plan: MemoryPlan,
                  device: Optional[ComputeDeviceSpec] = None,
                  partition: Optional[Partition] = None) -> ParameterStreamer:
    """The streamer over the runtime's store and pool, attached (the runtime installs the gradient hooks);
    on ``device`` (its kind says whether weights are copied out of staging); ``partition``: each
    streamed tensor's store entry is this rank's shard."""
    assert res.store is not None
    res.streamer = ParameterStreamer(
        model, res.store, None if config.pinned_alloc == "torch" else res.pool, prefetch_depth=plan.prefetch_depth,
        resident_threshold_bytes=config.resident_threshold_bytes, buffer_pool=config.buffer_pool,
        buffer_count=config.buffer_count if config.buffer_pool == "uniform" else None,
        pinned_alloc=config.pinned_alloc, restore_on_exit=False, resident_trainable=plan.trainable_in_memory,
        device=device.device if device is not None else "cpu", copies=device.copies if device is not None else False,
        partition=partition)
    res.streamer.attach()
    return res.streamer


def nvme_placement(res: Resources, config: Config, plan: MemoryPlan, specs: Sequence[ParamSpec], *,
                   compute: torch.dtype, group_hparams: HParams, device: Optional[ComputeDeviceSpec] = None,
                   distributed: DistributedSpec = SINGLE, partition: Optional[Partition] = None) -> None:
    """The NVMe path: pipelined stepper over store-resident states, gradients offloaded as produced.
    ``partition``: the stepper updates this rank's shard of every parameter (flat, the owned
    elements) and gradients are reduce-scattered (:class:`ShardedGradients`)."""
    assert res.store is not None and res.pool is not None
    opt = config.optimizer
    shards = specs if partition is None else \
        [ParamSpec(s.name, (partition.own(s.numel),), s.group) for s in specs]
    res.backend = stepper = OptimizerStepper(
        res.store, res.pool, shards, compute_dtype=compute, state_dtype=BY_NAME[config.optimizer_state_dtype],
        sub_group_elements=plan.sub_group_elements, betas=opt.betas, eps=opt.eps,
        adamw_mode=opt.type == "adamw", group_hparams=group_hparams)
    stepper.initialize_states()
    if partition is not None:
        res.gradients = ShardedGradients(res.store, res.pool, specs, partition, overflow_check=config.overflow_check,
                                         staging_bytes=plan.grad_staging_bytes,
                                         copies=device is not None and device.copies)
        return
    res.gradients = GradientOffload(res.store, res.pool, specs, grad_buffer=config.grad_buffer,
                                    overflow_check=config.overflow_check, staging_bytes=plan.grad_staging_bytes,
                                    flat_dtype=compute, device=device,  # flat: the compute dtype, as ZeRO-Infinity
                                    distributed=distributed)


def dram_placement(res: Resources, config: Config, params: Sequence[tuple[str, nn.Parameter]],
                   masters: dict[str, torch.Tensor], *, group_hparams: HParams,
                   device: Optional[ComputeDeviceSpec] = None, groups: Optional[dict[str, int]] = None,
                   distributed: DistributedSpec = SINGLE) -> None:
    """The DRAM path (PEFT): fp32 gradient buffers and CPUAdamW in memory, sharing the buffers; on a
    copying device over host masters of every trainable parameter, copied to the module after each step."""
    opt = config.optimizer
    copies = device is not None and device.copies
    res.gradients = gradients = DramGradients(params, overflow_check=config.overflow_check, copies=copies,
                                              distributed=distributed)
    res.backend = DramOptimizer(params, gradients, masters, state_dtype=BY_NAME[config.optimizer_state_dtype],
                                betas=opt.betas, eps=opt.eps, adamw_mode=opt.type == "adamw",
                                group_hparams=group_hparams, copies=copies, groups=groups)


def loss_scaler(config: Config) -> Optional[DynamicLossScaler]:
    """fp16's dynamic loss scaler (``loss_scale`` > 0: a fixed scale); None for bf16/fp32."""
    if config.dtype != "fp16":
        return None
    scaler = DynamicLossScaler(2.0 ** config.initial_scale_power, config.loss_scale_window, config.hysteresis,
                               config.min_loss_scale, dynamic=config.loss_scale == 0)
    if config.loss_scale:
        scaler.scale = float(config.loss_scale)
    return scaler
