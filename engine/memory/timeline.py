"""The profiler's PNG timeline: memory series (GiB) over time and I/O throughput, phases shaded.

Drawn from a profiler report (:meth:`engine.memory.profiler.MemoryProfiler.report` with its
series) with matplotlib's Agg canvas, so it needs no display; matplotlib is imported only here.
"""
from __future__ import annotations

import math
from typing import Optional

PHASE_COLORS = {"forward": "#4c9be8", "backward": "#f28e2b", "optimizer": "#59a14f", "checkpoint": "#b07aa1"}


def plot_timeline(report: dict, path: str, title: Optional[str] = None) -> None:
    """Renders a profiler report (with series) to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    s = report["series"]
    t = s["t"]
    gib = 2.0 ** 30

    def col(name: str) -> list[float]:
        return [math.nan if v is None else v / gib for v in s[name]]

    fig = Figure(figsize=(11, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    mem, io = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    lines = [("rss", "RSS" + (" (with children)" if report.get("include_children") else ""), "-"),
             ("system_used", "system used (MemTotal - MemAvailable)", "-"), ("locked", "locked (VmLck)", ":"),
             ("pool_reserved", "pinned pool reserved", "--"), ("pool_in_use", "pinned pool in use", "-.")]
    for key, label, style in lines:
        if any(v is not None for v in s[key]):
            mem.plot(t, col(key), style, label=label, linewidth=1.2)
    mem.set_ylabel("GiB")
    mem.grid(alpha=0.3)
    for key, label in (("read", "read"), ("written", "written")):
        rates = _rates(t, s[key])
        if rates:
            io.plot(t[1:], rates, label=f"{label} GB/s", linewidth=1.0)
    io.set_ylabel("I/O GB/s")
    io.set_xlabel("seconds")
    io.grid(alpha=0.3)
    seen: dict[str, str] = {}
    for p in report["phases"]:
        color = PHASE_COLORS.get(p["name"]) or seen.get(p["name"]) or f"C{len(seen) + 5}"
        seen[p["name"]] = color
        end = p["end"] if p["end"] is not None else (t[-1] if t else p["start"])
        for ax in (mem, io):
            ax.axvspan(p["start"], end, color=color, alpha=0.15, linewidth=0)
    handles, labels = mem.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.3) for c in seen.values()]
    labels += list(seen)
    mem.legend(handles, labels, loc="upper left", fontsize=8, ncol=2)
    if io.get_legend_handles_labels()[0]:
        io.legend(loc="upper left", fontsize=8)
    peak = report["peaks"]
    fig.suptitle((title + ": " if title else "") + "peak RSS " + _gib(peak["rss"]) + ", peak system used "
                 + _gib(peak["system_used"]), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _rates(t: list[float], values: list[Optional[int]]) -> list[float]:
    if not any(v is not None for v in values):
        return []
    out = []
    for i in range(1, len(t)):
        a, b, dt = values[i - 1], values[i], t[i] - t[i - 1]
        out.append(math.nan if a is None or b is None or dt <= 0 else (b - a) / dt / 1e9)
    return out


def _gib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"
