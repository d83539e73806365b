"""The one reader of process and system memory and I/O counters.

``psutil`` where it has the figure (RSS, system available memory, I/O counters, child
processes); ``/proc/PID/status`` only for what psutil lacks: the peak RSS (``VmHWM``) and
the page-locked memory (``VmLck``). Linux only, like the engine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import psutil

# psutil's errors for a process that exited or that we may not read: callers treat both as "gone".
ProcessGone = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ProcessLookupError)


@dataclass(frozen=True)
class ProcessMemory:
    """Bytes: resident now, the peak resident (since start or the last :func:`reset_peak_rss`), page-locked."""

    rss: int
    peak_rss: int
    locked: int


@dataclass(frozen=True)
class SystemMemory:
    """Bytes: physical memory, and what is available to new allocations without swapping."""

    total: int
    available: int

    @property
    def used(self) -> int:
        """``total - available``: the system-wide figure the profiler tracks."""
        return self.total - self.available


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """``Key: N kB`` lines of ``/proc/PID/status``, in bytes (the keys found)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    return out


def process_memory(pid: Optional[int] = None) -> ProcessMemory:
    """RSS, peak RSS and locked memory of ``pid`` (default: this process).

    Raises ``OSError`` (or one of :data:`ProcessGone`) when the process is gone or unreadable;
    an exited process that is still a zombie has no ``VmRSS`` and raises ``ProcessLookupError``."""
    pid = os.getpid() if pid is None else pid
    status = _status_kib(pid, ("VmRSS", "VmHWM", "VmLck"))
    if "VmRSS" not in status:
        raise ProcessLookupError(f"process {pid} has exited (no VmRSS: a zombie)")
    return ProcessMemory(rss=status["VmRSS"], peak_rss=status.get("VmHWM", status["VmRSS"]),
                         locked=status.get("VmLck", 0))


def rss_bytes(pid: Optional[int] = None) -> int:
    """Resident set size of ``pid`` (default: this process) now."""
    return psutil.Process(pid).memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak RSS (``VmHWM``)."""
    return process_memory().peak_rss


def locked_bytes() -> int:
    """This process's page-locked memory (``VmLck``)."""
    return process_memory().locked


def reset_peak_rss() -> None:
    """Resets this process's ``VmHWM`` to its current RSS (``/proc/self/clear_refs``), so a peak
    measured afterwards belongs to what runs afterwards."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def system_memory() -> SystemMemory:
    """Physical and available memory of the machine."""
    vm = psutil.virtual_memory()
    return SystemMemory(total=int(vm.total), available=int(vm.available))


def io_bytes(pid: Optional[int] = None) -> tuple[int, int]:
    """Storage bytes read and written by ``pid`` (default: this process) since it started."""
    counters = psutil.Process(pid).io_counters()
    return int(counters.read_bytes), int(counters.write_bytes)


def descendants(pid: Optional[int] = None) -> list[int]:
    """PIDs of the child processes of ``pid``, recursively (empty when it has none or is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except ProcessGone:
        return []
