"""Checks of configuration values, shared by :mod:`engine.config` and :mod:`engine.ds_config`:
one ``Literal`` per string switch (the Config field's type, and its allowed values via
``typing.get_args``), numeric bounds with their reasons, and the ``check_*`` functions that
raise :class:`~engine.errors.ConfigError` naming the field, the value and what is allowed.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, get_args

from .dtypes import DtypeName
from .errors import ConfigError
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
StatePartitioning = Literal["partitioned", "replicated"]

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
    "state_partitioning": StatePartitioning,
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


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool) within the bounds;
    otherwise a :class:`ConfigError` naming ``name``, the value and the allowed range."""
    ok = is_number(value) and math.isfinite(value) and (value > low if low_open else value >= low) \
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


def check_int_or_auto(name: str, value: Any, low: int, high: int) -> None:
    if is_auto(value):
        return  # the planner chooses
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        kind = "non-negative" if low == 0 else "positive"
        raise ConfigError(f"{name} must be 'auto' or a {kind} integer <= {high}, got {value!r}", name)
