"""What a runtime reports: its counters and phase times, and the memory report's figures.

:class:`RuntimeStats` is the typed view (:meth:`OffloadRuntime.stats
<engine.offload.runtime.OffloadRuntime.stats>`); :func:`memory_report` is the dict users and
the CLI print (``Trainer.memory_report()``): backend, pool, plan, process memory (peak RSS,
locked, from :mod:`engine.procinfo`), bytes moved, and I/O wait beside compute time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from ..devices import ComputeDeviceSpec
from ..memory.malloc import applied_mmap_threshold
from ..memory.pool import PinnedPool
from ..procinfo import ProcessMemory, process_memory
from ..storage.aio import AsyncIO
from .planner import MemoryPlan


@dataclass
class PhaseTimes:
    """Seconds spent in each phase since construction."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    step_s: float = 0.0


@dataclass
class DeviceCounters:
    """Host->device bytes the runtime itself copies (resident values refreshed after a step)."""

    h2d_bytes: int = 0


@dataclass(frozen=True)
class RuntimeStats:
    """Counters and times of a runtime."""

    micro_steps: int
    global_steps: int
    skipped_steps: int
    last_grad_norm: Optional[float]  # None before the first step; inf after a skipped (overflowed) one
    forward_s: float
    backward_s: float
    step_s: float
    io_wait_s: float                 # forward/backward stalled on reads + optimizer read/write waits
    optimizer_compute_s: float
    bytes_read: int                  # store totals
    bytes_written: int
    device: str = "cpu"              # str(ComputeDeviceSpec): "cpu", "cuda:0", "separate (cpu)"
    gpu_peak_allocated_bytes: int = 0  # torch.cuda.max_memory_allocated on CUDA, else 0
    gpu_peak_reserved_bytes: int = 0
    h2d_bytes: int = 0               # weights copied out of staging + resident refreshes (0 on "cpu")
    h2d_wait_s: float = 0.0          # host time compute waited for those copies (device_copy)
    d2h_bytes: int = 0               # gradients copied from compute tensors into pinned staging
    d2h_wait_s: float = 0.0


def _gpu_peaks(device: Optional[ComputeDeviceSpec]) -> tuple[int, int]:
    if device is None or device.kind != "cuda":
        return 0, 0
    return torch.cuda.max_memory_allocated(device.device), torch.cuda.max_memory_reserved(device.device)


def runtime_stats(counters: dict[str, Any], times: PhaseTimes, store: dict, streamer: dict,
                  stepper: Any, *, device: Optional[ComputeDeviceSpec] = None,
                  refresh: Optional[DeviceCounters] = None, sink: Optional[dict] = None) -> RuntimeStats:
    """``counters``: micro/global/skipped steps and last_grad_norm; ``store``/``streamer``: their
    ``stats()`` dicts; ``stepper``: the backend's :class:`~engine.offload.stepper.StepStats`;
    ``device``: the compute device, ``refresh``: the runtime's own copies, ``sink``: the gradient
    sink's ``device_stats`` (d2h_bytes, d2h_wait_s)."""
    sink = sink or {}
    allocated, reserved = _gpu_peaks(device)
    return RuntimeStats(**counters, **asdict(times),
                        io_wait_s=streamer["stall_seconds"] + stepper.read_wait_s + stepper.write_wait_s,
                        optimizer_compute_s=stepper.compute_s, bytes_read=store["bytes_read"],
                        bytes_written=store["bytes_written"], device=str(device) if device is not None else "cpu",
                        gpu_peak_allocated_bytes=allocated, gpu_peak_reserved_bytes=reserved,
                        h2d_bytes=streamer.get("h2d_bytes", 0) + (refresh.h2d_bytes if refresh is not None else 0),
                        h2d_wait_s=streamer.get("h2d_wait_s", 0.0), d2h_bytes=int(sink.get("d2h_bytes", 0)),
                        d2h_wait_s=float(sink.get("d2h_wait_s", 0.0)))


def _process_memory() -> ProcessMemory:
    try:
        return process_memory()
    except OSError:  # /proc unreadable: report zeros rather than fail a report
        return ProcessMemory(rss=0, peak_rss=0, locked=0)


def memory_report(stats: RuntimeStats, *, io: AsyncIO, pool: PinnedPool, plan: MemoryPlan, streamer: dict) -> dict:
    """The report's dict (its keys are the public contract of ``Trainer.memory_report``)."""
    mem = _process_memory()
    return dict(
        backend=io.backend, fixed_buffers=io.fixed_buffers, malloc_mmap_threshold=applied_mmap_threshold(),
        pool=pool.stats(), plan=dict(pool_bytes=plan.pool_bytes, disk_bytes=plan.disk_bytes,
                                     prefetch_depth=plan.prefetch_depth,
                                     predicted_peak_bytes=plan.predicted_peak_bytes),
        peak_rss_bytes=mem.peak_rss, rss_bytes=mem.rss, locked_bytes=mem.locked,
        bytes_read=stats.bytes_read, bytes_written=stats.bytes_written,
        io_wait_s=stats.io_wait_s, optimizer_compute_s=stats.optimizer_compute_s,
        forward_s=stats.forward_s, backward_s=stats.backward_s, step_s=stats.step_s,
        steps=stats.global_steps, skipped_steps=stats.skipped_steps, streamer=streamer,
        device=stats.device, gpu_peak_allocated_bytes=stats.gpu_peak_allocated_bytes,
        gpu_peak_reserved_bytes=stats.gpu_peak_reserved_bytes, h2d_bytes=stats.h2d_bytes,
        h2d_wait_s=stats.h2d_wait_s, d2h_bytes=stats.d2h_bytes, d2h_wait_s=stats.d2h_wait_s,
    )
