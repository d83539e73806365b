"""Trainable parameters kept in DRAM: fp32 gradients and the native CPU AdamW in memory.

For partial fine-tuning (PEFT) the trainable parameters are a tiny fraction of the model
(LoRA at r=16 on a 7B model: ~40M parameters, 640 MB of state). Keeping them, their fp32
gradients and their Adam moments in memory costs less DRAM than the pinned gradient
staging and three optimizer buffer sets the NVMe path needs, and does no I/O; the
planner chooses this placement (``trainable_placement``). Only the frozen base streams.

The DRAM placement's two roles (:mod:`engine.offload.placement`):

* :class:`DramGradients` is the :class:`~engine.offload.placement.GradientSink`: one fp32
  buffer per trainable parameter, accumulated in place over the window.
* :class:`DramOptimizer` is the :class:`~engine.offload.placement.OptimizerBackend`:
  :class:`~engine.optim.CPUAdamW` (the fused kernel) over fp32 master weights - the module's
  own parameters in fp32, or fp32 copies whose update is written back to the bf16/fp16
  parameters in the same pass. It reads the gradients straight from the sink it is given
  (the buffers are shared explicitly, never copied).

On a copying compute device (CUDA, or the CPU "separate" mode: ``copies=True``) the module's
parameters are not host tensors the optimizer may update in place: gradients are copied into
the host buffers (counted as ``device_stats["d2h_bytes"]``), the optimizer works on host fp32
masters of *every* trainable parameter (fp32 ones too), and after each step the new values are
copied to the module's parameters (low-precision ones through the ``out=`` host copy).

Several ranks: :class:`DramGradients` averages each gradient across ranks at the window's last
micro-batch, as the NVMe sink does (:mod:`engine.offload.gradients`: the same rule and the same
static-graph limitation); a gradient received earlier in the window but not in its last
micro-batch is averaged in :meth:`DramGradients.finish`, in parameter order. A parameter no rank
gave a gradient is skipped by the optimizer on every rank, as torch skips it.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..distributed import DistributedSpec, all_reduce_mean_, check_same_sequence
from ..dtypes import FP32_BYTES
from ..optim import CPUAdamW, kernels
from ..validate import OverflowCheck, check_choice
from .placement import GradFill
from .stepper import StepStats


class DramGradients:
    """fp32 gradient buffers of trainable parameters that live in DRAM (the GradientSink role).

    Args:
        params: ``(name, parameter)`` of every trainable parameter (tied ones once).
        overflow_check: ``"fused"`` (one native pass per gradient) or ``"naive"`` (torch
            isinf/isnan temporaries, the ablation baseline).
    """

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]], *, overflow_check: OverflowCheck = "fused",
                 copies: bool = False, distributed: Optional[DistributedSpec] = None):
        check_choice("overflow_check", overflow_check, OverflowCheck)  # also built without a Config (tests)
        self.overflow_check = overflow_check
        self.copies = copies
        self.device_stats: dict = dict(d2h_bytes=0, d2h_wait_s=0.0)
        # The buffers the optimizer reads (DramOptimizer): one per parameter, allocated once.
        self.buffers: dict[str, torch.Tensor] = {name: torch.zeros(p.shape, dtype=torch.float32)
                                                 for name, p in params}
        self.received: set[str] = set()
        self._dist = distributed if distributed is not None and distributed.is_distributed else None
        self._averaged: set[str] = set()  # averaged across ranks in this window
        self._order: list[str] = []  # ... in the order they were averaged
        self._closed = False

    def begin_window(self) -> None:
        """Starts a new accumulation window."""
        self.received.clear()
        self._averaged.clear()
        self._order.clear()

    def _mean(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        assert self._dist is not None
        self._order.append(name)
        return all_reduce_mean_(tensor, self._dist, f"gradient of {name!r}")

    def add(self, name: str, grad: torch.Tensor, first: bool, last: bool) -> None:
        """Accumulates one gradient contribution of ``name`` in fp32 (``first``: overwrite)."""
        buf = self.buffers.get(name)
        if buf is None:
            raise KeyError(f"{name!r} is not a trainable parameter kept in memory")
        if grad.numel() != buf.numel():
            raise ValueError(f"gradient of {name!r} has {grad.numel()} elements, expected {buf.numel()}")
        grad = grad.detach().reshape(buf.shape)
        average = last and self._dist is not None
        if average and name in self._averaged:  # a later contribution of the last micro-batch: its own average
            grad = self._mean(name, grad.float().clone())
        start = time.perf_counter()
        if name not in self.received:  # its first contribution in this window (whatever the micro-batch)
            buf.copy_(grad)  # CUDA: a synchronous D2H (adapters are small)
        else:
            buf.add_(grad.to(buf.device))
        if average and name not in self._averaged:
            self._mean(name, buf)
            self._averaged.add(name)
        if self.copies:
            self.device_stats["d2h_bytes"] += grad.numel() * grad.element_size()
            self.device_stats["d2h_wait_s"] += time.perf_counter() - start
        self.received.add(name)

    def finish(self) -> tuple[float, bool]:
        """(global L2 norm, any inf/NaN) of the window's accumulated gradients."""
        if self._dist is not None:  # received, not in the last micro-batch: averaged now, in parameter order
            # The ranks must have averaged the same gradients in the same order, and received the same
            # ones: else their averages paired different tensors, or the loop below would not match.
            check_same_sequence(self._dist, self._order + ["received:"] + [n for n in self.buffers
                                                                             if n in self.received],
                                "gradients of the window (every rank must produce the same gradients in "
                                "the same order)")
            for name in self.buffers:
                if name in self.received and name not in self._averaged:
                    self._mean(name, self.buffers[name])
                    self._averaged.add(name)
        sumsq, bad = 0.0, False
        for name in [n for n in self.buffers if n in self.received]:  # parameter order: the same sum on every rank
            g = self.buffers[name]
            if self.overflow_check == "fused":
                s, b = kernels.grad_stats(g)
            else:
                b = bool(torch.isinf(g).any()) or bool(torch.isnan(g).any())
                s = float(g.double().pow(2).sum()) if not b else math.inf
            sumsq += s
            bad = bad or bool(b)
        return (math.inf if bad else math.sqrt(sumsq)), bad

    def grad_source(self) -> Optional[GradFill]:
        """Gradients are in memory; the optimizer takes them from :attr:`buffers` directly."""
        return None

    @property
    def nbytes(self) -> int:
        return sum(g.numel() * FP32_BYTES for g in self.buffers.values())

    def close(self) -> None:
        """Drops the buffers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.buffers.clear()


class DramOptimizer:
    """CPUAdamW over the fp32 masters of trainable parameters that live in DRAM (the
    OptimizerBackend role).

    Args:
        params: ``(name, parameter)`` of every trainable parameter (tied ones once), resident
            in the module (contiguous, on the CPU).
        gradients: the sink whose buffers hold the window's gradients.
        masters: fp32 master weights by name for parameters whose dtype is not fp32 (missing
            ones are seeded from the parameter); fp32 parameters are their own master, except
            with ``copies`` (a copying compute device), where every parameter gets a host master
            and the module's parameters receive copies after each step.
        state_dtype: dtype of the Adam moments.
        group_hparams: ``group_hparams(g) -> (lr, weight_decay)`` of param group g, read at every
            step so LR schedulers acting on the trainer's optimizer apply.
        groups: the param group of each parameter by name (default: all in group 0).
    """

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]], gradients: DramGradients,
                 masters: Optional[dict[str, torch.Tensor]] = None, *, state_dtype: torch.dtype = torch.float32,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, adamw_mode: bool = True,
                 group_hparams: Callable[[int], tuple[float, float]] = lambda g: (1e-3, 0.0),
                 copies: bool = False, groups: Optional[Mapping[str, int]] = None):
        masters = masters or {}
        self.copies = copies
        self.params = dict(params)
        self.gradients = gradients
        self.group_hparams = group_hparams
        self.masters: dict[str, torch.Tensor] = {}
        self._out: dict[torch.Tensor, torch.Tensor] = {}  # master -> low-precision parameter data
        self._to_module: list[tuple[nn.Parameter, torch.Tensor]] = []  # copies: (parameter, host value)
        for name, p in self.params.items():
            if copies:
                self._add_copied(name, p, masters.get(name))
                continue
            if p.device.type != "cpu":
                raise ValueError(f"{name}: trainable parameters on {p.device} need copies=True (a copying "
                                 f"compute device); without it they must be on the CPU")
            if p.dtype == torch.float32:
                if not p.data.is_contiguous():
                    p.data = p.data.contiguous()
                self.masters[name] = p.data
            else:
                master = masters.get(name)
                master = p.detach().float() if master is None else master.detach().float().reshape(p.shape)
                self.masters[name] = master.contiguous().clone()
                if not p.data.is_contiguous():
                    p.data = p.data.contiguous()
                self._out[self.masters[name]] = p.data
        # One CPUAdamW group per engine param group that has members here: _group_ids[i] is
        # the engine group of CPUAdamW group i (its lr / weight decay are read at each step).
        group_of = (lambda name: 0) if groups is None else groups.__getitem__  # given: every name is in it
        self._group_ids = sorted({group_of(name) for name in self.masters})
        self.optimizer = CPUAdamW(
            [dict(params=[m for name, m in self.masters.items() if group_of(name) == g],
                  **dict(zip(("lr", "weight_decay"), group_hparams(g)))) for g in self._group_ids],
            betas=betas, eps=eps, adamw_mode=adamw_mode, state_dtype=state_dtype)
        self.stats = StepStats()
        self._closed = False

    def _add_copied(self, name: str, p: nn.Parameter, given: Optional[torch.Tensor]) -> None:
        """A host fp32 master distinct from the parameter (and a host low-precision buffer the
        kernel writes for a bf16/fp16 one); the module's parameter is a copy of it."""
        source = p.detach() if given is None or p.dtype == torch.float32 else given.detach()
        master = source.to("cpu", torch.float32).reshape(p.shape).contiguous().clone()
        self.masters[name] = master
        if p.dtype == torch.float32:
            self._to_module.append((p, master))
        else:
            host = torch.empty(p.shape, dtype=p.dtype)
            self._out[master] = host
            self._to_module.append((p, host))

    def stands_for_param(self, name: str) -> bool:
        """True when the fp32 master *is* the parameter's value, kept apart from it only because the
        parameter lives on a copying device (a checkpoint saves it as the parameter, not a master)."""
        return self.copies and self.params[name].dtype == torch.float32

    def sync_module(self) -> None:
        """Copies the masters' current values to the module's parameters (copying devices)."""
        for p, value in self._to_module:
            p.data.copy_(value)

    def initialize_states(self) -> None:
        """Moments are created by the first step (as torch's AdamW does)."""

    def step(self, step: int, grad_scale: float = 1.0, grad_source: Optional[GradFill] = None) -> None:
        """One AdamW step over the parameters that received a gradient this window (as torch skips
        parameters whose ``grad`` is None); ``grad_scale`` multiplies every gradient first."""
        start = time.perf_counter()
        for group, g in zip(self.optimizer.param_groups, self._group_ids):
            group["lr"], group["weight_decay"] = self.group_hparams(g)
        grads = self.gradients
        for name in grads.received:
            self.masters[name].grad = grads.buffers[name]
        try:
            self.optimizer.step(grad_scale=grad_scale, out=self._out or None)
        finally:
            # autograd must not accumulate into these: the next gradient arrives through the sink
            for master in self.masters.values():
                master.grad = None
        self.sync_module()  # copying devices: the new values to the module (CUDA: H2D)
        self.stats.compute_s += time.perf_counter() - start

    def master(self, name: str) -> torch.Tensor:
        """The fp32 master weights of ``name`` (the parameter itself when it is fp32)."""
        return self.masters[name]

    @property
    def state_bytes(self) -> int:
        """DRAM held beyond the parameters: fp32 masters (mixed), gradients, moments."""
        total = sum(m.numel() * FP32_BYTES for m in self.masters.values() if self.copies or m in self._out)
        total += sum(h.numel() * h.element_size() for h in self._out.values()) if self.copies else 0
        total += self.gradients.nbytes
        for state in self.optimizer.state.values():
            total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq") if k in state)
        return total

    def close(self) -> None:
        """Drops the optimizer state (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.optimizer.state.clear()
