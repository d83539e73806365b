"""The GPU check (issue 14): on a fresh GPU machine with torch preinstalled and no network,
install what is missing from a wheel directory, build the engine in place, report the I/O
backend and O_DIRECT, run the CUDA tests, then benchmark a ~1B Llama and a 7B-shape Llama
with few layers in bf16 - the engine vs plain PyTorch in memory on the same GPU - and print
one table (also written as JSON to --out). With more than one GPU it also runs
``benchmarks/bench_distributed.py`` under torchrun (NCCL): 1 GPU vs 2 GPUs with partitioned
state, the same global batch, per-rank step and optimizer time, NVMe bytes and disk (JSON key
``distributed``); with one GPU that phase is skipped, not failed.

    bash benchmarks/gpu_check.sh                      # on the GPU machine (about 6-8 minutes on an H200)
    python benchmarks/gpu_check.py --device cpu --quick --skip-build --skip-tests   # smoke run, no GPU

Every phase is timed and may fail without stopping the rest (each benchmark runs in a fresh
process with a timeout); the exit status is 0 whenever the script itself ran, and the failures
are listed at the end. Nothing touches the installed torch: missing packages are installed with
``pip install --no-index --find-links WHEELS`` under a constraint that pins the installed torch,
and the engine is built in place (``setup.py build_ext --inplace``) and used from this checkout,
not installed. Modes: ``engine`` (this engine, device --device) and ``torch`` (plain PyTorch in
memory on the same device: fp32 weights, bf16 autocast, torch.optim.AdamW), run only where the
model fits in the device's free memory. The driver imports no engine module before the build,
so the helpers it needs (the table, the subprocess runner) are written here.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
MARKER = "GPU_CHECK_RESULT "
# import name -> pip name of what the engine, its build and its tests need beside torch.
NEEDED = {"numpy": "numpy", "psutil": "psutil", "crc32c": "crc32c", "tqdm": "tqdm", "matplotlib": "matplotlib",
          "transformers": "transformers", "safetensors": "safetensors", "peft": "peft", "pybind11": "pybind11",
          "pytest": "pytest", "hypothesis": "hypothesis"}
GiB = 1 << 30


def child_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH: children import this tree's engine."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]))


def run(cmd: list[str], timeout: float, cwd: str = REPO) -> tuple[int, str]:
    """``cmd``'s exit status (124 on timeout, 127 when it cannot start) and its output."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)"
    except OSError as exc:
        return 127, str(exc)
    return proc.returncode, proc.stdout + proc.stderr


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    cells = [headers] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
           for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


class Check:
    """The phases run so far: their times, results and failures."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.facts: dict[str, Any] = {}

    def phase(self, name: str, fn: Callable[[], Optional[str]]) -> None:
        """Runs ``fn`` (returns a failure message or None), timed; an exception is a failure too."""
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            failure = fn()
        except Exception as exc:  # a phase's own bug must not stop the check
            failure = f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - t0
        self.phases.append(dict(phase=name, seconds=round(elapsed, 1), ok=failure is None, failure=failure))
        if failure:
            self.failures.append(f"{name}: {failure.splitlines()[0] if failure.strip() else 'failed'}")
            print(f"FAILED: {failure}", flush=True)
        print(f"-- {name}: {elapsed:.1f} s (total {time.perf_counter() - self.start:.0f} s)", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------- phases of the driver
def environment(check: Check, device: str) -> Optional[str]:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    facts = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                 cpus=os.cpu_count(), ram_gib=round(mem / GiB, 1), host=platform.node(), device=device,
                 cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        facts.update(gpu=props.name, gpu_gib=round(total / GiB, 1), gpu_free_gib=round(free / GiB, 1),
                     gpus=torch.cuda.device_count())
    check.facts.update(facts)
    for key, value in facts.items():
        print(f"{key:15s} {value}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device} but torch.cuda.is_available() is False (torch {torch.__version__})"
    return None


def dependencies(wheels: Optional[str]) -> Optional[str]:
    import torch

    missing = [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]
    print("missing:", ", ".join(missing) or "nothing")
    if not missing:
        return None
    if not wheels or not os.path.isdir(wheels):
        return f"missing {', '.join(missing)} and no wheel directory ({wheels or 'none given'}; use --wheels DIR)"
    # The constraint keeps pip from replacing the machine's torch, even for a wheel that asks for another.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(f"torch=={torch.__version__}\n")
    try:
        rc, out = run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, "-c", f.name,
                       *missing], timeout=120)
    finally:
        os.unlink(f.name)
    print(tail(out))
    importlib.invalidate_caches()  # what pip just installed is found by find_spec
    still = [pip for mod, pip in NEEDED.items() if importlib.util.find_spec(mod) is None]
    return None if rc == 0 and not still else f"pip exit {rc}; still missing: {', '.join(still) or 'nothing'}"


def build(check: Check) -> Optional[str]:
    rc, out = run([sys.executable, "setup.py", "build_ext", "--inplace"], timeout=240)
    lines = [line for line in out.splitlines() if line.startswith("memascend:")]
    print("\n".join(lines) or tail(out))
    check.facts["build"] = "; ".join(lines)
    return None if rc == 0 else f"build exit {rc}:\n{tail(out, 30)}"


def io_selfcheck(check: Check, path: str) -> Optional[str]:
    """The engine's own self-check (pool + O_DIRECT round trip); on failure, the thread backend alone
    tells an io_uring refusal from an O_DIRECT one."""
    base = [sys.executable, "-m", "engine", "selfcheck", "--size", "64MiB", "--quiet", "--path", path]
    rc, out = run(base, timeout=60)
    print(out.strip())
    if rc == 0:
        match = re.search(r"I/O backend:\s+(.*)", out)
        check.facts.update(io_backend=match.group(1) if match else "?", o_direct="works")
        return None
    rc2, out2 = run(base + ["--backend", "threads"], timeout=60)
    print("with --backend threads:", out2.strip())
    check.facts.update(io_backend="threads (auto failed)" if rc2 == 0 else "none",
                       o_direct="works (threads)" if rc2 == 0 else "refused or failing")
    return f"selfcheck exit {rc}: {tail(out, 3)}" + ("" if rc2 == 0 else f"; threads too: {tail(out2, 3)}")


def cuda_tests(check: Check) -> Optional[str]:
    # The files that hold CUDA tests (collecting the whole suite needs its test-only extras, e.g. hypothesis).
    files = ["tests/test_cuda.py", "tests/test_device.py", "tests/test_pool.py", "tests/test_streaming.py"]
    rc, out = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rfEs", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", *files],
                  timeout=240)
    print(tail(out, 40))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)}
    check.facts["cuda_tests"] = counts
    if rc in (0, 5) and not counts.get("failed") and not counts.get("error") and not counts.get("errors"):
        return None
    return f"pytest exit {rc}: {counts}"


def distributed(check: Check, args, timeout: float, out: dict) -> Optional[str]:
    """1 vs 2 GPUs (torchrun, NCCL, partitioned state) through bench_distributed.py; skipped below 2 GPUs."""
    gpus = check.facts.get("gpus", 0) if args.device.startswith("cuda") else 0
    if gpus < 2:
        out["status"] = f"skipped: {gpus} GPU(s) (needs 2)"
        print(out["status"])
        return None
    dims = (["--hidden", "256", "--layers", "2", "--batch", "4", "--seq", "64"] if args.quick else
            ["--hidden", "1024", "--layers", "4", "--batch", "8", "--seq", "256"])
    with tempfile.TemporaryDirectory(prefix="gpu-check-dist-", dir=args.path) as scratch:
        result = os.path.join(scratch, "distributed.json")
        rc, text = run([sys.executable, os.path.join(BENCH_DIR, "bench_distributed.py"), "--device", "cuda",
                        "--dtype", "bf16", "--torchrun", "--configs", "1,2p", "--steps", str(args.steps), *dims,
                        "--threads", str(max(1, (os.cpu_count() or 2) // 2)), "--path", scratch, "--out", result],
                       timeout=timeout)
        print(tail(text, 12))
        if rc != 0 or not os.path.exists(result):
            out["status"] = f"failed (exit {rc})"
            return f"exit {rc}: {tail(text, 1) or 'no output'}\n{tail(text, 25)}"
        with open(result) as f:
            out.update(json.load(f), status="ok")
    return None


# ---------------------------------------------------------------------- benchmarks
def bench_specs(args) -> list[dict[str, Any]]:
    common = dict(steps=args.steps, batch=args.batch, seq=args.seq, path=args.path)
    if args.quick:  # the smoke run: a tiny preset, and the same with fewer layers (the layer override)
        models = [("tiny", "tiny", None), ("tiny-2l", "tiny", 2)]
    else:
        models = [("1b", "1b", None), (f"7b-shape {args.layers_7b}L", "llama-7b", args.layers_7b)]
    return [dict(name=name, preset=preset, layers=layers, mode=mode, device=args.device, **common)
            for name, preset, layers in models for mode in ("torch", "engine")]


def benchmark(check: Check, spec: dict[str, Any], timeout: float, results: list[dict]) -> Optional[str]:
    scratch = tempfile.mkdtemp(prefix="gpu-check-", dir=spec["path"])  # removed even after a killed child
    try:
        rc, out = run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(dict(spec, path=scratch))],
                      timeout=timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith(MARKER)]
    if rc != 0 or not lines:
        results.append(dict(spec, status=f"failed (exit {rc})"))
        last = tail(out, 1) or "no output"  # a traceback's last line names the exception
        return f"exit {rc}: {last}\n{tail(out, 25)}"
    result = json.loads(lines[-1][len(MARKER):])
    results.append(result)
    if result.get("plan_error"):  # measured all the same; the planner's failure is listed
        check.failures.append(f"plan of {spec['name']}: {result['plan_error'].splitlines()[0]}")
    if result["status"] != "ok":
        print(result["status"])
        return result["status"] if result["status"].startswith("failed") else None
    else:
        print(f"step {result['step_s']:.3f} s, {result['tokens_per_s']:.0f} tokens/s, device {result['device']}")
    return None


def _gib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / GiB:.2f}"


def _num(value: Optional[float], fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def result_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "mode", "device", "params", "step s", "tok/s", "GPU peak GiB (plan)", "RSS GiB (plan)",
               "NVMe GB/s", "NVMe wait", "H2D wait", "compute", "D2H wait", "optim", "loss0", "status"]
    rows = []
    for r in results:
        ok = r.get("status") == "ok"
        gpu = f"{_gib(r.get('gpu_peak'))} ({_gib(r.get('plan_gpu_peak'))})" if ok else ""
        rss = f"{_gib(r.get('peak_rss'))} ({_gib(r.get('plan_host_peak'))})" if ok else ""
        split = [_num(r.get(k)) if ok and r["mode"] == "engine" else "" for k in
                 ("nvme_gb_s", "nvme_wait_s", "h2d_wait_s", "compute_s", "d2h_wait_s", "optimizer_s")]
        rows.append([r["name"], r["mode"], str(r.get("device", "")), f"{r['params'] / 1e6:.0f}M" if ok else "",
                     _num(r.get("step_s"), ".3f") if ok else "", _num(r.get("tokens_per_s"), ".0f") if ok else "",
                     gpu, rss, *split, _num(r.get("loss0"), ".4f") if ok else "", r.get("status", "")])
    return headers, rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or separate (CPU test modes)")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke run of the script")
    parser.add_argument("--skip-build", action="store_true", help="use the engine._native already built")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA tests")
    parser.add_argument("--wheels", default=os.path.join(BENCH_DIR, "wheels"),
                        help="directory of wheels for missing packages (default benchmarks/wheels/)")
    parser.add_argument("--path", default=None, help="NVMe directory for the swap files (default: the temp dir)")
    parser.add_argument("--out", default=None, help="JSON file for the results (default benchmarks/results/...)")
    parser.add_argument("--steps", type=int, default=None, help="steps per benchmark; the first is excluded (3)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (8; --quick: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (512; --quick: 64)")
    parser.add_argument("--layers-7b", type=int, default=4, help="layers of the 7B-shape model (of 32; default 4)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark at most (240; --quick: 300)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (470, under 8 minutes; --quick: 1200): a benchmark gets "
                             "what is left, and none starts with under 30 s left")
    parser.add_argument("--skip-distributed", action="store_true", help="do not run the 2-GPU torchrun benchmark")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from _gpu_worker import run_benchmark  # imports the engine: only in the worker process

        print(MARKER + json.dumps(run_benchmark(json.loads(args.worker))), flush=True)
        return 0
    args.steps = args.steps or 3
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (64 if args.quick else 512)
    args.timeout = args.timeout or (300 if args.quick else 240)
    args.budget = args.budget or (1200 if args.quick else 470)
    args.path = os.path.abspath(args.path or tempfile.gettempdir())
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is excluded from the timings)")
    check = Check()
    check.phase("environment", lambda: environment(check, args.device))
    check.phase("dependencies", lambda: dependencies(args.wheels))
    if not args.skip_build:
        check.phase("build", lambda: build(check))
    check.phase("I/O self-check", lambda: io_selfcheck(check, args.path))
    if not args.skip_tests:
        check.phase("CUDA tests (pytest -m cuda)", lambda: cuda_tests(check))
    dist_result: dict = {}
    if not args.skip_distributed:  # before the single-GPU benchmarks: bounded, and skipped without 2 GPUs
        limit = min(args.timeout, max(args.budget - check.elapsed() - 10, 1))
        check.phase("2-GPU torchrun (bench_distributed)", lambda: distributed(check, args, limit, dist_result))
    results: list[dict] = []
    for spec in bench_specs(args):
        label = f"benchmark {spec['name']} / {spec['mode']}"
        left = args.budget - check.elapsed() - 10  # 10 s for the report
        if left < 30:
            results.append(dict(spec, status=f"skipped: time budget ({args.budget:.0f} s) spent"))
            check.failures.append(f"{label}: skipped, the time budget was spent")
            continue
        limit = min(args.timeout, left)
        check.phase(label, lambda spec=spec, limit=limit: benchmark(check, spec, limit, results))
    report(check, args, results, dist_result)
    return 0


def distributed_rows(dist: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["config", "rank", "step s", "optim s", "read MB", "written MB", "disk MB", "GPU peak GiB",
               "vs 1 GPU (optim, optim CPU, NVMe bytes)"]
    rows = [[r["config"], str(r["rank"]), f"{r['step_s']:.3f}", f"{r['optimizer_s']:.3f}", f"{r['read'] / 1e6:.1f}",
             f"{r['written'] / 1e6:.1f}", f"{r['disk'] / 1e6:.1f}", _gib(r.get("gpu_peak")),
             f"{r['vs_1_rank']['optimizer']:.2f}x, {r['vs_1_rank']['optimizer_cpu']:.2f}x, "
             f"{r['vs_1_rank']['nvme_bytes']:.2f}x"] for r in dist.get("rows", [])]
    return headers, rows


def report(check: Check, args, results: list[dict], dist: Optional[dict] = None) -> None:
    print("\n== phases")
    print(format_table(["phase", "seconds", "result"],
                       [[p["phase"], f"{p['seconds']:.1f}", "ok" if p["ok"] else "FAILED"] for p in check.phases]))
    facts = check.facts
    print(f"\nGPU check: {facts.get('gpu', 'no GPU')} ({facts.get('gpu_gib', '-')} GiB), torch {facts.get('torch')} "
          f"CUDA {facts.get('cuda')}, Python {facts.get('python')}, {facts.get('cpus')} CPUs, "
          f"{facts.get('ram_gib')} GiB RAM; I/O backend {facts.get('io_backend', '?')}, O_DIRECT "
          f"{facts.get('o_direct', '?')}; CUDA tests {facts.get('cuda_tests', 'not run')}")
    print(f"bf16, batch {args.batch} x seq {args.seq}, median of steps 2..{args.steps}; engine: bf16 weights, fp32 "
          f"masters, AdamW on the CPU over NVMe state; torch: fp32 weights + bf16 autocast, torch.optim.AdamW, in "
          f"device memory. 7B-shape = Llama-2-7B's widths with {args.layers_7b} of its 32 layers. Seconds per step; "
          f"compute = forward + backward minus the NVMe, H2D and D2H waits; n/a = the engine reports no such figure.")
    headers, rows = result_rows(results)
    print(format_table(headers, rows))
    dist = dist or {}
    if dist.get("rows"):
        print(f"\n2 GPUs (torchrun, NCCL, partitioned state) vs 1, same global batch; target optimizer time and NVMe "
              f"bytes per rank <= {dist.get('target')}x: {'met' if dist.get('target_met') else 'NOT met'}")
        print(format_table(*distributed_rows(dist)))
    elif dist.get("status"):
        print(f"\n2-GPU torchrun run: {dist['status']}")
    print(f"\ntotal {check.elapsed():.0f} s")
    if check.failures:
        print(f"{len(check.failures)} failure(s):")
        for failure in check.failures:
            print("  -", failure)
    else:
        print("no failures")
    out = args.out or os.path.join(BENCH_DIR, "results", f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(facts=facts, phases=check.phases, results=results, distributed=dist, failures=check.failures,
                       settings=dict(device=args.device, steps=args.steps, batch=args.batch, seq=args.seq,
                                     layers_7b=args.layers_7b, quick=args.quick),
                       total_s=round(check.elapsed(), 1)), f, indent=2)
    print("results written to", out)


if __name__ == "__main__":
    sys.exit(main())
