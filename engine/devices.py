"""The compute device: what ``Config.device`` may say, and the torch device it resolves to.

``"auto"``: CUDA when ``torch.cuda.is_available()``, else the CPU. ``"cpu"``, ``"cuda"`` (the
current CUDA device), ``"cuda:N"``. ``"separate"`` is a test and diagnostic mode: compute runs
on the CPU, but in tensors distinct from host staging - weights are copied out of their pinned
slot, gradients copied back - so the GPU path's placement, copies and ordering run (and are
tested) on a machine without a GPU. It is slower than ``"cpu"`` and never what "auto" picks.

``MEMASCEND_AUTO_DEVICE`` (a device setting other than "auto") pins what "auto" resolves to,
e.g. ``cpu`` on a GPU machine; the test suite pins ``cpu`` (tests that need CUDA ask for it).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .errors import ConfigError

DeviceKind = Literal["cpu", "cuda", "separate"]
_CUDA = re.compile(r"^cuda(?::(\d+))?$")
AUTO_ENV = "MEMASCEND_AUTO_DEVICE"


@dataclass(frozen=True)
class ComputeDeviceSpec:
    """A resolved compute device: its kind and the torch device tensors are computed on."""

    kind: DeviceKind
    device: torch.device

    @property
    def copies(self) -> bool:
        """Weights and gradients cross between host staging and separate device tensors."""
        return self.kind != "cpu"

    def __str__(self) -> str:
        return "separate (cpu)" if self.kind == "separate" else str(self.device)


def check_device(value: object) -> str:
    """``value`` if it is a device setting this engine knows (the format only; no CUDA query)."""
    if isinstance(value, str) and _known(value):
        return value
    raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'separate' (a CPU test mode), "
                      f"got {value!r}", "device")


def _auto() -> str:
    pinned = os.environ.get(AUTO_ENV)
    if pinned:
        if pinned == "auto" or not _known(pinned):
            raise ConfigError(f"{AUTO_ENV}={pinned!r}: must be 'cpu', 'cuda', 'cuda:N' or 'separate'", "device")
        return pinned
    return "cuda" if torch.cuda.is_available() else "cpu"


def _known(value: str) -> bool:
    return value in ("auto", "cpu", "separate") or _CUDA.match(value) is not None


def resolve_device(value: str, local_rank: Optional[int] = None) -> ComputeDeviceSpec:
    """The compute device ``value`` names on this machine; :class:`ConfigError` when it asks for a
    CUDA device that is not there (never a silent fallback to the CPU). ``local_rank`` (one of
    several ranks on this machine): "cuda" and "auto" mean ``cuda:local_rank``, each rank its own
    GPU; an explicit "cuda:N" is kept."""
    check_device(value)
    if value == "auto":
        value = _auto()
    if value in ("cpu", "separate"):
        return ComputeDeviceSpec(value, torch.device("cpu"))  # type: ignore[arg-type]
    match = _CUDA.match(value)
    assert match is not None  # check_device accepted it
    if not torch.cuda.is_available():
        raise ConfigError(f"device={value!r} but CUDA is not available here (torch.cuda.is_available() is False; "
                          f"torch {torch.__version__}); use device='cpu' or 'auto'", "device")
    count = torch.cuda.device_count()
    if match.group(1) is not None:
        index = int(match.group(1))
    else:
        index = local_rank if local_rank is not None else torch.cuda.current_device()
        if local_rank is not None and count == 1:
            index = 0  # one visible device per rank (CUDA_VISIBLE_DEVICES per task, e.g. SLURM): that one
    if index >= count:
        raise ConfigError(f"device={value!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})",
                          "device")
    return ComputeDeviceSpec("cuda", torch.device("cuda", index))
