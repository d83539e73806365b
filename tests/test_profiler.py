"""The memory profiler: a known allocation shows up at its size, phases are recorded, the
JSON report agrees with its series, the PNG is a real PNG, pool/store/child sources work."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from engine import PinnedPool
from engine.memory.profiler import SERIES, MemoryProfiler, phase
from engine.storage import TensorStore

MB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _spike(nbytes: int, hold: float) -> None:
    x = torch.ones(nbytes // 4, dtype=torch.float32)  # written, so every page is resident
    time.sleep(hold)
    assert float(x[-1]) == 1.0
    del x


def test_sampler_sees_a_500_mb_spike_within_10_percent():
    with MemoryProfiler(interval=0.01) as prof:
        time.sleep(0.05)
        _spike(500 * MB, hold=0.3)
        time.sleep(0.1)
    rss = [v for v in prof.series["rss"] if v is not None]
    baseline = rss[0]
    spike = prof.peaks()["rss"] - baseline
    assert abs(spike - 500 * MB) <= 50 * MB, f"measured spike {spike / MB:.0f} MB for a 500 MB allocation"
    assert rss[-1] - baseline < 100 * MB  # and the memory came back
    assert prof.peaks()["vm_hwm"] >= prof.peaks()["rss"]
    assert prof.peaks()["system_used"] > 0
    # One sample per 10 ms: a loaded machine may stretch the period, never shrink it.
    gaps = sorted(b - a for a, b in zip(prof.times[1:], prof.times[2:]))
    assert gaps[len(gaps) // 2] >= 0.0095
    assert len(prof.times) >= 0.45 / 0.01 * 0.3


def test_phases_are_recorded_and_summarized():
    with MemoryProfiler(interval=0.01) as prof:
        with prof.phase("forward"):
            time.sleep(0.05)
        with phase("backward"):  # the module-level marker reaches every running profiler
            _spike(64 * MB, hold=0.1)
        with prof.phase("forward"):
            time.sleep(0.02)
    with phase("optimizer"):  # no profiler running: a no-op
        pass
    names = [p.name for p in prof.phases]
    assert names == ["forward", "backward", "forward"]
    assert all(p.end is not None and p.end > p.start for p in prof.phases)
    assert all(a.end <= b.start for a, b in zip(prof.phases, prof.phases[1:]))
    report = prof.report()
    summary = report["phase_summary"]
    assert summary["forward"]["count"] == 2 and summary["backward"]["count"] == 1
    assert summary["forward"]["total_s"] == pytest.approx(0.07, abs=0.05)
    # The spike happened inside "backward": that phase's peak RSS is the run's peak.
    assert summary["backward"]["peak_rss"] == report["peaks"]["rss"]
    assert summary["backward"]["peak_rss"] - report["series"]["rss"][0] > 50 * MB


def test_json_report_peaks_match_the_series_and_png_is_valid(tmp_path):
    pool = PinnedPool(32 * MB)
    with MemoryProfiler(interval=0.01, pool=pool) as prof:
        block = pool.alloc(8 * MB)
        time.sleep(0.05)
        block.free()
        time.sleep(0.03)
    json_path, png_path = prof.save(str(tmp_path / "out"), "run")
    with open(json_path) as f:
        report = json.load(f)
    series = report["series"]
    assert len(series["t"]) == report["samples"] > 3
    assert series["t"] == sorted(series["t"])
    for key in SERIES:
        values = [v for v in series[key] if v is not None]
        assert report["peaks"][key] == (max(values) if values else None), key
        assert len(series[key]) == len(series["t"])
    assert report["peaks"]["pool_reserved"] == pool.stats()["capacity"]
    assert report["peaks"]["pool_in_use"] == 8 * MB
    assert series["pool_in_use"][-1] == 0
    assert report["peak_system_used_over_baseline"] == report["peaks"]["system_used"] - report["baseline_system_used"]
    with open(png_path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(png_path)
    assert image.shape[0] >= 400 and image.shape[1] >= 800
    pool.close()


def test_store_counters_become_the_io_series(tmp_path):
    pool = PinnedPool(64 * MB)
    with TensorStore(str(tmp_path), pool=pool) as store:
        with MemoryProfiler(interval=0.01, store=store) as prof:
            store.put(("w",), torch.randn(4 * MB // 4))
            time.sleep(0.03)
            assert torch.equal(store.get(("w",)).view(-1)[:4], store.get(("w",)).view(-1)[:4])
            time.sleep(0.03)
            prof.detach()  # before the store closes
    report = prof.report()
    assert report["io_source"] == "store"
    assert report["totals"]["written"] >= 4 * MB
    assert report["totals"]["read"] >= 2 * 4 * MB
    written = [v for v in report["series"]["written"] if v is not None]
    assert written == sorted(written)  # cumulative
    pool.close()


def test_a_child_process_is_sampled_by_pid():
    code = "import time; x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.4)"
    child = subprocess.Popen([sys.executable, "-c", code])
    with MemoryProfiler(interval=0.01, pid=child.pid) as prof:
        child.wait()
        time.sleep(0.05)
    assert prof.process_exited
    assert prof.peaks()["rss"] >= 200 * MB
    assert prof.peaks()["rss"] < 400 * MB


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="interval"):
        MemoryProfiler(interval=0)
