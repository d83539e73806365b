"""The engine's configuration: typed dataclasses, validation with clear messages,
loading from a dict / JSON / YAML file, and translation of a DeepSpeed ZeRO-3
offload config.

Every MemAscend technique has an ablation switch (DESIGN.md section 5); setting
all of them to their baseline value reproduces ZeRO-Infinity's behaviour.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Optional, TypedDict, Union

from ._log import logger
from .errors import EngineError
from .units import parse_bytes

DTYPES = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adam", "sgd")
CHOICES = {
    "dtype": DTYPES,
    "offload_params": ("nvme", "none"),
    "offload_optimizer": ("nvme", "none"),
    # Where trainable parameters and their optimizer state live; "auto": the planner decides.
    "trainable_placement": ("auto", "memory", "nvme"),
    "optimizer_state_dtype": ("fp32", "bf16"),
    "aio_backend": ("auto", "uring", "threads"),
    # Ablation switches: ours first, then the ZeRO-Infinity-like baseline.
    "buffer_pool": ("adaptive", "uniform"),
    "pinned_alloc": ("exact", "torch"),
    "overflow_check": ("fused", "naive"),
    "store": ("direct", "files"),
    "grad_buffer": ("streamed", "flat"),
}
BASELINE = {"buffer_pool": "uniform", "pinned_alloc": "torch", "overflow_check": "naive", "store": "files",
            "grad_buffer": "flat"}


class ConfigError(EngineError, ValueError):
    """An invalid configuration; the message names the field and what is allowed.
    ``field``: the engine field at fault (``optimizer.lr``), when there is one."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


# Upper bounds, each with its reason.
FP32_MAX = 3.4028234663852886e38   # a loss scale is applied in fp32: larger is inf
MAX_SCALE_POWER = 127              # 2**127 is the largest power of two finite in fp32
MAX_QUEUE_DEPTH = 4096             # what csrc/aio_uring.cpp accepts for one ring
MAX_BLOCK_SIZE = 1 << 30           # one Linux read/write moves at most 2 GiB - 4 KiB
MAX_COUNT = 2**31 - 1              # counts are C ints in the native core
MAX_BYTES = 1 << 60                # sizes are int64 byte counts (elements x 8 bytes must fit)
MAX_ELEMENTS = MAX_BYTES // 8


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        return ("positive" if low_open else "non-negative") if low == 0 else f"{low} or more"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool) within the bounds;
    otherwise a :class:`ConfigError` naming ``name``, the value and the allowed range."""
    ok = _is_number(value) and math.isfinite(value) and (value > low if low_open else value >= low) \
        and (value < high if high_open else value <= high)
    if not ok:
        where = _interval(low, high, low_open, high_open)
        words = f"a {where} finite number" if not where.startswith("in") else f"a finite number {where}"
        raise ConfigError(f"{name} must be {words}, got {value!r}", name)
    return float(value)


def check_int(name: str, value: Any, low: int = 1, high: int = MAX_COUNT) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``; otherwise a :class:`ConfigError`."""
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        sign = {0: "non-negative ", 1: "positive "}.get(low, "")
        where = f"<= {high}" if sign else f"in [{low}, {high}]"
        raise ConfigError(f"{name} must be a {sign}integer {where}, got {value!r}", name)
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool: the strings "false"/"true" and 0/1 are refused (both truthy traps)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false (a boolean, not a string or a number), got {value!r}", name)
    return value


def check_bytes(name: str, value: Any, low: int, high: int) -> int:
    """A byte size (``4096`` or ``"1MiB"``) in ``[low, high]`` as an int."""
    try:
        n = parse_bytes(value)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a byte size in [{low}, {high}], got {value!r}: {exc}", name) from None
    if not low <= n <= high:
        raise ConfigError(f"{name} must be a byte size in [{low}, {high}], got {value!r}", name)
    return n


@dataclass
class OptimizerConfig:
    """Optimizer hyper-parameters. ``type``: ``adamw`` (decoupled weight decay), ``adam``
    (L2 weight decay) or ``sgd`` (with ``momentum``)."""

    type: str = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.type, str) or self.type not in OPTIMIZERS:
            raise ConfigError(f"optimizer.type must be one of {', '.join(OPTIMIZERS)}, got {self.type!r}",
                              "optimizer.type")
        self.betas = _check_betas(self.betas)
        check_number("optimizer.lr", self.lr)
        check_number("optimizer.eps", self.eps, low_open=True)  # divides by sqrt(v) + eps: 0 gives 0/0
        check_number("optimizer.weight_decay", self.weight_decay)
        check_number("optimizer.momentum", self.momentum, 0.0, 1.0, high_open=True)  # >= 1 grows without bound


def _check_betas(betas: Any) -> tuple[float, float]:
    ok = isinstance(betas, (list, tuple)) and len(betas) == 2 and \
        all(_is_number(b) and math.isfinite(b) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ConfigError(f"optimizer.betas must be two finite numbers in [0, 1), got {betas!r}", "optimizer.betas")
    return (float(betas[0]), float(betas[1]))


def AdamWConfig(**kwargs: Any) -> OptimizerConfig:
    """An AdamW :class:`OptimizerConfig` (``engine.AdamWConfig(lr=1e-5)``)."""
    return OptimizerConfig(type="adamw", **kwargs)


def _check_auto_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        kind = "non-negative" if low == 0 else "positive"
        raise ConfigError(f"{name} must be 'auto' or a {kind} integer <= {high}, got {value!r}", name)


def _nvme_paths(nvme_path: Any) -> Optional[list[str]]:
    """``nvme_path`` as a list of str paths (None: a private temp dir); a ConfigError if it is not one."""
    if nvme_path is None:
        return None
    single = isinstance(nvme_path, (str, os.PathLike))
    paths = [nvme_path] if single else list(nvme_path) if isinstance(nvme_path, (list, tuple)) else []
    out = [_fspath(p) for p in paths]
    if not out or not all(out):
        raise ConfigError(f"nvme_path must be a directory or a non-empty list of them, got {nvme_path!r}", "nvme_path")
    return out


def _fspath(path: Any) -> str:
    """A path as a str; '' for anything that is not a usable one (a number, None, a NUL byte)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    return text if isinstance(text, str) and "\0" not in text else ""


@dataclass
class Config:
    """Everything :func:`engine.initialize` needs to know.

    Storage: ``nvme_path`` is one directory or a list (tensors striped across them);
    ``None`` uses a private directory under the system temp dir. Memory:
    ``host_memory_budget`` (bytes or ``"16GiB"``) bounds the planned host memory;
    ``prefetch_depth`` and ``sub_group_size`` are chosen by the planner when ``"auto"``.

    Partial fine-tuning (PEFT): ``frozen_dtype`` is the dtype of parameters with
    ``requires_grad=False`` in memory and in the store (``None``: ``dtype``), e.g. a bf16
    base under fp32 LoRA adapters. ``trainable_placement`` keeps trainable parameters with
    their fp32 gradients and optimizer state in DRAM (``"memory"``) or on NVMe (``"nvme"``);
    ``"auto"`` lets the planner choose (see :mod:`engine.memory.planner`).

    Host memory: ``malloc_mmap_threshold`` (default 1 MiB) is set as glibc's mmap threshold
    at initialize, so freed activations return to the OS and peak RSS does not grow with
    depth (:mod:`engine.memory.malloc`); ``None`` leaves glibc's dynamic threshold.
    """

    nvme_path: Union[str, list[str], None] = None
    dtype: str = "fp32"
    offload_params: str = "nvme"
    offload_optimizer: str = "nvme"
    host_memory_budget: Union[int, str, None] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 0.0
    # fp16 loss scaling: loss_scale 0 means dynamic, starting at 2**initial_scale_power.
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    prefetch_depth: Union[int, str] = "auto"
    sub_group_size: Union[int, str] = "auto"
    resident_threshold_bytes: int = 1 << 20
    optimizer_state_dtype: str = "fp32"
    aio_backend: str = "auto"
    queue_depth: int = 32
    block_size: Union[int, str] = "1MiB"
    checksum: bool = True
    buffer_pool: str = "adaptive"
    buffer_count: int = 5
    pinned_alloc: str = "exact"
    overflow_check: str = "fused"
    store: str = "direct"
    grad_buffer: str = "streamed"
    # Trainer.save_checkpoint keeps this many newest checkpoints per directory (0 keeps all).
    checkpoint_keep_last: int = 2
    frozen_dtype: Optional[str] = None
    trainable_placement: str = "auto"
    # glibc mmap threshold set at initialize (None: leave glibc's dynamic one); see engine.memory.malloc.
    malloc_mmap_threshold: Union[int, str, None] = "1MiB"

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, dict):
            self.optimizer = _build(OptimizerConfig, self.optimizer, "optimizer")
        self.validate()

    def validate(self) -> "Config":
        """Checks every field; raises :class:`ConfigError` naming the first bad one."""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}", name)
        if self.frozen_dtype is not None and (not isinstance(self.frozen_dtype, str) or self.frozen_dtype not in DTYPES):
            raise ConfigError(f"frozen_dtype must be None (same as dtype) or one of {', '.join(map(repr, DTYPES))}, "
                              f"got {self.frozen_dtype!r}", "frozen_dtype")
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ConfigError(f"optimizer must be an OptimizerConfig or a dict, got {type(self.optimizer).__name__}",
                              "optimizer")
        self.optimizer.validate()
        _nvme_paths(self.nvme_path)
        self._validate_numbers()
        self._validate_sizes()
        check_bool("checksum", self.checksum)
        return self

    def _validate_numbers(self) -> None:
        for name in ("gradient_accumulation_steps", "loss_scale_window", "hysteresis", "buffer_count"):
            check_int(name, getattr(self, name))
        check_int("queue_depth", self.queue_depth, 1, MAX_QUEUE_DEPTH)
        check_int("initial_scale_power", self.initial_scale_power, 0, MAX_SCALE_POWER)
        check_int("checkpoint_keep_last", self.checkpoint_keep_last, 0)
        check_number("gradient_clipping", self.gradient_clipping)  # 0: off
        check_number("loss_scale", self.loss_scale, 0.0, FP32_MAX)  # 0: dynamic
        check_number("min_loss_scale", self.min_loss_scale, 0.0, FP32_MAX, low_open=True)
        if self.prefetch_depth != "auto":
            _check_auto_int("prefetch_depth", self.prefetch_depth, 0, MAX_COUNT)
        if self.sub_group_size != "auto":
            _check_auto_int("sub_group_size", self.sub_group_size, 1, MAX_ELEMENTS)

    def _validate_sizes(self) -> None:
        check_int("resident_threshold_bytes", self.resident_threshold_bytes, 0, MAX_BYTES)
        if self.host_memory_budget is not None:
            check_bytes("host_memory_budget", self.host_memory_budget, 1, MAX_BYTES)
        block = check_bytes("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        if block % 4096:
            raise ConfigError(f"block_size must be a positive multiple of 4096 bytes, got {self.block_size!r}",
                              "block_size")
        if self.malloc_mmap_threshold is not None:
            try:
                threshold = parse_bytes(self.malloc_mmap_threshold)
            except ValueError as exc:
                threshold, reason = 0, f": {exc}"
            else:
                reason = ""
            if not 0 < threshold <= 32 << 20:
                raise ConfigError(f"malloc_mmap_threshold must be None or in (0, 32MiB], "
                                  f"got {self.malloc_mmap_threshold!r}{reason}", "malloc_mmap_threshold")

    @property
    def budget_bytes(self) -> Optional[int]:
        return None if self.host_memory_budget is None else parse_bytes(self.host_memory_budget)

    @property
    def nvme_paths(self) -> Optional[list[str]]:
        return _nvme_paths(self.nvme_path)

    def with_baseline(self, *switches: str) -> "Config":
        """A copy with the named ablation switches (default: all) set to the ZeRO-Infinity-like baseline."""
        names = switches or tuple(BASELINE)
        unknown = [n for n in names if n not in BASELINE]
        if unknown:
            raise ConfigError(f"unknown ablation switch(es) {unknown}; known: {', '.join(BASELINE)}")
        return dataclasses.replace(self, **{n: BASELINE[n] for n in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """Builds a Config from a dict; a DeepSpeed config (``zero_optimization`` etc.) is translated."""
        if looks_like_deepspeed(data):
            return from_deepspeed(data)
        return _build(cls, data, "config")

    @classmethod
    def load(cls, source: Union["Config", dict, str, os.PathLike]) -> "Config":
        """A Config from a Config, a dict, or a path to a JSON or YAML file (engine or DeepSpeed format)."""
        if isinstance(source, Config):
            return source.validate()
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = os.fspath(source)
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path!r} is YAML but PyYAML is not installed (pip install pyyaml)") from None
            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path!r} must hold a mapping at the top level")
        return cls.from_dict(data)


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, known, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown {where} key(s): {', '.join(hints)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"invalid {where}: {exc}") from None


# ----------------------------------------------------------------------------- DeepSpeed
def looks_like_deepspeed(data: dict) -> bool:
    return any(k in data for k in ("zero_optimization", "train_batch_size", "train_micro_batch_size_per_gpu")) or \
        any(isinstance(data.get(k), dict) and "enabled" in data[k] for k in ("fp16", "bf16"))


# DeepSpeed keys that have no meaning here (batching belongs to the data loader, etc.).
_DS_IGNORED = {"train_batch_size", "train_micro_batch_size_per_gpu", "steps_per_print", "wall_clock_breakdown",
               "zero_allow_untested_optimizer"}


def from_deepspeed(ds: dict) -> Config:
    """Translates a DeepSpeed ZeRO-3 offload config; keys without an equivalent are named in one warning."""
    kwargs: dict[str, Any] = {}
    unsupported: list[str] = []
    for key, value in ds.items():
        if key in _DS_IGNORED:
            continue
        if key == "gradient_accumulation_steps":
            kwargs[key] = int(value)
        elif key == "gradient_clipping":
            kwargs[key] = float(value)
        elif key in ("fp16", "bf16") and isinstance(value, dict):
            if value.get("enabled", False):
                kwargs["dtype"] = key
            for sub, v in value.items():
                if sub == "enabled" or (sub == "auto_cast" and not v):
                    continue
                if key == "fp16" and sub in ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                                             "min_loss_scale"):
                    kwargs[sub] = float(v) if sub in ("loss_scale", "min_loss_scale") else int(v)
                else:
                    unsupported.append(f"{key}.{sub}")
        elif key == "optimizer":
            kwargs["optimizer"] = _ds_optimizer(value, unsupported)
        elif key == "zero_optimization":
            _ds_zero(value, kwargs, unsupported)
        elif key == "aio":
            for sub, v in value.items():
                if sub == "block_size":
                    kwargs["block_size"] = int(v)
                elif sub == "queue_depth":
                    kwargs["queue_depth"] = int(v)
                else:
                    unsupported.append(f"aio.{sub}")
        else:
            unsupported.append(key)
    if unsupported:
        logger.warning("DeepSpeed config: ignoring keys with no equivalent in this engine: %s", ", ".join(unsupported))
    return Config(**kwargs)


def _ds_optimizer(value: dict, unsupported: list[str]) -> OptimizerConfig:
    kind = str(value.get("type", "AdamW")).lower()
    params = dict(value.get("params", {}))
    if kind not in OPTIMIZERS:
        raise ConfigError(f"DeepSpeed optimizer type {value.get('type')!r} is not supported (use AdamW, Adam or SGD)")
    if kind == "adam" and params.pop("adam_w_mode", True):
        kind = "adamw"  # DeepSpeed's Adam defaults to AdamW behaviour
    params.pop("adam_w_mode", None)
    opt = {"type": kind}
    for k, v in params.items():
        if k in ("lr", "eps", "weight_decay", "momentum"):
            opt[k] = float(v)
        elif k == "betas":
            opt[k] = tuple(v)
        else:
            unsupported.append(f"optimizer.params.{k}")
    return OptimizerConfig(**opt)


def _ds_zero(zero: dict, kwargs: dict, unsupported: list[str]) -> None:
    if zero.get("stage", 3) != 3:
        unsupported.append(f"zero_optimization.stage={zero.get('stage')} (this engine always partitions like stage 3)")
    paths: list[str] = []
    for section, target in (("offload_param", "offload_params"), ("offload_optimizer", "offload_optimizer")):
        sub = zero.get(section)
        if not sub:
            continue
        device = sub.get("device", "none")
        if device not in ("nvme", "none", "cpu"):
            raise ConfigError(f"zero_optimization.{section}.device {device!r} is not supported")
        kwargs[target] = "nvme" if device == "nvme" else "none"
        if device == "cpu":
            unsupported.append(f"zero_optimization.{section}.device=cpu (kept in DRAM without offload)")
        for k, v in sub.items():
            if k == "device":
                continue
            if k == "nvme_path":
                if v not in paths:
                    paths.append(v)
            elif k == "buffer_count":
                kwargs["buffer_count"] = int(v)
            elif k in ("pin_memory", "buffer_size", "max_in_cpu", "pipeline_read", "pipeline_write", "fast_init",
                       "ratio"):
                unsupported.append(f"zero_optimization.{section}.{k} (sized by the planner)")
            else:
                unsupported.append(f"zero_optimization.{section}.{k}")
    if paths:
        kwargs["nvme_path"] = paths[0] if len(paths) == 1 else paths
    for k, v in zero.items():
        if k in ("stage", "offload_param", "offload_optimizer"):
            continue
        if k == "sub_group_size":
            kwargs["sub_group_size"] = int(v)
        elif k == "stage3_param_persistence_threshold":
            kwargs["resident_threshold_bytes"] = int(v) * 4  # elements -> fp32 bytes
        else:
            unsupported.append(f"zero_optimization.{k}")
