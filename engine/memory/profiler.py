"""The memory profiler: a background thread samples a process's memory and I/O, code marks
phases, and the result is a JSON report (the peak of every series) and a PNG timeline.

Series (bytes; one value per sample, ``None`` where a source was unavailable):

* ``rss`` - resident set size (``VmRSS``) of the process, or of the process and its
  descendants when ``include_children`` (a launcher, ``profile -- CMD``);
* ``vm_hwm`` - the kernel's own high-water mark of RSS (``VmHWM``, the main process);
* ``locked`` - page-locked memory (``VmLck``; the PinnedPool's arena);
* ``system_used`` - system-wide used memory, ``MemTotal - MemAvailable``: the figure
  that matters (DESIGN.md section 7), since it also counts page cache pressure, other
  processes and memory the kernel holds on the process's behalf;
* ``pool_reserved`` / ``pool_in_use`` - the PinnedPool's capacity and bytes handed out
  (when a pool or trainer is attached);
* ``read`` / ``written`` - cumulative bytes since the start: the store's counters when a
  store or trainer is attached, else the process's storage I/O (``/proc/PID/io``).

Usage::

    with MemoryProfiler() as prof:             # samples this process every 20 ms
        trainer = engine.initialize(model, cfg)
        prof.attach(trainer=trainer)           # adds the pool and store series
        with prof.phase("forward"):
            ...
    prof.save("out/")                          # out/profile.json, out/profile.png

Library code marks phases on every active profiler with :func:`phase` without a handle.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .. import procinfo
from .timeline import PHASE_COLORS, plot_timeline  # noqa: F401 - re-exported

SERIES = ("rss", "vm_hwm", "locked", "system_used", "pool_reserved", "pool_in_use", "read", "written")

_active: list["MemoryProfiler"] = []
_active_lock = threading.Lock()


@dataclass
class Phase:
    """A marked interval, in seconds since the profiler started."""

    name: str
    start: float
    end: Optional[float] = None


def system_used_bytes() -> int:
    """System-wide used memory now: ``MemTotal - MemAvailable``."""
    return procinfo.system_memory().used


class MemoryProfiler:
    """Samples memory and I/O of process ``pid`` (default: this one) every ``interval`` seconds.

    ``pool``, ``store`` or ``trainer`` (whose pool and store are used) add the pool and
    store series; :meth:`attach` adds them later, e.g. once a trainer exists. Start and
    stop it with :meth:`start` / :meth:`stop` or as a context manager; the process may
    exit while sampled (the series end there). Thread-safe for :meth:`phase`.
    """

    def __init__(self, interval: float = 0.02, *, pid: Optional[int] = None, include_children: bool = False,
                 pool: Any = None, store: Any = None, trainer: Any = None, label: Optional[str] = None):
        if not interval > 0:
            raise ValueError(f"profiler interval must be positive, got {interval!r}")
        self.interval = float(interval)
        self.pid = os.getpid() if pid is None else int(pid)
        self.include_children = include_children
        self.label = label
        self._lock = threading.Lock()
        self._source_lock = threading.Lock()
        self._pool = self._store = None
        self._store0: Optional[tuple[int, int]] = None
        self._carry = (0, 0)
        self.extra: dict[str, Any] = {}
        self.io_source = "/proc/PID/io"
        self.attach(pool=pool, store=store, trainer=trainer)
        self.times: list[float] = []
        self.series: dict[str, list[Optional[int]]] = {k: [] for k in SERIES}
        self.phases: list[Phase] = []
        self._halt = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._t0 = 0.0
        self._io0: Optional[tuple[int, int]] = None
        self.baseline_system_used = 0
        self.duration = 0.0
        self.process_exited = False

    # ------------------------------------------------------------------ sources
    def attach(self, *, pool: Any = None, store: Any = None, trainer: Any = None) -> "MemoryProfiler":
        """Adds a PinnedPool and/or TensorStore to sample (a trainer brings both: its runtime's
        ``pool``, ``store`` and ``io``; a runtime may be passed as ``trainer`` too)."""
        if trainer is not None:
            runtime = trainer.runtime if hasattr(trainer, "runtime") else trainer
            pool = pool or runtime.pool
            store = store or runtime.store
            self.extra["backend"] = None if runtime.io is None else runtime.io.backend
            device = getattr(runtime, "device", None)  # the compute device (engine.devices.ComputeDeviceSpec)
            self.extra["device"] = None if device is None else str(device)
        with self._source_lock:
            if pool is not None:
                self._pool = pool
            if store is not None:
                self._store = store
                # Cumulative series continue from where they are: a new store's counters start there.
                self._store0 = None
                self._carry = (_last(self.series["read"]) or 0, _last(self.series["written"]) or 0) \
                    if hasattr(self, "series") else (0, 0)
        return self

    def detach(self) -> "MemoryProfiler":
        """Stops sampling the pool and store (call before closing them); waits for a sample in progress."""
        with self._source_lock:
            self._pool = self._store = None
        return self

    def _sample(self) -> None:
        t = time.perf_counter() - self._t0
        values: dict[str, Optional[int]] = dict.fromkeys(SERIES)
        try:
            memory = procinfo.process_memory(self.pid)
        except (OSError, ValueError, *procinfo.ProcessGone):  # gone, or a zombie that holds no memory any more
            self.process_exited = True
            return
        rss = memory.rss
        if self.include_children:
            for child in procinfo.descendants(self.pid):
                try:
                    rss += procinfo.rss_bytes(child)
                except (OSError, *procinfo.ProcessGone):
                    pass  # exited between listing and reading
        values.update(rss=rss, vm_hwm=memory.peak_rss, locked=memory.locked, system_used=system_used_bytes())
        with self._source_lock:  # detach() waits for this: a closed pool must not be read
            self._sample_sources(values)
        with self._lock:
            self.times.append(t)
            for k in SERIES:
                self.series[k].append(values[k])

    def _sample_sources(self, values: dict[str, Optional[int]]) -> None:
        pool, store = self._pool, self._store
        if pool is not None:
            try:
                stats = pool.stats()
                values.update(pool_reserved=stats["capacity"], pool_in_use=stats["in_use"])
            except Exception:  # noqa: BLE001 - a closed pool ends its series, not the profile
                self._pool = None
        if store is not None:
            try:
                counters = store.stats()
                now = (int(counters["bytes_read"]), int(counters["bytes_written"]))
                if self._store0 is None:
                    self._store0 = now
                values.update(read=self._carry[0] + now[0] - self._store0[0],
                              written=self._carry[1] + now[1] - self._store0[1])
                self.io_source = "store"
            except RuntimeError:
                pass  # the store's tensor table changed under us (files layout); next sample
            except Exception:  # noqa: BLE001 - a closed store ends its series, not the profile
                self._store = None
        if values["read"] is None and self.io_source != "store":
            try:
                io = procinfo.io_bytes(self.pid)
                if self._io0 is None:
                    self._io0 = io
                values.update(read=io[0] - self._io0[0], written=io[1] - self._io0[1])
            except (OSError, *procinfo.ProcessGone):
                pass

    def sample(self) -> None:
        """Takes one sample now (besides the periodic ones), e.g. at the end of a training step."""
        if self._thread is None:
            raise RuntimeError("the profiler is not running")
        self._sample()

    def _run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            if self.process_exited:
                return
            self._halt.wait(self.interval)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "MemoryProfiler":
        if self._thread is not None:
            raise RuntimeError("profiler already started")
        self._t0 = time.perf_counter()
        try:
            self.baseline_system_used = system_used_bytes()
        except OSError as exc:
            raise OSError(f"the profiler needs /proc/meminfo: {exc}") from None
        self._sample()  # one sample before returning: the baseline is in the series
        self._thread = threading.Thread(target=self._run, name="memascend-profiler", daemon=True)
        self._thread.start()
        with _active_lock:
            _active.append(self)
        return self

    def stop(self) -> "MemoryProfiler":
        """Stops sampling (after one last sample) and closes any open phase."""
        if self._thread is None:
            return self
        self._halt.set()
        self._thread.join()
        self._thread = None
        if not self.process_exited:
            self._sample()
        self.duration = time.perf_counter() - self._t0
        with _active_lock:
            if self in _active:
                _active.remove(self)
        with self._lock:
            for p in self.phases:
                if p.end is None:
                    p.end = self.duration
        return self

    def __enter__(self) -> "MemoryProfiler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Marks the enclosed code as phase ``name`` (forward, backward, optimizer, checkpoint, ...)."""
        entry = Phase(name, time.perf_counter() - self._t0)
        with self._lock:
            self.phases.append(entry)
        try:
            yield entry
        finally:
            entry.end = time.perf_counter() - self._t0

    # ------------------------------------------------------------------ results
    def latest(self, key: str) -> Optional[int]:
        """The most recent sampled value of series ``key`` (``None`` if none yet)."""
        with self._lock:
            return _last(self.series[key])

    def peaks(self) -> dict[str, Optional[int]]:
        """The largest sampled value of each series (``None`` if it was never available)."""
        with self._lock:
            return {k: max((v for v in vals if v is not None), default=None) for k, vals in self.series.items()}

    def report(self, include_series: bool = True) -> dict:
        """Peaks, totals, phases (with their own peak RSS) and, optionally, the series."""
        peaks = self.peaks()
        with self._lock:
            times = list(self.times)
            series = {k: list(v) for k, v in self.series.items()}
            phases = [Phase(p.name, p.start, p.end) for p in self.phases]
        summary: dict[str, dict] = {}
        for p in phases:
            end = p.end if p.end is not None else (times[-1] if times else p.start)
            s = summary.setdefault(p.name, dict(count=0, total_s=0.0, peak_rss=None))
            s["count"] += 1
            s["total_s"] += end - p.start
            inside = [r for t, r in zip(times, series["rss"]) if p.start <= t <= end and r is not None]
            if inside:
                s["peak_rss"] = max(inside + ([s["peak_rss"]] if s["peak_rss"] is not None else []))
        peak_sys = peaks["system_used"]
        out = dict(
            label=self.label, pid=self.pid, include_children=self.include_children, interval_s=self.interval,
            duration_s=self.duration or (times[-1] if times else 0.0), samples=len(times),
            peaks=peaks,
            peak_system_used_over_baseline=None if peak_sys is None else peak_sys - self.baseline_system_used,
            baseline_system_used=self.baseline_system_used,
            totals=dict(read=_last(series["read"]), written=_last(series["written"])),
            io_source=self.io_source,
            phases=[dict(name=p.name, start=p.start, end=p.end) for p in phases], phase_summary=summary,
            **self.extra,
        )
        if include_series:
            out["series"] = dict(t=times, **series)
        return out

    def save_json(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.report(), f, indent=1)
        return path

    def save_png(self, path: str, title: Optional[str] = None) -> str:
        """The timeline: memory series (GiB) over time and I/O throughput, phases shaded."""
        plot_timeline(self.report(), path, title=title or self.label)
        return path

    def save(self, directory: str, stem: str = "profile") -> tuple[str, str]:
        """Writes ``<directory>/<stem>.json`` and ``<stem>.png``; returns both paths."""
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, stem)
        return self.save_json(base + ".json"), self.save_png(base + ".png")


def _last(values: list[Optional[int]]) -> Optional[int]:
    return next((v for v in reversed(values) if v is not None), None)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Marks phase ``name`` on every running profiler of this process (a no-op when none runs)."""
    with _active_lock:
        profilers = list(_active)
    with contextlib.ExitStack() as stack:
        for p in profilers:
            stack.enter_context(p.phase(name))
        yield
