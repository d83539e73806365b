"""The engine's configuration: typed dataclasses, validation with clear messages,
loading from a dict / JSON / YAML file, and translation of a DeepSpeed ZeRO-3
offload config (:mod:`engine.ds_config`). The switches' ``Literal`` types and the value
checks (``check_choice`` ...) are in :mod:`engine.validate` and importable from here.

Every MemAscend technique has an ablation switch (DESIGN.md section 5); setting
all of them to their baseline value reproduces ZeRO-Infinity's behaviour.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import string
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Union

from . import ds_config
from .devices import check_device
from .ds_config import AutoValues, looks_like_deepspeed
from .dtypes import DtypeName
from .errors import ConfigError, EngineError  # noqa: F401 - ConfigError re-exported
from .units import parse_bytes

# The switches' Literals and the value checks live in engine.validate; importable from here too.
from .validate import (  # noqa: F401 - re-exported
    AUTO,
    BASELINE,
    CHOICES,
    DTYPES,
    FIELD_CHOICES,
    FP32_MAX,
    MAX_BLOCK_SIZE,
    MAX_BYTES,
    MAX_COUNT,
    MAX_ELEMENTS,
    MAX_QUEUE_DEPTH,
    MAX_SCALE_POWER,
    OPTIMIZERS,
    SWITCHES,
    AioBackend,
    BufferPool,
    GradBuffer,
    OffloadTarget,
    OptimizerType,
    OverflowCheck,
    PinnedAlloc,
    StateDtypeName,
    StatePartitioning,
    StoreLayout,
    TrainablePlacementChoice,
    check_bool,
    check_bytes,
    check_choice,
    check_int,
    check_int_or_auto,
    check_number,
    is_auto,
    is_number,
)


@dataclass
class OptimizerConfig:
    """Optimizer hyper-parameters. ``type``: ``adamw`` (decoupled weight decay), ``adam``
    (L2 weight decay) or ``sgd`` (with ``momentum``)."""

    type: OptimizerType = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0

    def validate(self) -> None:
        check_choice("optimizer.type", self.type, OptimizerType)
        self.betas = _check_betas(self.betas)
        check_number("optimizer.lr", self.lr)
        check_number("optimizer.eps", self.eps, low_open=True)  # divides by sqrt(v) + eps: 0 gives 0/0
        check_number("optimizer.weight_decay", self.weight_decay)
        check_number("optimizer.momentum", self.momentum, 0.0, 1.0, high_open=True)  # >= 1 grows without bound


def _check_betas(betas: Any) -> tuple[float, float]:
    ok = isinstance(betas, (list, tuple)) and len(betas) == 2 and \
        all(is_number(b) and math.isfinite(b) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ConfigError(f"optimizer.betas must be two finite numbers in [0, 1), got {betas!r}", "optimizer.betas")
    return (float(betas[0]), float(betas[1]))


def AdamWConfig(**kwargs: Any) -> OptimizerConfig:
    """An AdamW :class:`OptimizerConfig` (``engine.AdamWConfig(lr=1e-5)``)."""
    return OptimizerConfig(type="adamw", **kwargs)


def _nvme_paths(nvme_path: Any) -> Optional[list[str]]:
    """``nvme_path`` as a list of str paths (None: the private per-user root, $TMPDIR/memascend-<uid>);
    a ConfigError if it is not one."""
    if nvme_path is None:
        return None
    single = isinstance(nvme_path, (str, os.PathLike))
    paths = [nvme_path] if single else list(nvme_path) if isinstance(nvme_path, (list, tuple)) else []
    out = [_fspath(p) for p in paths]
    if not out or not all(out):
        raise ConfigError(f"nvme_path must be a directory or a non-empty list of them, got {nvme_path!r}", "nvme_path")
    for p in out:
        _check_placeholders(p)
    return out


def _check_placeholders(path: str) -> None:
    """A path may hold ``{rank}`` / ``{local_rank}`` (formatted per rank, engine.distributed.paths), nothing else."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(path) if f is not None]
        path.format(rank=0, local_rank=0)
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        fields, bad = [], f" ({exc})"
    else:
        bad = ""
    unknown = [f for f in fields if f not in ("rank", "local_rank")]
    if bad or unknown:
        raise ConfigError(f"nvme_path {path!r}: only the placeholders {{rank}} and {{local_rank}} may appear in "
                          f"braces{bad or ', got ' + ', '.join('{' + f + '}' for f in unknown)}; write a literal "
                          "brace as {{ or }}", "nvme_path")


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
    ``"auto"`` lets the planner choose (see :mod:`engine.offload.planner`).

    GPU: ``device`` (see :mod:`engine.devices`); ``gpu_memory`` (bytes or ``"24GiB"``) is the
    budget the planner checks the GPU side against before anything is allocated (``None``: the
    card's free memory); ignored, with a warning, when ``"auto"`` resolves to the CPU.

    Host memory: ``malloc_mmap_threshold`` (default 1 MiB) is set as glibc's mmap threshold
    at initialize, so freed activations return to the OS and peak RSS does not grow with
    depth (:mod:`engine.memory.malloc`); ``None`` leaves glibc's dynamic threshold.
    """

    nvme_path: Union[str, list[str], None] = None
    dtype: DtypeName = "fp32"
    offload_params: OffloadTarget = "nvme"
    offload_optimizer: OffloadTarget = "nvme"
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
    optimizer_state_dtype: StateDtypeName = "fp32"
    aio_backend: AioBackend = "auto"
    queue_depth: int = 32
    block_size: Union[int, str] = "1MiB"
    checksum: bool = True
    buffer_pool: BufferPool = "adaptive"
    buffer_count: int = 5
    pinned_alloc: PinnedAlloc = "exact"
    overflow_check: OverflowCheck = "fused"
    store: StoreLayout = "direct"
    grad_buffer: GradBuffer = "streamed"
    # Trainer.save_checkpoint keeps this many newest checkpoints per directory (0 keeps all).
    checkpoint_keep_last: int = 2
    frozen_dtype: Optional[DtypeName] = None
    trainable_placement: TrainablePlacementChoice = "auto"
    # glibc mmap threshold set at initialize (None: leave glibc's dynamic one); see engine.memory.malloc.
    malloc_mmap_threshold: Union[int, str, None] = "1MiB"
    # Compute device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N", "separate" (CPU test mode);
    # see engine.devices.
    device: str = "auto"
    # GPU memory budget of the run (bytes or "24GiB"); None: the card's free memory. See engine.offload.gpuplan.
    gpu_memory: Union[int, str, None] = None
    # Several ranks (torchrun): how long a collective waits for the other ranks before it fails with
    # DistributedError - the bound on noticing a dead rank. Used when the engine creates the process
    # group (an already initialized group keeps its own timeout); see engine.distributed.
    collective_timeout_s: float = 600.0
    # Several ranks: "partitioned" (ZeRO-3 over NVMe: each rank stores, reads and updates 1/N of every
    # tensor) or "replicated" (every rank keeps the whole state; gradients averaged). See engine.distributed.
    state_partitioning: StatePartitioning = "partitioned"

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, dict):
            self.optimizer = _build(OptimizerConfig, self.optimizer, "optimizer")
        self.validate()

    def validate(self) -> "Config":
        """Checks every field; raises :class:`ConfigError` naming the first bad one."""
        for name, literal in FIELD_CHOICES.items():
            check_choice(name, getattr(self, name), literal)
        if self.frozen_dtype is not None:
            check_choice("frozen_dtype", self.frozen_dtype, DtypeName,
                         "frozen_dtype must be None (same as dtype) or one of {choices}, got {value!r}")
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ConfigError(f"optimizer must be an OptimizerConfig or a dict, got {type(self.optimizer).__name__}",
                              "optimizer")
        self.optimizer.validate()
        _nvme_paths(self.nvme_path)
        self._validate_numbers()
        self._validate_sizes()
        check_bool("checksum", self.checksum)
        check_device(self.device)
        self._validate_gpu_memory()
        return self

    def _validate_gpu_memory(self) -> None:
        if self.gpu_memory is None:
            return
        check_bytes("gpu_memory", self.gpu_memory, 1, MAX_BYTES)
        if self.device == "cpu":
            raise ConfigError(f"gpu_memory={self.gpu_memory!r} is a GPU budget but device='cpu' computes on no "
                              "GPU; remove gpu_memory or set device 'cuda', 'cuda:N' or 'auto'", "gpu_memory")

    def _validate_numbers(self) -> None:
        for name in ("gradient_accumulation_steps", "loss_scale_window", "hysteresis", "buffer_count"):
            check_int(name, getattr(self, name))
        check_int("queue_depth", self.queue_depth, 1, MAX_QUEUE_DEPTH)
        check_int("initial_scale_power", self.initial_scale_power, 0, MAX_SCALE_POWER)
        check_int("checkpoint_keep_last", self.checkpoint_keep_last, 0)
        check_number("gradient_clipping", self.gradient_clipping)  # 0: off
        check_number("collective_timeout_s", self.collective_timeout_s, 0.0, 7 * 24 * 3600.0, low_open=True)
        check_number("loss_scale", self.loss_scale, 0.0, FP32_MAX)  # 0: dynamic
        check_number("min_loss_scale", self.min_loss_scale, 0.0, FP32_MAX, low_open=True)
        check_int_or_auto("prefetch_depth", self.prefetch_depth, 0, MAX_COUNT)
        check_int_or_auto("sub_group_size", self.sub_group_size, 1, MAX_ELEMENTS)

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
        changes: dict[str, Any] = {n: BASELINE[n] for n in names}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, auto: Optional["AutoValues"] = None) -> "Config":
        """Builds a Config from a dict; a DeepSpeed config (``zero_optimization`` etc.) is translated,
        its ``"auto"`` values taken from ``auto`` (see :func:`from_deepspeed`)."""
        if looks_like_deepspeed(data):
            return from_deepspeed(data, auto)
        return _build(cls, data, "config")

    @classmethod
    def from_deepspeed(cls, ds: dict, auto: Optional["AutoValues"] = None) -> "Config":
        """A DeepSpeed config translated; ``auto``: what its ``"auto"`` values stand for (:class:`AutoValues`)."""
        return from_deepspeed(ds, auto)

    @classmethod
    def load(cls, source: Union["Config", dict, str, os.PathLike], auto: Optional["AutoValues"] = None) -> "Config":
        """A Config from a Config, a dict, or a path to a JSON or YAML file (engine or DeepSpeed format);
        ``auto`` is used only by a DeepSpeed config's ``"auto"`` values."""
        if isinstance(source, Config):
            return source.validate()
        if isinstance(source, dict):
            return cls.from_dict(source, auto)
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
        return cls.from_dict(data, auto)


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


def _default(name: str) -> Any:
    """The engine's default of a Config (or optimizer) field."""
    cls = OptimizerConfig if name in ds_config.OPTIMIZER_FIELDS else Config
    return next(f.default for f in fields(cls) if f.name == name)


def from_deepspeed(ds: Mapping[str, Any], auto: Optional[Mapping[str, Any]] = None) -> Config:
    """Translates a DeepSpeed ZeRO-3 offload config (:func:`engine.ds_config.translate`); keys
    without an equivalent are named in one warning. ``"auto"`` takes its value from ``auto``
    (:class:`AutoValues`) or the engine's default; an ``"auto"`` this engine has no value for
    (optimizer type, offload device, nvme_path) is refused with every such key named."""
    return ds_config.translate(ds, auto, make=Config, default=_default)
