"""Helpers shared by the benchmark scripts: the engine on the import path, result files,
tables, worker subprocesses, fio, and parameter shapes of a model config.

What the engine already has is imported from it, not rewritten: model presets
(``engine.presets``), the per-name seeded initializer and table formatting
(``engine.bench``), process and system memory (``engine.procinfo``). What is here is
what only the scripts need.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without installing: the checkout's engine (an installed one wins)
    sys.path.append(REPO)

from engine.bench import format_table  # noqa: E402
from engine.errors import BenchError  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save_result(name: str, payload: dict) -> str:
    """Writes ``payload`` (plus host facts) to benchmarks/results/<name>-<time>.json; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = dict(payload, host=platform.node(), cpus=os.cpu_count(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    path = os.path.join(RESULTS_DIR, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """The plain-text table of :func:`engine.bench.format_table`, printed."""
    print(format_table(headers, rows))


# ---------------------------------------------------------------------- worker subprocesses
def child_env(**extra: str) -> dict[str, str]:
    """This environment, with the checkout on PYTHONPATH so a child script imports the same engine."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if REPO not in parts:
        parts.append(REPO)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(parts), **extra)


def run_worker(args: Sequence[str], *, what: str, env: Optional[dict[str, str]] = None,
               marker: str = "", timeout: Optional[float] = None) -> dict:
    """Runs ``python ARGS...`` in a fresh process (so its peak RSS is its own) and returns the
    JSON object on its last stdout line starting with ``marker``. Raises :class:`BenchError`
    naming ``what`` with the child's output tail when it fails or prints no result."""
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env=child_env() if env is None else env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout:.0f} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker) and line.strip()]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(marker):])


# ---------------------------------------------------------------------- fio
def have_fio() -> bool:
    return shutil.which("fio") is not None


def fio_bandwidth(filename: str, rw: str, size: Union[int, str], *, bs: Union[int, str] = "1M", iodepth: int = 16,
                  seconds: Optional[float] = None) -> float:
    """fio's bandwidth in bytes/s for ``rw`` (read, write, randread, randwrite) on ``filename``:
    io_uring, O_DIRECT, one job; time-based over ``seconds`` when given, else one pass over
    ``size``. Random patterns touch offsets in a fresh order each run (no random map)."""
    cmd = ["fio", "--name=bench", f"--filename={filename}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}",
           "--ioengine=io_uring", "--direct=1", f"--size={size}", "--numjobs=1", "--randrepeat=0", "--norandommap",
           "--output-format=json"]
    if seconds is not None:
        cmd += ["--time_based", f"--runtime={seconds}s"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["read" if "read" in rw else "write"]["bw_bytes"])


# ---------------------------------------------------------------------- model shapes
def parameter_shapes(config) -> list[tuple[int, ...]]:
    """Shapes of every parameter tensor of the causal LM a transformers ``config`` describes, in
    module order, as Hugging Face builds it (on the meta device: nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [tuple(p.shape) for p in model.parameters()]
