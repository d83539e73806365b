"""DeepSpeed's warmup LR schedules as torch ``LRScheduler`` subclasses on the engine optimizer.

The formulas are DeepSpeed's (``deepspeed/runtime/lr_schedules.py`` of deepspeedai/DeepSpeed,
commit 22779f2, read for this module; no code taken), with ``t`` DeepSpeed's
``last_batch_iteration`` (-1 before the first ``step()``, +1 per scheduler step),
``W = max(2, warmup_num_steps)`` and ``T = total_num_steps``:

- warmup fraction ``g(t) = log(t + 1) / log(W)`` (``warmup_type="log"``, the default) or
  ``t / W`` (``"linear"``), for ``0 <= t < W``;
- ``WarmupLR``: ``lr = min_lr + (max_lr - min_lr) * g(t)``; ``g = 1`` once ``t >= W``; ``min_lr`` at ``t < 0``;
- ``WarmupDecayLR``: as WarmupLR during warmup, then ``g = max(0, (T - t) / max(1, T - W))``;
- ``WarmupCosineLR``: ``lr = base_lr * r(t)``; warmup ``r = warmup_min_ratio + g(t) * (1 - warmup_min_ratio)``,
  then with ``p = min(1, (t - W + 1) / max(1, T - W))``:
  ``r = max(0, cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2)``; ``r = 0`` at ``t < 0``.

As in DeepSpeed, building a schedule sets the optimizer's lr to its ``t = -1`` value (the first
optimizer step runs at it), the engine steps the schedule after each applied optimizer step,
and ``step(last_batch_iteration=n)`` jumps to ``t = n``. torch's ``last_epoch`` is ``t + 1``
(torch counts its own initial step). ``state_dict()`` is DeepSpeed's, the counter only
(``{"last_batch_iteration": t}``): a resumed schedule keeps the counter and takes every
setting (steps, lrs, warmup) from the config it was built with, as DeepSpeed's does.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch.optim.lr_scheduler import LRScheduler

from .._log import logger
from ..errors import CheckpointError, ConfigError
from ..validate import check_int, check_number

LOG, LINEAR = "log", "linear"
Numbers = Union[float, Sequence[float]]


def _per_group(optimizer: torch.optim.Optimizer, value: Numbers, name: str) -> list[float]:
    n = len(optimizer.param_groups)
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ConfigError(f"scheduler.params.{name}: {len(values)} values for {n} optimizer param groups",
                          f"scheduler.params.{name}")
    return [check_number(f"scheduler.params.{name}", v) for v in values]


def _warmup_type(value: str) -> str:
    if value not in (LOG, LINEAR):
        # DeepSpeed warns and falls back to log; so does this (one warning naming the value)
        logger.warning("scheduler.params.warmup_type %r is unknown (log or linear): using log", value)
        return LOG
    return value


def check_iteration(value: Any, name: str = "lr_kwargs.last_batch_iteration") -> int:
    """A schedule position ``t`` passed to ``step``: an int >= -1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ConfigError(f"{name} must be an int >= -1, got {value!r}", name)
    return value


def check_step_kwargs(scheduler: Any, kwargs: Mapping[str, Any]) -> None:
    """Checks ``scheduler.step(**kwargs)`` would accept ``kwargs`` (names, and DeepSpeed's
    ``last_batch_iteration``), so a bad one is refused before the optimizer steps."""
    try:
        inspect.signature(scheduler.step).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"step(lr_kwargs={dict(kwargs)!r}): {type(scheduler).__name__}.step does not take them "
                          f"({exc})", "lr_kwargs") from None
    if isinstance(scheduler, _Warmup) and kwargs.get("last_batch_iteration") is not None:
        check_iteration(kwargs["last_batch_iteration"])


class _Warmup(LRScheduler):
    """The warmup part shared by the three schedules; subclasses give ``_lr(t, group)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_num_steps: int, warmup_type: str,
                 last_batch_iteration: int) -> None:
        if last_batch_iteration != -1:
            raise ConfigError("scheduler.params.last_batch_iteration: only -1 (a new schedule) is supported; "
                              "resume a schedule with load_checkpoint", "scheduler.params.last_batch_iteration")
        self.warmup_num_steps = max(2, check_int("scheduler.params.warmup_num_steps", warmup_num_steps))
        self.warmup_type = _warmup_type(warmup_type)
        super().__init__(optimizer)  # torch's initial step sets the t = -1 lr, as DeepSpeed's constructor does

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's counter: -1 before the first ``step()``."""
        return self.last_epoch - 1

    def _gamma(self, t: int) -> float:
        """The warmup fraction ``g(t)`` for ``0 <= t < W``."""
        if self.warmup_type == LOG:
            return math.log(t + 1) / math.log(self.warmup_num_steps)
        return t / self.warmup_num_steps

    def step(self, last_batch_iteration: Optional[int] = None) -> None:  # type: ignore[override]
        """One schedule step (``t + 1``), or to ``t = last_batch_iteration`` as DeepSpeed's
        schedules take it (the engine passes ``step(lr_kwargs=...)`` here)."""
        if last_batch_iteration is not None:
            self.last_epoch = check_iteration(last_batch_iteration)  # torch's step adds the 1 of t + 1
        super().step()

    def state_dict(self) -> dict[str, Any]:
        """DeepSpeed's: the counter only; the settings are the config's, never the checkpoint's."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restores the counter; the optimizer's lrs are the checkpoint's (the engine restores them)
        until the next ``step()`` computes this schedule's."""
        if set(state_dict) != {"last_batch_iteration"}:
            raise CheckpointError(f"{type(self).__name__}.load_state_dict: expected DeepSpeed's "
                                  f"{{'last_batch_iteration': t}}, got keys {sorted(state_dict)}")
        t = state_dict["last_batch_iteration"]
        if isinstance(t, bool) or not isinstance(t, int) or t < -1:
            raise CheckpointError(f"{type(self).__name__}.load_state_dict: last_batch_iteration {t!r} is not "
                                  "an int >= -1")
        self.last_epoch = t + 1
        self._step_count = self.last_epoch + 1  # torch's count: its initial step, then one per step()
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:  # type: ignore[override]  # torch types it list[float | Tensor]
        t = self.last_batch_iteration
        return [self._lr(t, g) for g in range(len(self.optimizer.param_groups))]

    def _lr(self, t: int, group: int) -> float:
        raise NotImplementedError


class WarmupLR(_Warmup):
    """DeepSpeed's ``WarmupLR``: from ``warmup_min_lr`` to ``warmup_max_lr`` (default: each param
    group's own lr) over ``warmup_num_steps``, then constant."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_min_lr: Numbers = 0.0,
                 warmup_max_lr: Optional[Numbers] = None, warmup_num_steps: int = 1000, warmup_type: str = LOG,
                 last_batch_iteration: int = -1) -> None:
        if warmup_max_lr is None:  # each group's own lr (DeepSpeed PR #8171; before it: group 0's for all)
            warmup_max_lr = [float(group["lr"]) for group in optimizer.param_groups]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        super().__init__(optimizer, warmup_num_steps, warmup_type, last_batch_iteration)

    def _after_warmup(self, t: int) -> float:
        return 1.0

    def _lr(self, t: int, group: int) -> float:
        low, high = self.min_lrs[group], self.max_lrs[group]
        if t < 0:
            return low
        gamma = self._gamma(t) if t < self.warmup_num_steps else self._after_warmup(t)
        return low + (high - low) * gamma


class WarmupDecayLR(WarmupLR):
    """DeepSpeed's ``WarmupDecayLR``: WarmupLR's warmup, then linear decay to 0 at ``total_num_steps``.
    Note DeepSpeed's default ``warmup_max_lr`` here is 0.001, not the optimizer's lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_min_lr: Numbers = 0.0,
                 warmup_max_lr: Numbers = 0.001, warmup_num_steps: int = 1000, warmup_type: str = LOG,
                 last_batch_iteration: int = -1) -> None:
        self.total_num_steps = check_int("scheduler.params.total_num_steps", total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning("WarmupDecayLR: total_num_steps %d is less than warmup_num_steps %d",
                           self.total_num_steps, self.warmup_num_steps)

    def _after_warmup(self, t: int) -> float:
        return max(0.0, float(self.total_num_steps - t) / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Warmup):
    """DeepSpeed's ``WarmupCosineLR``: a ratio of the optimizer's lr, warmed up from
    ``warmup_min_ratio`` to 1, then a cosine down to ``cos_min_ratio`` at ``total_num_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = LOG,
                 last_batch_iteration: int = -1) -> None:
        self.total_num_steps = check_int("scheduler.params.total_num_steps", total_num_steps)
        self.warmup_min_ratio = check_number("scheduler.params.warmup_min_ratio", warmup_min_ratio)
        self.cos_min_ratio = check_number("scheduler.params.cos_min_ratio", cos_min_ratio)
        self.org_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        super().__init__(optimizer, warmup_num_steps, warmup_type, last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning("WarmupCosineLR: total_num_steps %d is less than warmup_num_steps %d",
                           self.total_num_steps, self.warmup_num_steps)

    def ratio(self, t: int) -> float:
        if t < 0:
            return 0.0
        if t < self.warmup_num_steps:
            return self.warmup_min_ratio + self._gamma(t) * (1.0 - self.warmup_min_ratio)
        progress = min(1.0, (t - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def _lr(self, t: int, group: int) -> float:
        return self.org_lrs[group] * self.ratio(t)


SCHEDULES: dict[str, type[_Warmup]] = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR,
                                       "WarmupCosineLR": WarmupCosineLR}
_NOT_SUPPORTED = ("LRRangeTest", "OneCycle")


def from_config(optimizer: torch.optim.Optimizer, section: Mapping[str, Any]) -> LRScheduler:
    """The schedule a DeepSpeed ``"scheduler"`` section names, on ``optimizer``: one of
    :data:`SCHEDULES`, or (as DeepSpeed allows) a ``torch.optim.lr_scheduler`` class by name."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"scheduler must be a mapping with 'type' and 'params', got {section!r}", "scheduler")
    unknown_keys = [k for k in section if k not in ("type", "params")]
    if unknown_keys:
        raise ConfigError(f"scheduler: unknown key(s) {unknown_keys} (type, params)", "scheduler")
    kind = section.get("type")
    params = section.get("params", {})
    if not isinstance(params, Mapping):
        raise ConfigError(f"scheduler.params must be a mapping, got {params!r}", "scheduler.params")
    if kind in SCHEDULES:
        cls: Any = SCHEDULES[kind]
    elif isinstance(kind, str) and kind not in _NOT_SUPPORTED and kind[:1].isupper() and \
            isinstance(getattr(torch.optim.lr_scheduler, kind, None), type) and \
            issubclass(getattr(torch.optim.lr_scheduler, kind), LRScheduler):
        cls = getattr(torch.optim.lr_scheduler, kind)
    else:
        raise ConfigError(f"scheduler.type {kind!r} is not supported: use {', '.join(SCHEDULES)} or a "
                          "torch.optim.lr_scheduler class name", "scheduler.type")
    try:
        return cls(optimizer, **params)
    except TypeError as exc:  # an unknown or missing parameter
        raise ConfigError(f"scheduler {kind}: {exc} (params given: {sorted(params)})", "scheduler.params") from None
