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
from typing import Any, Callable, Literal, Mapping, Optional, TypedDict, Union, get_args

from ._log import logger
from .dtypes import DtypeName
from .errors import ConfigError, EngineError  # noqa: F401 - ConfigError re-exported
from .units import parse_bytes

# One Literal per string switch: the Config field's type, and (via get_args) its allowed values.
OptimizerType = Literal["adamw", "adam", "sgd"]
OffloadTarget = Literal["nvme", "none"]
# Where trainable parameters and their optimizer state live; "auto": the planner decides.
TrainablePlacementChoice = Literal["auto", "memory", "nvme"]
StateDtypeName = Literal["fp32", "bf16"]
AioBackend = Literal["auto", "uring", "threads"]
# Ablation switches: ours first, then the ZeRO-Infinity-like baseline (BASELINE takes the second).
BufferPool = Literal["adaptive", "uniform"]
PinnedAlloc = Literal["exact", "torch"]
OverflowCheck = Literal["fused", "naive"]
StoreLayout = Literal["direct", "files"]
GradBuffer = Literal["streamed", "flat"]

DTYPES: tuple[str, ...] = get_args(DtypeName)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerType)
SWITCHES: dict[str, Any] = {"buffer_pool": BufferPool, "pinned_alloc": PinnedAlloc,
                            "overflow_check": OverflowCheck, "store": StoreLayout, "grad_buffer": GradBuffer}
FIELD_CHOICES: dict[str, Any] = {  # Config field -> its Literal
    "dtype": DtypeName,
    "offload_params": OffloadTarget,
    "offload_optimizer": OffloadTarget,
    "trainable_placement": TrainablePlacementChoice,
    "optimizer_state_dtype": StateDtypeName,
    "aio_backend": AioBackend,
    **SWITCHES,
}
CHOICES: dict[str, tuple[str, ...]] = {name: get_args(literal) for name, literal in FIELD_CHOICES.items()}
BASELINE: dict[str, str] = {name: get_args(literal)[1] for name, literal in SWITCHES.items()}


def _one_of(choices: tuple[str, ...]) -> str:
    return ", ".join(map(repr, choices))


def check_choice(what: str, value: Any, literal: Any, message: Optional[str] = None) -> str:
    """``value`` if it is one of the strings of ``literal`` (a ``Literal[...]`` alias above);
    otherwise a :class:`ConfigError` (a ValueError) naming ``what``. Config checks its fields
    with it; so do the classes also used without a Config (TensorStore, AsyncIO), whose
    ``message`` may spell the error with ``{value!r}``, ``{choices}`` ("'a', 'b', 'c'") and
    ``{alternatives}`` ("'a', 'b' or 'c'")."""
    choices = get_args(literal)
    if isinstance(value, str) and value in choices:
        return value
    alternatives = " or ".join(filter(None, (", ".join(map(repr, choices[:-1])), repr(choices[-1]))))
    text = message or "{what} must be one of {choices}, got {value!r}"
    raise ConfigError(text.format(what=what, value=value, choices=_one_of(choices), alternatives=alternatives), what)


# Upper bounds, each with its reason.
FP32_MAX = 3.4028234663852886e38   # a loss scale is applied in fp32: larger is inf
MAX_SCALE_POWER = 127              # 2**127 is the largest power of two finite in fp32
MAX_QUEUE_DEPTH = 4096             # what csrc/aio_uring.cpp accepts for one ring
MAX_BLOCK_SIZE = 1 << 30           # one Linux read/write moves at most 2 GiB - 4 KiB
MAX_COUNT = 2**31 - 1              # counts are C ints in the native core
MAX_BYTES = 1 << 60                # sizes are int64 byte counts (elements x 8 bytes must fit)
MAX_ELEMENTS = MAX_BYTES // 8


AUTO = "auto"


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool) within the bounds;
    otherwise a :class:`ConfigError` naming ``name``, the value and the allowed range."""
    ok = _is_number(value) and math.isfinite(value) and (value > low if low_open else value >= low) \
        and (value < high if high_open else value <= high)
    if not ok:
        if low == 0 and high == math.inf:
            words = f"a {'positive' if low_open else 'non-negative'} finite number"
        else:
            words = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
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
        all(_is_number(b) and math.isfinite(b) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ConfigError(f"optimizer.betas must be two finite numbers in [0, 1), got {betas!r}", "optimizer.betas")
    return (float(betas[0]), float(betas[1]))


def AdamWConfig(**kwargs: Any) -> OptimizerConfig:
    """An AdamW :class:`OptimizerConfig` (``engine.AdamWConfig(lr=1e-5)``)."""
    return OptimizerConfig(type="adamw", **kwargs)


def _check_int_or_auto(name: str, value: Any, low: int, high: int) -> None:
    if _is_auto(value):
        return  # the planner chooses
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        kind = "non-negative" if low == 0 else "positive"
        raise ConfigError(f"{name} must be 'auto' or a {kind} integer <= {high}, got {value!r}", name)


def _nvme_paths(nvme_path: Any) -> Optional[list[str]]:
    """``nvme_path`` as a list of str paths (None: the private per-user root, $TMPDIR/memascend-<uid>); a ConfigError if it is not one."""
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
    ``"auto"`` lets the planner choose (see :mod:`engine.offload.planner`).

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
        _check_int_or_auto("prefetch_depth", self.prefetch_depth, 0, MAX_COUNT)
        _check_int_or_auto("sub_group_size", self.sub_group_size, 1, MAX_ELEMENTS)

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


# ----------------------------------------------------------------------------- DeepSpeed
class AutoValues(TypedDict, total=False):
    """What ``"auto"`` stands for in a DeepSpeed config, as the Hugging Face integration fills
    it from ``TrainingArguments``: ``Config.from_deepspeed(ds, auto={"lr": 3e-4, "dtype": "bf16"})``.
    Names are the engine's (``Config`` fields; ``lr`` ... ``momentum`` of the optimizer). An
    ``"auto"`` without a value here takes the engine's default; a concrete value in the file wins."""

    dtype: str
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    momentum: float
    gradient_accumulation_steps: int
    gradient_clipping: float
    loss_scale: float
    initial_scale_power: int
    loss_scale_window: int
    hysteresis: int
    min_loss_scale: float
    sub_group_size: Union[int, str]
    resident_threshold_bytes: int
    buffer_count: int
    block_size: Union[int, str]
    queue_depth: int
    # Batching belongs to the data loader: checked, otherwise unused.
    train_batch_size: int
    train_micro_batch_size_per_gpu: int


_OPTIMIZER_FIELDS = ("lr", "betas", "eps", "weight_decay", "momentum")
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu")
_LOSS_SCALING = {"loss_scale": False, "initial_scale_power": True, "loss_scale_window": True, "hysteresis": True,
                 "min_loss_scale": False}  # fp16 sub-key -> is an integer
# DeepSpeed keys that have no meaning here.
_DS_IGNORED = {"steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer"}


def looks_like_deepspeed(data: dict) -> bool:
    return any(k in data for k in ("zero_optimization", *_BATCH_KEYS)) or \
        any(isinstance(data.get(k), dict) and "enabled" in data[k] for k in ("fp16", "bf16")) or \
        (isinstance(data.get("optimizer"), dict) and "params" in data["optimizer"])


def _section(path: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a mapping (a JSON object), got {value!r}", path)
    return value


def _ds_int(path: str, value: Any) -> Any:
    """DeepSpeed configs write big integers as JSON floats (``1e9``): an integral float becomes
    an int; anything else goes on unchanged to the engine's own check."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _elements_to_fp32_bytes(path: str, value: Any) -> int:
    return check_int(path, _ds_int(path, value), 0, MAX_BYTES // 4) * 4


def _default(name: str) -> Any:
    cls = OptimizerConfig if name in _OPTIMIZER_FIELDS else Config
    return next(f.default for f in fields(cls) if f.name == name)


def _check_auto_values(auto: Mapping[str, Any]) -> None:
    known = list(AutoValues.__annotations__)
    unknown = [k for k in auto if k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), known, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown 'auto' value name(s): {', '.join(hints)}; known: {', '.join(known)}", "auto")
    for k in _BATCH_KEYS:
        if k in auto:
            check_int(f"auto[{k!r}]", auto[k])
    # Every given value gets Config's checks, used or not: a bad one is a bug in the caller.
    values = {k: v for k, v in auto.items() if k not in _BATCH_KEYS}
    optimizer = {k: values.pop(k) for k in _OPTIMIZER_FIELDS if k in values}
    try:
        Config(**values, optimizer=optimizer)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in the values given for 'auto')", exc.field) from None


class _Translation:
    """One DeepSpeed config on its way to a :class:`Config`: the engine's keyword arguments,
    the DeepSpeed key each came from (for error messages), and what was not honoured."""

    def __init__(self, auto: Mapping[str, Any]):
        self.auto = auto
        self.kwargs: dict[str, Any] = {}
        self.optimizer: dict[str, Any] = {}
        self.origin: dict[str, str] = {}       # engine field -> DeepSpeed key
        self.enabled: dict[str, Any] = {}      # "fp16"/"bf16" -> True, False or "auto"
        self.unsupported: list[str] = []
        self.unresolved: list[str] = []        # "auto" where this engine has no value to put
        self.resolved: list[str] = []

    def put(self, path: str, value: Any, name: str, convert: Optional[Callable[[str, Any], Any]] = None) -> None:
        """Engine value ``name`` from DeepSpeed key ``path``; ``"auto"``: the given value or the default."""
        if _is_auto(value):
            if name not in self.auto:
                self.resolved.append(f"{path}={_default(name)!r} (engine default)")
                return
            value = self.auto[name]  # checked by _check_auto_values
            self.resolved.append(f"{path}={value!r} (given)")
        elif convert is not None:
            value = convert(path, value)
        optimizer = name in _OPTIMIZER_FIELDS
        (self.optimizer if optimizer else self.kwargs)[name] = value
        self.origin[f"optimizer.{name}" if optimizer else name] = path

    def batch_size(self, key: str, value: Any) -> None:
        if not _is_auto(value):
            check_int(key, _ds_int(key, value))

    def precision(self, key: str, section: Mapping[str, Any]) -> None:
        for sub, value in section.items():
            path = f"{key}.{sub}"
            if sub == "enabled":
                self.enabled[key] = value if _is_auto(value) else check_bool(path, value)
            elif sub == "auto_cast":
                if check_bool(path, value):
                    self.unsupported.append(path)
            elif key == "fp16" and sub in _LOSS_SCALING:
                self.put(path, value, sub, _ds_int if _LOSS_SCALING[sub] else None)
            else:
                self.unsupported.append(path)

    def dtype(self) -> None:
        """An explicit ``enabled: true`` decides; ``"auto"`` flags follow ``auto['dtype']`` (default fp32)."""
        explicit = [k for k in ("fp16", "bf16") if self.enabled.get(k) is True]
        if len(explicit) == 2:
            raise ConfigError("fp16.enabled and bf16.enabled are both true: enable one (neither: fp32)", "dtype")
        autos = [k for k in ("fp16", "bf16") if _is_auto(self.enabled.get(k))]
        if explicit:
            self.kwargs["dtype"], self.origin["dtype"] = explicit[0], f"{explicit[0]}.enabled"
        elif autos:
            wanted = self.auto.get("dtype", _default("dtype"))
            if wanted in autos:
                self.kwargs["dtype"], self.origin["dtype"] = wanted, f"{wanted}.enabled"
            self.resolved.append(f"{'/'.join(f'{k}.enabled' for k in autos)}: dtype {wanted!r}"
                                 + ("" if "dtype" in self.auto else " (engine default)"))

    def optimizer_section(self, value: Mapping[str, Any]) -> None:
        kind = value.get("type", "AdamW")
        if _is_auto(kind):
            self.unresolved.append("optimizer.type")
            kind = "adamw"
        elif not isinstance(kind, str) or kind.lower() not in OPTIMIZERS:
            raise ConfigError(f"DeepSpeed optimizer type {kind!r} is not supported (use AdamW, Adam or SGD)",
                              "optimizer.type")
        kind = kind.lower()
        params = _section("optimizer.params", value.get("params", {}))
        w_mode = params.get("adam_w_mode", True)
        if _is_auto(w_mode):
            self.unresolved.append("optimizer.params.adam_w_mode")
        elif check_bool("optimizer.params.adam_w_mode", w_mode) and kind == "adam":
            kind = "adamw"  # DeepSpeed's Adam defaults to AdamW behaviour
        self.optimizer["type"] = kind
        for k, v in params.items():
            if k in _OPTIMIZER_FIELDS:
                self.put(f"optimizer.params.{k}", v, k)
            elif k != "adam_w_mode":
                self.unsupported.append(f"optimizer.params.{k}")
        self.unsupported.extend(f"optimizer.{k}" for k in value if k not in ("type", "params"))

    def zero(self, zero: Mapping[str, Any]) -> None:
        stage = zero.get("stage", 3)
        if _is_auto(stage):
            self.unresolved.append("zero_optimization.stage")
        elif isinstance(stage, bool) or not isinstance(stage, int):
            raise ConfigError(f"zero_optimization.stage must be an integer (this engine works like 3), got {stage!r}",
                              "zero_optimization.stage")
        elif stage != 3:
            self.unsupported.append(f"zero_optimization.stage={stage} (this engine always partitions like stage 3)")
        paths: list[Any] = []
        for section, target in (("offload_param", "offload_params"), ("offload_optimizer", "offload_optimizer")):
            if zero.get(section) is not None:
                self.offload(f"zero_optimization.{section}", _section(f"zero_optimization.{section}", zero[section]),
                             target, paths)
        if paths:
            self.kwargs["nvme_path"] = paths[0] if len(paths) == 1 else paths
        for k, v in zero.items():
            path = f"zero_optimization.{k}"
            if k == "sub_group_size":
                self.put(path, v, "sub_group_size", _ds_int)
            elif k == "stage3_param_persistence_threshold":
                self.put(path, v, "resident_threshold_bytes", _elements_to_fp32_bytes)  # elements -> fp32 bytes
            elif k not in ("stage", "offload_param", "offload_optimizer"):
                self.unsupported.append(path)

    def offload(self, where: str, sub: Mapping[str, Any], target: str, paths: list[Any]) -> None:
        device = sub.get("device", "none")
        if _is_auto(device):
            self.unresolved.append(f"{where}.device")
        elif not isinstance(device, str) or device not in ("nvme", "none", "cpu"):
            raise ConfigError(f"{where}.device {device!r} is not supported (nvme, cpu or none)", f"{where}.device")
        else:
            self.kwargs[target] = "nvme" if device == "nvme" else "none"
            if device == "cpu":
                self.unsupported.append(f"{where}.device=cpu (kept in DRAM without offload)")
        for k, v in sub.items():
            if k == "nvme_path":
                if _is_auto(v):
                    self.unresolved.append(f"{where}.nvme_path")
                elif v not in paths:
                    paths.append(v)
                    self.origin.setdefault("nvme_path", f"{where}.nvme_path")
            elif k == "buffer_count":
                self.put(f"{where}.buffer_count", v, "buffer_count", _ds_int)
            elif k in ("pin_memory", "buffer_size", "max_in_cpu", "pipeline_read", "pipeline_write", "fast_init",
                       "ratio"):
                self.unsupported.append(f"{where}.{k} (sized by the planner)")
            elif k != "device":
                self.unsupported.append(f"{where}.{k}")

    def aio(self, section: Mapping[str, Any]) -> None:
        for k, v in section.items():
            if k in ("block_size", "queue_depth"):
                self.put(f"aio.{k}", v, k, _ds_int)
            else:
                self.unsupported.append(f"aio.{k}")

    def translate(self, ds: Mapping[str, Any]) -> None:
        for key, value in ds.items():
            if key in _BATCH_KEYS:
                self.batch_size(key, value)
            elif key in ("gradient_accumulation_steps", "gradient_clipping"):
                self.put(key, value, key, _ds_int if key == "gradient_accumulation_steps" else None)
            elif key in ("fp16", "bf16"):
                self.precision(key, _section(key, value))
            elif key == "optimizer":
                self.optimizer_section(_section(key, value))
            elif key == "zero_optimization":
                self.zero(_section(key, value))
            elif key == "aio":
                self.aio(_section(key, value))
            elif key not in _DS_IGNORED:
                self.unsupported.append(key)
        self.dtype()

    def build(self) -> Config:
        """The Config; a check that fails names the DeepSpeed key the value came from."""
        if self.unresolved:
            raise ConfigError(f"DeepSpeed config: 'auto' has no value in this engine for {', '.join(self.unresolved)}; "
                              "write the value into the config", self.unresolved[0])
        try:
            return Config(**self.kwargs, optimizer=dict(self.optimizer))
        except ConfigError as exc:
            where = self.origin.get(exc.field or "")
            if where is None:
                raise
            raise ConfigError(f"{exc} (DeepSpeed key {where})", exc.field) from None


def from_deepspeed(ds: Mapping[str, Any], auto: Optional[Mapping[str, Any]] = None) -> Config:
    """Translates a DeepSpeed ZeRO-3 offload config; keys without an equivalent are named in one
    warning. ``"auto"`` takes its value from ``auto`` (:class:`AutoValues`) or the engine's default;
    an ``"auto"`` this engine has no value for (optimizer type, offload device, nvme_path) is
    refused with every such key named."""
    auto = dict(auto or {})
    _check_auto_values(auto)
    translation = _Translation(auto)
    translation.translate(_section("DeepSpeed config", ds))
    cfg = translation.build()
    if translation.unsupported:
        logger.warning("DeepSpeed config: ignoring keys with no equivalent in this engine: %s",
                       ", ".join(translation.unsupported))
    if translation.resolved:
        logger.info("DeepSpeed config: 'auto' resolved: %s", ", ".join(translation.resolved))
    return cfg
