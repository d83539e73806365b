"""The offload runtime: a model whose parameters, gradients and optimizer states live on NVMe.

One training step, in the order the code below runs it (DESIGN.md section 3)::

    loss = runtime.forward(**batch).loss   # 1. fetch + 2. forward
    runtime.backward(loss)                 # 3. backward re-fetch + 4. gradient out
    runtime.step()                         # 5. optimizer pipeline + 6. refresh (at the boundary)

1. **fetch** - before a unit of the model runs, the streamer's forward pre-hook makes its
   weights ready; reads for the next ``prefetch_depth`` units are already in flight
   (:class:`~engine.offload.streamer.ParameterStreamer`, attached at construction).
2. **forward** - :meth:`OffloadRuntime.forward` runs the user's module; after each unit its
   staged weights go back to the staging pool, so DRAM holds the prefetch window only.
3. **backward re-fetch** - :meth:`OffloadRuntime.backward` backpropagates the scaled loss;
   autograd saved handles, not weights, and the streamer fetches each weight again, in
   reverse order, when its backward needs it.
4. **gradient out** - each gradient leaves autograd as soon as it is accumulated
   (:class:`~engine.offload.grad_hooks.GradientHooks` -> :meth:`OffloadRuntime._on_grad`)
   into the :class:`~engine.offload.placement.GradientSink`: to its NVMe slot, or into an
   fp32 buffer in DRAM; nothing stays on the module.
5. **optimizer pipeline** - at the accumulation boundary :meth:`OffloadRuntime.step` calls
   the torch-facing optimizer, whose ``step`` is :meth:`OffloadRuntime.apply_step`: the
   window closes (norm and overflow from the fused pass), unscale and clip become one factor,
   and the :class:`~engine.offload.placement.OptimizerBackend` updates every parameter
   (NVMe: read sub-group j+1 | update j | write j-1).
6. **refresh** - the store now holds the new weights: staged copies are invalidated, resident
   trainable parameters are copied back from the store, and a new gradient window begins.

Resident (small) trainable parameters take the same path as streamed ones - their store
copy is the truth, refreshed into the module after every step - so every parameter sees
exactly the same arithmetic. Construction is :mod:`engine.offload.assembly`; what the
runtime holds beyond Python memory, and its release, is :mod:`engine.offload.lifecycle`.
"""
from __future__ import annotations

import math
import time
import weakref
from typing import Any, Optional

import torch
from torch import nn

from .._log import logger, warn_once
from ..config import Config
from ..devices import ComputeDeviceSpec, resolve_device
from ..distributed import (
    DistributedSpec,
    Partition,
    agree,
    agreed_failure,
    check_same_sequence,
    env_local_rank,
    fingerprints,
    init_from_env,
    make_partition,
)
from ..dtypes import BY_NAME
from ..errors import TrainerClosedError
from ..memory.malloc import set_mmap_threshold
from ..memory.pool import PinnedPool
from ..memory.profiler import phase as profile_phase
from ..storage.aio import AsyncIO
from ..storage.store import TensorStore
from ..units import format_bytes, parse_bytes
from . import assembly
from .device_copy import inputs_to_device
from .grad_hooks import GradientHooks
from .keys import StoreKey
from .lifecycle import Resources, check_attachable, finalize, register, weak_callback
from .loss_scaler import DynamicLossScaler
from .materialize import Initializer, initialize_meta_buffers
from .optimizer import OffloadedOptimizer
from .param_groups import ParamGroupsLike
from .param_groups import resolve as resolve_param_groups
from .params import KEY_ATTR, is_placeholder
from .placement import GradientSink, OptimizerBackend, TrainablePlacement
from .planner import MemoryPlan
from .planner import plan as plan_memory
from .report import DeviceCounters, PhaseTimes, RuntimeStats, memory_report, runtime_stats
from .stepper import ParamSpec
from .streamer import ParameterStreamer
from .window import AccumulationWindow


class OffloadRuntime:
    """Owns the store, pool, I/O ring, streamer, gradient sink and optimizer backend of one model."""

    def __init__(self, model: nn.Module, config: Config, initializer: Optional[Initializer] = None, *,
                 buffer_initializer: Optional[Initializer] = None, param_groups: ParamGroupsLike = None):
        check_attachable(model)  # before anything of the model is touched
        # several ranks on a machine: "cuda"/"auto" is cuda:LOCAL_RANK; ConfigError: no silent CPU fallback
        self.device: ComputeDeviceSpec = resolve_device(config.device, env_local_rank())
        logger.info("compute device: %s (config.device=%r)", self.device, config.device)
        # torchrun: the process group (made from the environment unless one exists); one process: SINGLE
        self.distributed: DistributedSpec = init_from_env(config, self.device)
        # several ranks, partitioned (the default): each rank's store holds 1/N of every tensor (ZeRO-3)
        self.partition: Optional[Partition] = make_partition(self.distributed, config.collective_timeout_s) \
            if self.distributed.is_distributed and config.state_partitioning == "partitioned" else None
        if buffer_initializer is not None:
            initialize_meta_buffers(model, buffer_initializer)
        self.config = config
        self.module = model
        self.compute_dtype = BY_NAME[config.dtype]
        self.frozen_dtype = BY_NAME[config.frozen_dtype or config.dtype]  # requires_grad=False parameters
        self.mixed = self.compute_dtype != torch.float32
        self._res = Resources(model)
        register(model, self._res)
        self._finalizer = weakref.finalize(self, finalize, self._res)
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0
        self.last_grad_norm: Optional[float] = None
        self.poisoned: Optional[str] = None  # a checkpoint load that failed part-way: save refuses
        self.trainable: list[ParamSpec] = []
        self.resident_trainables: dict[str, nn.Parameter] = {}
        self.scaler: Optional[DynamicLossScaler] = None
        self._grads_since_step = False  # a step() with none changes nothing (as torch.optim)
        self.window = AccumulationWindow(config.gradient_accumulation_steps)
        self._times = PhaseTimes()
        self._device_counters = DeviceCounters()  # resident refreshes (the streamer and sink count their own)
        on_meta = any(p.device.type == "meta" for p in model.parameters())
        failure: Optional[BaseException] = None
        try:
            self._build(initializer, on_meta, param_groups)
        except BaseException as exc:
            failure = exc
        failure = agreed_failure(self.distributed, failure, "engine.initialize")  # no rank trains on alone
        if failure is not None:
            # Give an in-memory model its weights back; a meta-built one has nowhere to keep them.
            restore = not on_meta and self._can_restore()
            error = self._shutdown(restore_weights=restore)
            if error is not None:
                logger.warning("releasing a trainer whose initialization failed also failed: %s", error)
            raise failure

    def _can_restore(self) -> bool:
        """After a failed build: partitioned, the weights come back by gathering every rank's shard,
        so only when every rank's streamer attached (else nothing is restored: no rank waits forever)."""
        if self.partition is None:
            return True
        attached = self._res.streamer is not None and self._res.streamer.attached
        try:
            agree(self.distributed, None if attached else "its streamer did not attach", "restoring the weights")
        except Exception as exc:  # DistributedError: some rank cannot give its shards back
            logger.warning("the model's streamed weights are not restored after the failed initialize: %s", exc)
            return False
        return True

    def _build(self, initializer: Optional[Initializer], on_meta: bool, param_groups: ParamGroupsLike) -> None:
        cfg, model, res = self.config, self.module, self._res
        assembly.check_supported(cfg, self.distributed)
        if cfg.malloc_mmap_threshold is not None:
            set_mmap_threshold(parse_bytes(cfg.malloc_mmap_threshold))
        if on_meta and initializer is None:
            raise ValueError("the model is on the meta device: pass initializer(name, shape) -> tensor "
                             "(or load it with engine.from_pretrained)")
        if self.distributed.is_distributed and not on_meta:
            # Replicas must start equal (a per-rank seed would train diverging copies): checked, as
            # DDP makes them equal by broadcasting. A meta model's initializer is trusted to agree.
            check_same_sequence(self.distributed, fingerprints(list(model.named_parameters())),
                                "initial weights (build the model identically on every rank: same seed, or "
                                "the same checkpoint)")
        trainable = assembly.trainable_names(model)
        # Checked before anything is allocated; tensors are matched while they are the user's objects.
        if callable(param_groups):
            param_groups = param_groups(model)
        groups = resolve_param_groups(param_groups, [(n, p) for n, p in model.named_parameters() if n in trainable],
                                      lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
        self.plan: MemoryPlan = plan_memory(model, cfg, world_size=self.distributed.world_size,
                                            rank=self.distributed.rank)  # this rank's plan
        assembly.open_storage(res, cfg, self.plan, self.distributed)
        in_memory = self.plan.trainable_in_memory
        masters = assembly.materialize(res, model, cfg, initializer, trainable=trainable, compute=self.compute_dtype,
                                       frozen=self.frozen_dtype, in_memory=in_memory, partition=self.partition)
        streamer = assembly.open_streamer(res, model, cfg, self.plan, self.device, self.partition)
        res.hooks = GradientHooks(model, weak_callback(self._on_grad)).install()
        # Only an optimizer step on a streamed weight makes staged copies stale (PEFT: never).
        self._streamed_trainable = any(sp.param.requires_grad for sp in streamer.params.streamed.values())
        # Resident trainable parameters on the NVMe path: their store copy is what the optimizer updates.
        if not in_memory:
            self.resident_trainables = {name: p for name, p in streamer.params.resident if name in trainable}
        for name, p in self.resident_trainables.items():
            if self.partition is not None:  # this rank's shard of it
                self.partition.write_own(self.store, StoreKey.param(name), p.detach().cpu(), self.pool)
            else:
                self.store.put(StoreKey.param(name), p.detach().cpu())  # the store takes host tensors
        named = [(n, p) for n, p in model.named_parameters() if n in trainable]
        assembly.check_optimizer(cfg)
        opt = cfg.optimizer
        self.trainable = [ParamSpec(name, tuple(p.shape), groups.index[name]) for name, p in named]
        by_name = dict(named)
        self.optimizer = OffloadedOptimizer(
            [dict(params=[by_name[n] for n in members], **options)
             for members, options in zip(groups.members([n for n, _ in named]), groups.options)],
            dict(lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay), self)
        torch_groups = self.optimizer.param_groups  # the list, not the runtime: no reference cycle

        def hparams(g: int) -> tuple[float, float]:  # read at every step: LR schedulers apply
            return torch_groups[g]["lr"], torch_groups[g]["weight_decay"]

        if in_memory:
            assembly.dram_placement(res, cfg, named, masters, group_hparams=hparams, device=self.device,
                                    groups=groups.index, distributed=self.distributed)
        else:
            assembly.nvme_placement(res, cfg, self.plan, self.trainable, compute=self.compute_dtype,
                                    group_hparams=hparams, device=self.device, distributed=self.distributed,
                                    partition=self.partition)
        self.gradients.begin_window()
        self.scaler = assembly.loss_scaler(cfg)
        logger.info("engine initialized: pool %s, disk %s, prefetch %d, backend %s",
                    format_bytes(self.plan.pool_bytes), format_bytes(self.plan.disk_bytes),
                    self.plan.prefetch_depth, self.io.backend)

    # ------------------------------------------------------------------ the parts (typed surface)
    # The runtime keeps them after close (closed themselves): tests and reports may still look.
    @property
    def store(self) -> TensorStore:
        return self._res.store  # type: ignore[return-value]

    @property
    def pool(self) -> PinnedPool:
        return self._res.pool  # type: ignore[return-value]

    @property
    def io(self) -> AsyncIO:
        return self._res.io  # type: ignore[return-value]

    @property
    def streamer(self) -> ParameterStreamer:
        return self._res.streamer  # type: ignore[return-value]

    @property
    def gradients(self) -> GradientSink:
        return self._res.gradients  # type: ignore[return-value]

    @property
    def backend(self) -> OptimizerBackend:
        return self._res.backend  # type: ignore[return-value]

    @property
    def closed(self) -> bool:
        return self._res.released

    @property
    def placement(self) -> TrainablePlacement:
        return TrainablePlacement.DRAM if self.plan.trainable_in_memory else TrainablePlacement.NVME

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    # ------------------------------------------------------------------ phases 1-2: fetch, forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the model; on CUDA, CPU tensors among the arguments (at any depth inside mappings,
        lists and tuples, container types kept) are moved to the compute device first."""
        self.check_open("forward")
        start = time.perf_counter()
        if self.device.kind == "cuda":
            args, kwargs = inputs_to_device(args, kwargs, self.device.device)
        try:
            with profile_phase("forward"):  # shaded in a running MemoryProfiler's timeline
                return self.module(*args, **kwargs)  # the streamer's hooks fetch each unit's weights
        finally:
            self._times.forward_s += time.perf_counter() - start

    # ------------------------------------------------------------------ phases 3-4: backward, gradient out
    def backward(self, loss: torch.Tensor, *, scale_wrt_gas: bool = True) -> None:
        """Backpropagates ``loss / gradient_accumulation_steps`` (times the fp16 loss scale);
        ``scale_wrt_gas=False`` (DeepSpeed's name): ``loss`` as given, for a caller that already
        normalized it over the window (the Hugging Face Trainer)."""
        self.check_open("backward")
        start = time.perf_counter()
        scaled = loss.float()
        if scale_wrt_gas:
            scaled = scaled / self.gradient_accumulation_steps  # the window's mean, not its sum
        if self.scaler is not None:
            scaled = scaled * self.scaler.scale  # fp16: keep small gradients representable
        with profile_phase("backward"):
            scaled.backward()  # weights re-fetched through saved handles; gradients leave via _on_grad
        self._times.backward_s += time.perf_counter() - start

    def set_window_end(self, last: bool) -> None:
        """Says whether the next micro-batch closes its accumulation window, for a loop that
        decides its own boundaries (the Hugging Face Trainer closes an epoch's short last
        window early). Call before that micro-batch's ``backward()``; its ``step()`` then runs
        the optimizer exactly when ``last``, and the next micro-batch opens a new window.
        Without a call a window is ``gradient_accumulation_steps`` micro-batches long, counted
        from its own start."""
        self.window.end_next_at(last)

    @property
    def window_micro_batches(self) -> int:
        """Micro-batches accumulated in the open window (0: at an accumulation boundary)."""
        return self.window.accumulated

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        """Phase 4: one gradient contribution, straight from autograd to the gradient sink."""
        self.check_open("backward")
        first, last = self.window.position()  # first: overwrite the slot; last: enters norm/overflow stats
        self.gradients.add(name, grad, first, last)
        self._grads_since_step = True

    # ------------------------------------------------------------------ phases 5-6: optimizer, refresh
    def step(self) -> None:
        """Call after every micro-batch; the optimizer runs at the accumulation boundary.

        Like ``torch.optim``, which skips parameters without a gradient: a ``step()`` with no
        gradient since the previous one (no ``backward()``) changes nothing - no weight decay,
        no moment update - and counts no micro-batch or step; it warns once."""
        self.check_open("step")
        if not self._grads_since_step:
            self._warn_no_gradients("step")
            return
        self._grads_since_step = False
        self.micro_steps += 1
        if self.window.advance():
            with profile_phase("optimizer"):
                self.optimizer.step()  # -> apply_step (torch LR schedulers see this optimizer)

    def apply_step(self) -> None:
        """The optimizer pipeline at the accumulation boundary, then the refresh."""
        self.check_open("optimizer.step")
        if not self.gradients.received:  # optimizer.step() called directly on an empty window
            self._warn_no_gradients("optimizer.step")
            return
        start = time.perf_counter()
        if self.partition is not None:
            # Ranks whose graphs differed paired one rank's gathers or reduce-scatters with other tensors'
            # (silently when the sizes match): refused here, before any update, whatever the placement.
            self.partition.trail.check(self.distributed, "partitioned collectives of the window (weight "
                                       "all-gathers and gradient reduce-scatters)")
        # 5a. close the window: gradient writes drained, global norm and overflow from the fused pass
        norm, overflow = self.gradients.finish()
        scale = self.loss_scale
        if overflow:
            # 5b. a non-finite gradient: no update (fp16: the loss scale backs off)
            self._skip_step()
        else:
            # 5c. unscale and clip as one factor the kernel multiplies every gradient by
            clip = self._clip_coefficient(norm / scale)
            self.global_steps += 1
            # 5d. the update: NVMe pipeline (read j+1 | update j | write j-1) or CPUAdamW in DRAM
            self.backend.step(self.global_steps, grad_scale=clip / scale, grad_source=self.gradients.grad_source())
            # 6. refresh: the store holds the new weights, staged and resident copies are the old ones
            self._refresh()
            if self.scaler is not None:
                self.scaler.update(False)
        self.last_grad_norm = norm / scale if not overflow else math.inf
        self.gradients.begin_window()  # the next micro-batch starts a new accumulation window
        self._times.step_s += time.perf_counter() - start

    def _skip_step(self) -> None:
        if self.scaler is None:
            logger.warning("non-finite gradient at step %d; the step is skipped", self.global_steps + 1)
        self.skipped_steps += 1
        if self.scaler is not None:
            self.scaler.update(True)
            logger.info("fp16 overflow: step skipped, loss scale -> %g", self.scaler.scale)

    def _clip_coefficient(self, true_norm: float) -> float:
        """``gradient_clipping / norm`` when the norm exceeds it (1.0 otherwise, or without clipping)."""
        if self.config.gradient_clipping > 0:
            return min(1.0, self.config.gradient_clipping / (true_norm + 1e-6))
        return 1.0

    def _refresh(self) -> None:
        if self._streamed_trainable:
            self.streamer.invalidate()  # staged weights are the old ones now
        for name, p in self.resident_trainables.items():  # partitioned: gathered, in the same order on every rank
            value = self._stored(StoreKey.param(name), tuple(p.shape), p.dtype, agreed=False)  # the hot path
            p.data.copy_(value)  # CUDA: an H2D copy into the resident device tensor
            if self.device.copies:
                self._device_counters.h2d_bytes += value.numel() * value.element_size()

    def _warn_no_gradients(self, what: str) -> None:
        warn_once(f"no-gradients-{what}",
                  f"Trainer.{what}() with no gradient since the last step (no backward()): skipped, nothing "
                  f"updated and no step counted (global_steps stays {self.global_steps}), as torch.optim "
                  "skips parameters without a gradient")

    def invalidate(self) -> None:
        """The store's values changed (a checkpoint load): staged weights and the open gradient
        window belong to the old state."""
        self.streamer.invalidate()
        self.gradients.begin_window()
        self._grads_since_step = False  # a backward() before the load belongs to the state it replaced
        self.window.reset()

    # ------------------------------------------------------------------ values
    def _stored(self, key: StoreKey, shape: tuple[int, ...], dtype: torch.dtype, agreed: bool = True) -> torch.Tensor:
        """The whole tensor of ``key`` as a host tensor of ``shape``: partitioned, gathered from
        every rank's shard (collective: every rank reads the same keys in the same order; ``agreed``:
        a failed read on any rank is an AgreedFailure on every rank, at this tensor)."""
        if self.partition is None:
            return self.store.get(key).view(shape)
        return self.partition.full_from_store(self.store, key, shape, dtype, agreed=agreed)

    def parameter(self, name: str) -> torch.Tensor:
        """The current value of a trainable parameter (fp32 master when mixed precision). Partitioned
        state: gathered from every rank's shard, so every rank must call it (same names, same order)."""
        self.check_open("parameter")
        if self.placement is TrainablePlacement.DRAM:
            return self.backend.master(name).detach()  # type: ignore[attr-defined]
        key = StoreKey.master(name) if self.mixed else StoreKey.param(name)
        if self.partition is None:
            return self.store.get(key)
        spec = next((s for s in self.trainable if s.name == name), None)  # the whole shape to gather
        if spec is None:
            raise KeyError(f"{name!r} is not a trainable parameter")
        return self._stored(key, spec.shape, torch.float32 if self.mixed else self.compute_dtype)

    def weight(self, name: str) -> torch.Tensor:
        """The current value of any parameter, trainable or frozen, read on its own (frozen streamed
        weights from the store, one tensor at a time): trainable ones as :meth:`parameter`."""
        self.check_open("weight")
        param = dict(self.module.named_parameters(remove_duplicate=False)).get(name)
        if param is None:
            raise KeyError(f"{name!r} is not a parameter of the model")
        if param.requires_grad:
            canonical = next(n for n, p in self.module.named_parameters() if p is param)
            return self.parameter(canonical).view(param.shape)
        key = getattr(param, KEY_ATTR, None)
        if key is not None and is_placeholder(param.data):
            return self._stored(key, tuple(param.shape), param.dtype)
        return param.detach().cpu()  # a host tensor, as every other value read here (no copy on the CPU)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> RuntimeStats:
        self.check_open("stats")
        return self._stats(self.streamer.stats())

    def _stats(self, streamer: dict) -> RuntimeStats:
        counters = dict(micro_steps=self.micro_steps, global_steps=self.global_steps,
                        skipped_steps=self.skipped_steps, last_grad_norm=self.last_grad_norm)
        return runtime_stats(counters, self._times, self.store.stats(), streamer,
                             self.backend.stats,  # type: ignore[attr-defined]
                             device=self.device, refresh=self._device_counters,
                             sink=getattr(self.gradients, "device_stats", {}))

    def memory_report(self) -> dict:
        """Backend, pool stats, peak RSS, bytes read/written and bandwidth, I/O wait vs compute time."""
        self.check_open("memory_report")
        streamer = self.streamer.stats()
        report = memory_report(self._stats(streamer), io=self.io, pool=self.pool, plan=self.plan, streamer=streamer)
        report.update(rank=self.distributed.rank, world_size=self.distributed.world_size)  # this rank's figures
        return report

    # ------------------------------------------------------------------ teardown
    def close(self, *, restore_weights: bool = False) -> None:
        """Detaches from the model, closes the store (removing swap files), the I/O ring and the pool.

        Everything is released even when a part fails (e.g. a gradient write that hit ENOSPC);
        the first error is raised once, and later calls do nothing. The streamed weights live
        only on NVMe: by default they go with the store and the model refuses to run
        (:class:`~engine.errors.TrainerClosedError`, never NaN). ``restore_weights=True`` reads
        them back into the model first (costs the model's compute-dtype size in DRAM), so it can
        be evaluated, saved or trained again."""
        error = self._shutdown(restore_weights)
        if error is not None:
            raise error

    def _shutdown(self, restore_weights: bool) -> Optional[BaseException]:
        self._finalizer.detach()  # released here, not again at garbage collection
        return self._res.release(restore_weights)

    def check_open(self, what: str) -> None:
        """Raises :class:`~engine.errors.TrainerClosedError` naming ``what`` once the runtime is closed."""
        if self._res.released:
            raise TrainerClosedError(f"the trainer is closed: {what}() cannot run after close(). Create a new "
                                     "trainer (close(restore_weights=True) keeps the weights in the model)")

    def __enter__(self) -> "OffloadRuntime":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        error = self._shutdown(restore_weights=False)
        if error is None:
            return
        if exc is None:
            raise error
        # the block's own error is the one to see; closing after it failed as well
        logger.warning("closing the trainer after %s also failed: %s", exc_type.__name__, error)

