"""Translation of a DeepSpeed ZeRO-3 offload config into the engine's Config.

Keys with an equivalent are mapped (their values checked by the engine's own checks, an error
naming the DeepSpeed key); keys without one are named in one warning; ``"auto"`` values take
what the caller gives (:class:`AutoValues`, as the Hugging Face integration fills them) or the
engine's default. The Config class is passed in (``make``): this module sits below
:mod:`engine.config`, which calls it.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Mapping, Optional, TypedDict, TypeVar, Union

from ._log import logger
from .errors import ConfigError
from .validate import MAX_BYTES, OPTIMIZERS, check_bool, check_int, is_auto

T = TypeVar("T")


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


OPTIMIZER_FIELDS = ("lr", "betas", "eps", "weight_decay", "momentum")
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu")
_LOSS_SCALING = {"loss_scale": False, "initial_scale_power": True, "loss_scale_window": True, "hysteresis": True,
                 "min_loss_scale": False}  # fp16 sub-key -> is an integer
# The compute device has no DeepSpeed key: DeepSpeed computes on the GPU its launcher assigns
# (LOCAL_RANK / CUDA_VISIBLE_DEVICES), so a translated Config keeps device "auto" (CUDA when
# available). offload_param.device / offload_optimizer.device name where state is offloaded
# ("nvme", "cpu", "none"), not where compute runs: they map to offload_params / offload_optimizer.
# Nor has collective_timeout_s (DeepSpeed takes the timeout as init_distributed(timeout=...)): a
# translated Config keeps the engine's default; set it on the Config.
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


def _check_auto_values(auto: Mapping[str, Any], make: Callable[..., Any]) -> None:
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
    optimizer = {k: values.pop(k) for k in OPTIMIZER_FIELDS if k in values}
    try:
        make(**values, optimizer=optimizer)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in the values given for 'auto')", exc.field) from None


class _Translation:
    """One DeepSpeed config on its way to a :class:`Config`: the engine's keyword arguments,
    the DeepSpeed key each came from (for error messages), and what was not honoured."""

    def __init__(self, auto: Mapping[str, Any], default: Callable[[str], Any]):
        self.auto = auto
        self.default = default  # the engine's default of a field
        self.kwargs: dict[str, Any] = {}
        self.optimizer: dict[str, Any] = {}
        self.origin: dict[str, str] = {}       # engine field -> DeepSpeed key
        self.enabled: dict[str, Any] = {}      # "fp16"/"bf16" -> True, False or "auto"
        self.unsupported: list[str] = []
        self.unresolved: list[str] = []        # "auto" where this engine has no value to put
        self.resolved: list[str] = []

    def put(self, path: str, value: Any, name: str, convert: Optional[Callable[[str, Any], Any]] = None) -> None:
        """Engine value ``name`` from DeepSpeed key ``path``; ``"auto"``: the given value or the default."""
        if is_auto(value):
            if name not in self.auto:
                self.resolved.append(f"{path}={self.default(name)!r} (engine default)")
                return
            value = self.auto[name]  # checked by _check_auto_values
            self.resolved.append(f"{path}={value!r} (given)")
        elif convert is not None:
            value = convert(path, value)
        optimizer = name in OPTIMIZER_FIELDS
        (self.optimizer if optimizer else self.kwargs)[name] = value
        self.origin[f"optimizer.{name}" if optimizer else name] = path

    def batch_size(self, key: str, value: Any) -> None:
        if not is_auto(value):
            check_int(key, _ds_int(key, value))

    def precision(self, key: str, section: Mapping[str, Any]) -> None:
        for sub, value in section.items():
            path = f"{key}.{sub}"
            if sub == "enabled":
                self.enabled[key] = value if is_auto(value) else check_bool(path, value)
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
        autos = [k for k in ("fp16", "bf16") if is_auto(self.enabled.get(k))]
        if explicit:
            self.kwargs["dtype"], self.origin["dtype"] = explicit[0], f"{explicit[0]}.enabled"
        elif autos:
            wanted = self.auto.get("dtype", self.default("dtype"))
            if wanted in autos:
                self.kwargs["dtype"], self.origin["dtype"] = wanted, f"{wanted}.enabled"
            self.resolved.append(f"{'/'.join(f'{k}.enabled' for k in autos)}: dtype {wanted!r}"
                                 + ("" if "dtype" in self.auto else " (engine default)"))

    def optimizer_section(self, value: Mapping[str, Any]) -> None:
        kind = value.get("type", "AdamW")
        if is_auto(kind):
            self.unresolved.append("optimizer.type")
            kind = "adamw"
        elif not isinstance(kind, str) or kind.lower() not in OPTIMIZERS:
            raise ConfigError(f"DeepSpeed optimizer type {kind!r} is not supported (use AdamW, Adam or SGD)",
                              "optimizer.type")
        kind = kind.lower()
        params = _section("optimizer.params", value.get("params", {}))
        w_mode = params.get("adam_w_mode", True)
        if is_auto(w_mode):
            self.unresolved.append("optimizer.params.adam_w_mode")
        elif check_bool("optimizer.params.adam_w_mode", w_mode) and kind == "adam":
            kind = "adamw"  # DeepSpeed's Adam defaults to AdamW behaviour
        self.optimizer["type"] = kind
        for k, v in params.items():
            if k in OPTIMIZER_FIELDS:
                self.put(f"optimizer.params.{k}", v, k)
            elif k != "adam_w_mode":
                self.unsupported.append(f"optimizer.params.{k}")
        self.unsupported.extend(f"optimizer.{k}" for k in value if k not in ("type", "params"))

    def zero(self, zero: Mapping[str, Any]) -> None:
        stage = zero.get("stage", 3)
        if is_auto(stage):
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
        if is_auto(device):
            self.unresolved.append(f"{where}.device")
        elif not isinstance(device, str) or device not in ("nvme", "none", "cpu"):
            raise ConfigError(f"{where}.device {device!r} is not supported (nvme, cpu or none)", f"{where}.device")
        else:
            self.kwargs[target] = "nvme" if device == "nvme" else "none"
            if device == "cpu":
                self.unsupported.append(f"{where}.device=cpu (kept in DRAM without offload)")
        for k, v in sub.items():
            if k == "nvme_path":
                if is_auto(v):
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

    def build(self, make: Callable[..., T]) -> T:
        """The Config (``make(**kwargs)``); a check that fails names the DeepSpeed key the value came from."""
        if self.unresolved:
            raise ConfigError(f"DeepSpeed config: 'auto' has no value in this engine for {', '.join(self.unresolved)}; "
                              "write the value into the config", self.unresolved[0])
        try:
            return make(**self.kwargs, optimizer=dict(self.optimizer))
        except ConfigError as exc:
            where = self.origin.get(exc.field or "")
            if where is None:
                raise
            raise ConfigError(f"{exc} (DeepSpeed key {where})", exc.field) from None


def translate(ds: Mapping[str, Any], auto: Optional[Mapping[str, Any]], *, make: Callable[..., T],
              default: Callable[[str], Any]) -> T:
    """Translates a DeepSpeed ZeRO-3 offload config; keys without an equivalent are named in one
    warning. ``"auto"`` takes its value from ``auto`` (:class:`AutoValues`) or the engine's default;
    an ``"auto"`` this engine has no value for (optimizer type, offload device, nvme_path) is
    refused with every such key named. ``make`` builds the Config from keyword arguments;
    ``default(name)`` is the engine's default of a field."""
    auto = dict(auto or {})
    _check_auto_values(auto, make)
    translation = _Translation(auto, default)
    translation.translate(_section("DeepSpeed config", ds))
    cfg = translation.build(make)
    if translation.unsupported:
        logger.warning("DeepSpeed config: ignoring keys with no equivalent in this engine: %s",
                       ", ".join(translation.unsupported))
    if translation.resolved:
        logger.info("DeepSpeed config: 'auto' resolved: %s", ", ".join(translation.resolved))
    return cfg
