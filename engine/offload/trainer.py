"""The trainer: a model whose parameters, gradients and optimizer states live on NVMe.

One step, as in DESIGN.md section 3: the :class:`ParameterStreamer` streams weights
for forward and backward; every gradient contribution goes to
:class:`GradientOffload` (NVMe, fp32 accumulation, fused norm/overflow statistics);
at the accumulation boundary the :class:`OptimizerStepper` runs its three-stage
pipeline over all trainable parameters. Small (resident) parameters take the same
path - their store copy is the truth, and the module's copy is refreshed after
every step - so every parameter sees exactly the same arithmetic.
"""
from __future__ import annotations

import math
import os
import time
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._log import logger, warn_once
from ..config import Config
from ..errors import ModelAttachedError, TrainerClosedError
from .planner import DTYPES, MemoryPlan, check_disk, plan as plan_memory
from ..memory.malloc import applied_mmap_threshold, set_mmap_threshold
from ..memory.pool import PinnedPool
from ..memory.profiler import phase as profile_phase
from ..storage import cleanup
from ..storage.aio import AsyncIO
from ..storage.staging import put_chunked  # segment by segment: no full-size staging copy
from ..storage.store import TensorStore
from ..units import format_bytes, parse_bytes
from .gradients import GradientOffload
from .loss_scaler import DynamicLossScaler
from .materialize import initialize_into_store, initialize_meta_buffers
from .params import KEY_ATTR, is_placeholder
from .placement import TrainablePlacement
from .resident import ResidentTrainables
from .stepper import OptimizerStepper, ParamSpec
from .grad_hooks import GradientHooks
from .streamer import ParameterStreamer

Initializer = Callable[[str, tuple[int, ...]], torch.Tensor]

# Models a trainer streams (a weak reference to its _Resources) or whose streamed weights a
# closed trainer released (_RELEASED): a second trainer on either is refused.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
_RELEASED = "released"


class _Resources:
    """What a trainer holds beyond Python memory: the streamer's hooks on the model, the store
    (its swap directory), the I/O ring and its file descriptors, the page-locked pool.

    Released in dependency order by :meth:`Trainer.close` or, for a trainer dropped without
    ``close()``, by its finalizer - so nothing here may refer to the trainer."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.streamer: Optional[ParameterStreamer] = None
        self.grad_hooks: Optional[GradientHooks] = None
        self.grads: Any = None  # GradientOffload, or ResidentTrainables in both roles
        self.stepper: Any = None
        self.store: Optional[TensorStore] = None
        self.io: Optional[AsyncIO] = None
        self.pool: Optional[PinnedPool] = None
        self.released = False

    def release(self, restore_weights: bool = False) -> Optional[BaseException]:
        """Releases everything, each part on its own so one failure stops nothing; returns the
        first error. Later calls do nothing."""
        if self.released:
            return None
        self.released = True
        errors: list[BaseException] = []
        self._detach(restore_weights, errors)
        for part in (self.grads, self.stepper, self.streamer, self.store, self.io, self.pool):
            if part is not None:
                _attempt(part.close, errors)
        _attempt(self._mark_model, errors)
        return errors[0] if errors else None

    def _detach(self, restore_weights: bool, errors: list[BaseException]) -> None:
        """Removes the streamer's hooks; with ``restore_weights`` the streamed weights come back
        into the module (read from the store, which is still open)."""
        if self.grad_hooks is not None:
            self.grad_hooks.remove()
        if self.streamer is None:
            return
        try:
            self.streamer.detach(restore=restore_weights)
        except Exception as exc:
            errors.append(exc)
            _attempt(lambda: self.streamer.detach(restore=False), errors)  # the hooks and staging at least

    def _mark_model(self) -> None:
        """A model left with placeholders refuses to run (never NaN) and to be attached again."""
        held = {id(p) for p in self.model.parameters() if is_placeholder(p.data)}
        if not held:
            _ATTACHED.pop(self.model, None)
            return
        _ATTACHED[self.model] = _RELEASED
        for name, module in self.model.named_modules():
            if any(id(p) in held for p in module.parameters()):
                module.register_forward_pre_hook(_refuse_released(name), prepend=True)
            own = [attr for attr, p in module.named_parameters(recurse=False) if id(p) in held]
            if own:  # nn.Module would turn the placeholder's copy_ error into a generic RuntimeError
                module.register_load_state_dict_pre_hook(_refuse_released_load(name, own))


def _attempt(release: Callable[[], Any], errors: list[BaseException]) -> None:
    try:
        release()
    except Exception as exc:
        errors.append(exc)


_RELEASED_HELP = ("its streamed weights were released when its trainer closed (the parameters are "
                  "placeholders). Evaluate before trainer.close(), or close with "
                  "trainer.close(restore_weights=True) to keep the weights in the model (costs the "
                  "model's size in DRAM)")


def _refuse_released(name: str) -> Callable:
    def hook(module: nn.Module, args: Any) -> None:
        raise TrainerClosedError(f"the trainer is closed: {name or 'the model'} cannot run, {_RELEASED_HELP}")
    return hook


def _refuse_released_load(name: str, attrs: list[str]) -> Callable:
    def hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        for attr in attrs:
            if prefix + attr in state_dict:
                raise TrainerClosedError(f"the trainer is closed: cannot load {prefix + attr!r} into "
                                         f"{name or 'the model'}, {_RELEASED_HELP}")
    return hook


def _check_attachable(model: nn.Module) -> None:
    """Refuses a model that contains, or is part of, a model a live trainer streams or whose
    weights a closed trainer released."""
    inside = {id(m): name for name, m in model.named_modules()}
    for root, state in list(_ATTACHED.items()):
        if id(root) in inside:
            where = f"its submodule {inside[id(root)]!r}" if inside[id(root)] else "the model"
        elif any(m is model for m in root.modules()):
            where = "the model (a part of another model)"
        else:
            continue
        if state == _RELEASED:
            raise TrainerClosedError(f"cannot initialize a trainer: {where} was used by a trainer that is "
                                     f"closed; {_RELEASED_HELP}; or build the model again")
        if state() is not None and not state().released:
            raise ModelAttachedError(f"cannot initialize a trainer: {where} is already attached to a live "
                                     "trainer (its weights are on that trainer's NVMe store). Call close() "
                                     "on that trainer first (close(restore_weights=True) keeps the weights "
                                     "in the model), or train a copy of the model")


def _weak_on_grad(trainer: "Trainer") -> Callable[[str, torch.Tensor], None]:
    """The gradient hooks' callback: a weak reference, so hooks left on the user's model never
    keep a dropped trainer (and its swap file, pool and file descriptors) alive."""
    method = weakref.WeakMethod(trainer._on_grad)

    def on_grad(name: str, grad: torch.Tensor) -> None:
        target = method()
        if target is None:
            raise TrainerClosedError(f"the trainer is closed: a gradient of {name!r} arrived after its "
                                     "trainer was garbage-collected")
        target(name, grad)

    return on_grad


def _finalize(resources: _Resources) -> None:
    """A trainer dropped without ``close()``: releases what it held (at garbage collection or exit)."""
    error = resources.release()
    if error is not None:
        logger.warning("a Trainer dropped without close() was released; releasing it failed: %s", error)
    else:
        logger.info("a Trainer dropped without close() was released (swap files removed, pool freed)")


class OffloadedOptimizer(torch.optim.Optimizer):
    """The trainer's optimizer as torch sees it: ``param_groups`` carry lr and weight decay
    (so torch LR schedulers work), and :meth:`step` runs the offloaded update."""

    def __init__(self, params, defaults: dict, trainer: "Trainer"):
        super().__init__(params, defaults)
        self._trainer = weakref.ref(trainer)  # no cycle: a dropped trainer goes with its last reference

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch's signature
        if closure is not None:
            raise ValueError("the offloaded optimizer does not take a closure")
        trainer = self._trainer()
        if trainer is None:
            raise TrainerClosedError("the trainer is closed: optimizer.step() cannot run, its trainer was "
                                     "garbage-collected (keep a reference to the trainer while training)")
        trainer._apply_step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients live on NVMe and are overwritten by the next window's first micro-batch."""


class Trainer:
    """Returned by :func:`engine.initialize`. Use it like the model plus DeepSpeed's engine API."""

    def __init__(self, model: nn.Module, config: Config, initializer: Optional[Initializer] = None, *,
                 buffer_initializer: Optional[Initializer] = None):
        _check_attachable(model)  # before anything of the model is touched
        if buffer_initializer is not None:
            initialize_meta_buffers(model, buffer_initializer)
        self.config = config
        self.module = model
        self.compute_dtype = DTYPES[config.dtype]
        self.frozen_dtype = DTYPES[config.frozen_dtype or config.dtype]  # requires_grad=False parameters
        self.mixed = self.compute_dtype != torch.float32
        self._res = _Resources(model)
        _ATTACHED[model] = weakref.ref(self._res)
        self._finalizer = weakref.finalize(self, _finalize, self._res)
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0
        self._grads_since_step = False  # a step() with none changes nothing (as torch.optim)
        self._timers = dict(forward_s=0.0, backward_s=0.0, step_s=0.0)
        on_meta = any(p.device.type == "meta" for p in model.parameters())
        try:
            self._build(initializer)
        except BaseException:
            # Give an in-memory model its weights back; a meta-built one has nowhere to keep them.
            error = self._shutdown(restore_weights=not on_meta)
            if error is not None:
                logger.warning("releasing a trainer whose initialization failed also failed: %s", error)
            raise

    # The parts the trainer owns live in _Resources (so a finalizer can release them).
    _store = property(lambda self: self._res.store)
    _io = property(lambda self: self._res.io)
    _pool = property(lambda self: self._res.pool)
    _streamer = property(lambda self: self._res.streamer)
    _stepper = property(lambda self: self._res.stepper)
    _grads = property(lambda self: self._res.grads)
    _closed = property(lambda self: self._res.released)

    # The runtime's typed surface (what checkpointing, export and the profiler use).
    store = property(lambda self: self._res.store)
    pool = property(lambda self: self._res.pool)
    io = property(lambda self: self._res.io)
    streamer = property(lambda self: self._res.streamer)
    gradients = property(lambda self: self._res.grads)
    backend = property(lambda self: self._res.stepper)
    trainable = property(lambda self: self._specs)
    resident_trainables = property(lambda self: self._resident)
    closed = property(lambda self: self._res.released)
    runtime = property(lambda self: self)  # the facade's runtime, until the split

    @property
    def placement(self) -> TrainablePlacement:
        return TrainablePlacement.DRAM if self.plan.trainable_in_memory else TrainablePlacement.NVME

    @property
    def poisoned(self):
        return getattr(self, "_checkpoint_poisoned", None)

    @poisoned.setter
    def poisoned(self, value):
        self._checkpoint_poisoned = value

    def invalidate(self) -> None:
        self._streamer.invalidate()
        self._grads.begin_window()

    # ------------------------------------------------------------------ construction
    def _build(self, initializer: Optional[Initializer]) -> None:
        cfg, model = self.config, self.module
        if cfg.offload_params != "nvme" or cfg.offload_optimizer != "nvme":
            raise NotImplementedError("this engine currently offloads both parameters and optimizer states to NVMe "
                                      "(offload_params='nvme', offload_optimizer='nvme')")
        if cfg.malloc_mmap_threshold is not None:
            set_mmap_threshold(parse_bytes(cfg.malloc_mmap_threshold))
        on_meta = any(p.device.type == "meta" for p in model.parameters())
        if on_meta and initializer is None:
            raise ValueError("the model is on the meta device: pass initializer(name, shape) -> tensor "
                             "(or load it with engine.from_pretrained)")
        self.plan: MemoryPlan = plan_memory(model, cfg)
        res = self._res
        paths = cfg.nvme_paths
        if paths is None:  # the store makes its private swap directory in there and removes it
            paths = [cleanup.default_swap_root()]
        for p in paths:
            if not os.path.isdir(p):
                raise FileNotFoundError(2, f"NVMe path {p!r} does not exist or is not a directory", p)
        check_disk(self.plan, paths)
        pinned_torch = cfg.pinned_alloc == "torch"
        res.pool = PinnedPool(self.plan.pool_bytes)
        res.io = AsyncIO(cfg.aio_backend, queue_depth=cfg.queue_depth, block_size=parse_bytes(cfg.block_size),
                         pool=self._pool)
        res.store = TensorStore(paths, layout=cfg.store, io=self._io, checksum=cfg.checksum,
                                stripe_size=self.plan.segment_elements * 4)
        self._store.ensure_capacity(self.plan.disk_bytes, self.plan.disk_largest_extent)
        store = self._store

        trainable = self._trainable_names(model)
        in_memory = self.plan.trainable_in_memory
        masters: dict[str, torch.Tensor] = {}  # fp32 masters of in-memory trainable parameters (mixed)

        def keep_master(name: str, value: torch.Tensor) -> None:
            if not self.mixed:
                return
            if in_memory:
                masters[name] = value.detach().float().clone()
            else:
                put_chunked(store, ("master", name), value.detach().float(), self._pool)

        for name, p in model.named_parameters():  # real trainable ones (e.g. adapters on a meta base)
            if name in trainable and p.device.type != "meta":
                keep_master(name, p)
        if on_meta:
            user_init = initializer

            def init(name: str, shape: tuple[int, ...]) -> torch.Tensor:
                value = user_init(name, shape)
                if value is not None and name in trainable:
                    keep_master(name, value)
                return value  # cast to the parameter's dtype by initialize_into_store

            self._cast_parameters(model)
            initialize_into_store(model, store, init, resident_threshold_bytes=cfg.resident_threshold_bytes,
                                  pool=self._pool, resident_trainable=in_memory)
        else:
            self._cast_parameters(model)
        res.streamer = ParameterStreamer(
            model, store, None if pinned_torch else self._pool, prefetch_depth=self.plan.prefetch_depth,
            resident_threshold_bytes=cfg.resident_threshold_bytes, buffer_pool=cfg.buffer_pool,
            buffer_count=cfg.buffer_count if cfg.buffer_pool == "uniform" else None, pinned_alloc=cfg.pinned_alloc,
            restore_on_exit=False, resident_trainable=in_memory)
        self._streamer.attach()
        res.grad_hooks = GradientHooks(model, _weak_on_grad(self)).install()
        # Only an optimizer step on a streamed weight makes staged copies stale (PEFT: never).
        self._streamed_trainable = any(sp.param.requires_grad for sp in self._streamer.params.streamed.values())
        # Resident trainable parameters on the NVMe path: their store copy is what the optimizer updates.
        self._resident = {} if in_memory else \
            {name: p for name, p in self._streamer.params.resident if name in trainable}
        for name, p in self._resident.items():
            store.put(("param", name), p.detach())
        params = [p for name, p in model.named_parameters() if name in trainable]
        specs = [ParamSpec(name, tuple(p.shape)) for name, p in model.named_parameters() if name in trainable]
        self._specs = specs
        opt = cfg.optimizer
        if opt.type == "sgd":
            raise NotImplementedError("SGD is not implemented for NVMe offload yet; use adamw or adam")
        self.optimizer = OffloadedOptimizer(params, dict(lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                                         weight_decay=opt.weight_decay), self)
        group = self.optimizer.param_groups[0]
        if in_memory:
            # One object in both roles: gradients and optimizer state stay in DRAM.
            res.stepper = res.grads = ResidentTrainables(
                [(n, p) for n, p in model.named_parameters() if n in trainable], masters,
                state_dtype=DTYPES[cfg.optimizer_state_dtype],
                betas=opt.betas, eps=opt.eps, adamw_mode=opt.type == "adamw",
                group_hparams=lambda g: (group["lr"], group["weight_decay"]), overflow_check=cfg.overflow_check)
            self._grads.begin_window()
        else:
            self._build_nvme_optimizer(cfg, store, specs, group)
        self.scaler = DynamicLossScaler(2.0 ** cfg.initial_scale_power, cfg.loss_scale_window, cfg.hysteresis,
                                        cfg.min_loss_scale, dynamic=cfg.loss_scale == 0) \
            if cfg.dtype == "fp16" else None
        if self.scaler is not None and cfg.loss_scale:
            self.scaler.scale = float(cfg.loss_scale)
        logger.info("engine initialized: pool %s, disk %s, prefetch %d, backend %s",
                    format_bytes(self.plan.pool_bytes), format_bytes(self.plan.disk_bytes),
                    self.plan.prefetch_depth, self._io.backend)

    def _build_nvme_optimizer(self, cfg: Config, store: TensorStore, specs: list[ParamSpec], group: dict) -> None:
        """The NVMe path: pipelined stepper over store-resident states, gradients offloaded as produced."""
        opt = cfg.optimizer
        self._res.stepper = OptimizerStepper(
            store, self._pool, specs, compute_dtype=self.compute_dtype,
            state_dtype=DTYPES[cfg.optimizer_state_dtype],
            sub_group_elements=self.plan.sub_group_elements, betas=opt.betas, eps=opt.eps,
            adamw_mode=opt.type == "adamw", group_hparams=lambda g: (group["lr"], group["weight_decay"]))
        self._stepper.initialize_states()
        self._res.grads = GradientOffload(store, self._pool, specs, grad_buffer=cfg.grad_buffer,
                                          overflow_check=cfg.overflow_check,
                                          staging_bytes=self.plan.grad_staging_bytes,
                                          flat_dtype=self.compute_dtype if self.mixed else torch.float32)
        self._grads.begin_window()

    def _cast_parameters(self, model: nn.Module) -> None:
        """Trainable parameters to the compute dtype, frozen ones to ``frozen_dtype``."""
        if self.frozen_dtype == self.compute_dtype:
            if self.mixed:
                model.to(self.compute_dtype)
            return
        for p in {id(p): p for p in model.parameters()}.values():
            target = self.compute_dtype if p.requires_grad else self.frozen_dtype
            if p.is_floating_point() and p.dtype != target:
                p.data = p.data.to(target)

    @staticmethod
    def _trainable_names(model: nn.Module) -> set[str]:
        seen, names = set(), set()
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                names.add(name)
        return names

    # ------------------------------------------------------------------ training API
    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_open("forward")
        start = time.perf_counter()
        try:
            with profile_phase("forward"):  # shaded in a running MemoryProfiler's timeline
                return self.module(*args, **kwargs)
        finally:
            self._timers["forward_s"] += time.perf_counter() - start

    def _window_position(self) -> tuple[bool, bool]:
        gas = self.gradient_accumulation_steps
        micro = self.micro_steps % gas
        return micro == 0, micro == gas - 1

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        self._check_open("backward")
        first, last = self._window_position()
        self._grads.add(name, grad, first, last)
        self._grads_since_step = True

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagates ``loss / gradient_accumulation_steps`` (times the fp16 loss scale)."""
        self._check_open("backward")
        start = time.perf_counter()
        scaled = loss.float() / self.gradient_accumulation_steps
        if self.scaler is not None:
            scaled = scaled * self.scaler.scale
        with profile_phase("backward"):
            scaled.backward()
        self._timers["backward_s"] += time.perf_counter() - start

    def step(self) -> None:
        """Call after every micro-batch; the optimizer runs at the accumulation boundary.

        Like ``torch.optim``, which skips parameters without a gradient: a ``step()`` with no
        gradient since the previous one (no ``backward()``) changes nothing - no weight decay,
        no moment update - and counts no micro-batch or step; it warns once."""
        self._check_open("step")
        if not self._grads_since_step:
            self._warn_no_gradients("step")
            return
        self._grads_since_step = False
        self.micro_steps += 1
        if self.micro_steps % self.gradient_accumulation_steps == 0:
            with profile_phase("optimizer"):
                self.optimizer.step()

    def zero_grad(self) -> None:
        """Gradients live on NVMe and are overwritten by the next window's first micro-batch."""

    def _warn_no_gradients(self, what: str) -> None:
        warn_once(f"no-gradients-{what}",
                  f"Trainer.{what}() with no gradient since the last step (no backward()): skipped, nothing "
                  f"updated and no step counted (global_steps stays {self.global_steps}), as torch.optim "
                  "skips parameters without a gradient")

    def _apply_step(self) -> None:
        self._check_open("optimizer.step")
        if not self._grads.received:  # optimizer.step() called directly on an empty window
            self._warn_no_gradients("optimizer.step")
            return
        start = time.perf_counter()
        norm, overflow = self._grads.finish()
        scale = self.loss_scale
        if overflow:
            if self.scaler is None:
                logger.warning("non-finite gradient at step %d; the step is skipped", self.global_steps + 1)
            self.skipped_steps += 1
            if self.scaler is not None:
                self.scaler.update(True)
                logger.info("fp16 overflow: step skipped, loss scale -> %g", self.scaler.scale)
        else:
            true_norm = norm / scale
            clip = 1.0
            if self.config.gradient_clipping > 0:
                clip = min(1.0, self.config.gradient_clipping / (true_norm + 1e-6))
            self.global_steps += 1
            self._stepper.step(self.global_steps, grad_scale=clip / scale, grad_source=self._grads.grad_source())
            if self._streamed_trainable:
                self._streamer.invalidate()  # staged weights are the old ones now
            self._refresh_resident()
            if self.scaler is not None:
                self.scaler.update(False)
        self.last_grad_norm = norm / scale if not overflow else math.inf
        self._grads.begin_window()
        self._timers["step_s"] += time.perf_counter() - start

    def _refresh_resident(self) -> None:
        for name, p in self._resident.items():
            p.data.copy_(self._store.get(("param", name)).view(p.shape))

    def train(self, mode: bool = True) -> "Trainer":
        self.module.train(mode)
        return self

    def eval(self) -> "Trainer":
        return self.train(False)

    # ------------------------------------------------------------------ reporting
    def parameter(self, name: str) -> torch.Tensor:
        """The current value of a trainable parameter (fp32 master when mixed precision)."""
        self._check_open("parameter")
        if isinstance(self._stepper, ResidentTrainables):
            return self._stepper.master(name).detach()
        key = ("master", name) if self.mixed else ("param", name)
        return self._store.get(key)

    def weight(self, name: str) -> torch.Tensor:
        """The current value of any parameter, trainable or frozen, read on its own (frozen streamed
        weights from the store, one tensor at a time): trainable ones as :meth:`parameter`."""
        self._check_open("weight")
        param = dict(self.module.named_parameters(remove_duplicate=False)).get(name)
        if param is None:
            raise KeyError(f"{name!r} is not a parameter of the model")
        if param.requires_grad:
            canonical = next(n for n, p in self.module.named_parameters() if p is param)
            return self.parameter(canonical).view(param.shape)
        key = getattr(param, KEY_ATTR, None)
        if key is not None and is_placeholder(param.data):
            return self._store.get(key).view(param.shape)
        return param.detach()

    def save_adapter(self, directory: str) -> list[str]:
        """Saves the LoRA adapters in peft's format (``PeftModel.from_pretrained`` loads them)."""
        self._check_open("save_adapter")
        from ..peft import save_adapter

        return save_adapter(self, directory)

    def merge_and_export(self, directory: str, *, max_shard_size="5GB", dtype: Optional[torch.dtype] = None) -> list[str]:
        """Streams the base weights with the adapters merged to safetensors shards, one tensor at a time."""
        self._check_open("merge_and_export")
        from ..peft import merge_and_export

        return merge_and_export(self, directory, max_shard_size=max_shard_size, dtype=dtype)

    def memory_report(self) -> dict:
        """Backend, pool stats, peak RSS, bytes read/written and bandwidth, I/O wait vs compute time."""
        self._check_open("memory_report")
        status = _proc_status()
        store = self._store.stats()
        streamer = self._streamer.stats()
        stepper = self._stepper.stats
        io_wait = streamer.get("wait_s", 0.0) + stepper.read_wait_s + stepper.write_wait_s
        return dict(
            backend=self._io.backend, fixed_buffers=self._io.fixed_buffers, malloc_mmap_threshold=applied_mmap_threshold(),
            pool=self._pool.stats(), plan=dict(pool_bytes=self.plan.pool_bytes, disk_bytes=self.plan.disk_bytes,
                                               prefetch_depth=self.plan.prefetch_depth,
                                               predicted_peak_bytes=self.plan.predicted_peak_bytes),
            peak_rss_bytes=status.get("VmHWM", 0), rss_bytes=status.get("VmRSS", 0),
            locked_bytes=status.get("VmLck", 0),
            bytes_read=store["bytes_read"], bytes_written=store["bytes_written"],
            io_wait_s=io_wait, optimizer_compute_s=stepper.compute_s, **self._timers,
            steps=self.global_steps, skipped_steps=self.skipped_steps, streamer=streamer,
        )

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

    def _check_open(self, what: str) -> None:
        if self._res.released:
            raise TrainerClosedError(f"the trainer is closed: {what}() cannot run after close(). Create a new "
                                     "trainer (close(restore_weights=True) keeps the weights in the model)")

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        error = self._shutdown(restore_weights=False)
        if error is None:
            return
        if exc is None:
            raise error
        # the block's own error is the one to see; closing after it failed as well
        logger.warning("closing the trainer after %s also failed: %s", exc_type.__name__, error)

    # ------------------------------------------------------------------ checkpoints (engine/checkpoint)
    def save_checkpoint(self, save_dir: str, client_state: Optional[dict] = None, *, tag: Optional[str] = None,
                        lr_scheduler: Any = None, keep_last: Optional[int] = None,
                        max_shard_size: "int | str" = "2GiB") -> str:
        """Saves the complete training state under ``save_dir/<tag>`` and points ``save_dir/latest`` at it.

        Weights, fp32 masters, Adam moments, step counters, loss scaler, optimizer param groups,
        ``lr_scheduler.state_dict()`` (when given), RNG states and ``client_state`` (JSON values,
        e.g. the data position), as safetensors shards plus ``manifest.json`` with CRC32Cs. Crash
        safe: written under a temporary name, fsync'ed, renamed; ``latest`` moves last. Keeps the
        ``keep_last`` newest checkpoints (default ``config.checkpoint_keep_last``; 0 keeps all).
        Call at an accumulation boundary. ``tag`` defaults to ``step-<global_steps>``. Returns
        the checkpoint's directory."""
        from ..checkpoint.state import save_checkpoint

        self._check_open("save_checkpoint")
        with profile_phase("checkpoint"):
            return save_checkpoint(self, save_dir, client_state, tag=tag, lr_scheduler=lr_scheduler,
                                   keep_last=keep_last, max_shard_size=max_shard_size)

    def load_checkpoint(self, load_dir: str, *, tag: Optional[str] = None, lr_scheduler: Any = None,
                        load_rng: bool = True, convert_dtype: bool = False) -> tuple[str, dict]:
        """Restores what :meth:`save_checkpoint` saved (``latest`` unless ``tag``; ``load_dir`` may
        also be a checkpoint directory itself) and returns ``(path, client_state)``.

        Every file and tensor is checked against the manifest's CRC32Cs; shape mismatches are
        listed in one error. A checkpoint saved with another ``dtype``/``optimizer_state_dtype`` is
        refused unless ``convert_dtype=True``. Pass the same kind of ``lr_scheduler`` to restore
        its state; ``load_rng=False`` leaves the RNGs alone."""
        from ..checkpoint.state import load_checkpoint

        self._check_open("load_checkpoint")
        with profile_phase("checkpoint"):
            loaded = load_checkpoint(self, load_dir, tag=tag, lr_scheduler=lr_scheduler, load_rng=load_rng,
                                     convert_dtype=convert_dtype)
        self._grads_since_step = False  # a backward() before the load belongs to the state it replaced
        return loaded

    def save_pretrained(self, save_dir: str, *, max_shard_size: "int | str" = "5GB",
                        dtype: Optional[torch.dtype] = None) -> list[str]:
        """Writes the weights as Hugging Face sharded safetensors (``model.safetensors`` or
        ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) with ``config.json``,
        streamed from the store one tensor at a time. ``dtype``: export dtype (default: the
        model's compute dtype; ``torch.float32`` exports the fp32 masters). Returns the files."""
        from ..checkpoint.hf import save_pretrained

        self._check_open("save_pretrained")
        return save_pretrained(self, save_dir, max_shard_size=max_shard_size, dtype=dtype)


def _proc_status() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "VmLck"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out
