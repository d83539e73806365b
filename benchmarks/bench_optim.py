"""CPU optimizer step throughput: CPUAdamW vs torch.optim.AdamW, side by side.

Measures, in one run on one machine:
- a memory-copy bandwidth (torch ``copy_`` of a large buffer; read + write bytes)
  and, for reference, an in-place add bandwidth (``a.add_(b)``: 2 reads + 1 write),
- torch.optim.AdamW(foreach=True) and, when the build supports it on CPU, fused=True,
- engine.optim.CPUAdamW in the requested configurations,
and prints parameters per second and achieved bytes per second. Bytes are the
minimum traffic of one AdamW step: param read+write, grad read, exp_avg and
exp_avg_sq read+write, plus the bf16/fp16 copy of the weights when written. The
same nominal count is used for torch (which in fact moves more).

    python benchmarks/bench_optim.py                 # 100M parameters
    python benchmarks/bench_optim.py --params 20e6 --steps 3
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import _common  # noqa: F401 - puts the checkout's engine on the import path when it is not installed
import torch

from engine.dtypes import itemsize
from engine.optim import CPUAdamW, kernels


@dataclass
class Row:
    name: str
    step_s: float
    params_per_s: float
    bytes_per_step: int
    bytes_per_s: float


def split_sizes(total: int, tensors: int) -> list[int]:
    """``tensors`` sizes summing to ``total`` (uneven, like a model's layers)."""
    base, rem = divmod(total, tensors)
    return [base + (1 if i < rem else 0) for i in range(tensors)]


def step_bytes(n: int, grad_dtype: torch.dtype, state_dtype: torch.dtype, out_dtype: Optional[torch.dtype]) -> int:
    gsize, ssize = itemsize(grad_dtype), itemsize(state_dtype)
    per = 4 + 4 + gsize + 2 * ssize + 2 * ssize  # param r/w, grad r, m r/w, v r/w
    if out_dtype is not None:
        per += itemsize(out_dtype)
    return n * per


def time_steps(step: Callable[[], None], steps: int, warmup: int) -> float:
    """Median seconds per call after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, steps: int) -> float:
    """Read + write bytes per second of torch's copy_ between two large buffers."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = time_steps(lambda: dst.copy_(src), steps=max(steps, 5), warmup=2)
    return 2 * src.numel() * 4 / t


def add_bandwidth(nbytes: int, steps: int) -> float:
    """Bytes per second of ``a.add_(b)``: read a, read b, write a (a read-modify-write
    stream like the optimizer's, with no write-allocate traffic left uncounted)."""
    a = torch.ones(nbytes // 4)
    b = torch.ones_like(a)
    t = time_steps(lambda: a.add_(b), steps=max(steps, 5), warmup=2)
    return 3 * a.numel() * 4 / t


def make_params(sizes: list[int], grad_dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=gen))
        if grad_dtype != torch.float32 and hasattr(p, "grad_dtype"):
            p.grad_dtype = None  # let a bf16/fp16 grad sit on an fp32 param
        p.grad = (torch.randn(n, generator=gen) * 1e-2).to(grad_dtype)
        params.append(p)
    return params


def bench_torch(sizes: list[int], mode: str, steps: int, warmup: int) -> Optional[float]:
    params = make_params(sizes, torch.float32)
    try:
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **{mode: True})
        opt.step()  # allocates the state
    except (RuntimeError, ValueError) as e:
        print(f"  torch AdamW({mode}=True) unavailable on CPU: {e}", file=sys.stderr)
        return None
    t = time_steps(opt.step, steps, warmup)
    del opt, params
    gc.collect()
    return t


def bench_ours(sizes: list[int], grad_dtype: torch.dtype, state_dtype: torch.dtype,
               out_dtype: Optional[torch.dtype], steps: int, warmup: int) -> float:
    params = make_params(sizes, grad_dtype)
    opt = CPUAdamW(params, lr=1e-3, weight_decay=0.01, state_dtype=state_dtype)
    out = None if out_dtype is None else {p: torch.empty(p.shape, dtype=out_dtype) for p in params}
    # A partial, not a lambda: a closure over opt and out would outlive the del below as free names.
    step = functools.partial(opt.step, out=out)
    t = time_steps(step, steps, warmup)
    del step, opt, params, out
    gc.collect()
    return t


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=100e6, help="total parameters (default 1e8)")
    ap.add_argument("--tensors", type=int, default=16, help="number of parameter tensors (default 16)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the copy bandwidth test")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    total = int(args.params)
    sizes = split_sizes(total, args.tensors)
    print(f"{total / 1e6:.1f}M parameters in {len(sizes)} tensors; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, kernels: {kernels.active_isa()}")

    copy_bw = copy_bandwidth(args.copy_mib << 20, args.steps)
    add_bw = add_bandwidth(args.copy_mib << 20, args.steps)
    rows: list[Row] = []

    def add(name: str, t: Optional[float], nbytes: int) -> None:
        if t is not None:
            rows.append(Row(name, t, total / t, nbytes, nbytes / t))
            print(f"  {name:<40s} {t * 1e3:9.1f} ms/step", flush=True)

    fp32_bytes = step_bytes(total, torch.float32, torch.float32, None)
    if not args.no_torch:
        add("torch AdamW foreach=True", bench_torch(sizes, "foreach", args.steps, args.warmup), fp32_bytes)
        add("torch AdamW fused=True", bench_torch(sizes, "fused", args.steps, args.warmup), fp32_bytes)
    configs = [
        ("CPUAdamW fp32", torch.float32, torch.float32, None),
        ("CPUAdamW fp32 + bf16 weights out", torch.float32, torch.float32, torch.bfloat16),
        ("CPUAdamW bf16 grad + bf16 weights out", torch.bfloat16, torch.float32, torch.bfloat16),
        ("CPUAdamW bf16 grad, bf16 m/v, bf16 out", torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ]
    for name, gd, sd, od in configs:
        add(name, bench_ours(sizes, gd, sd, od, args.steps, args.warmup), step_bytes(total, gd, sd, od))

    foreach = next((r for r in rows if r.name.startswith("torch AdamW foreach")), None)
    print()
    print(f"copy bandwidth (torch copy_, {args.copy_mib} MiB, read+write): {copy_bw / 1e9:.2f} GB/s")
    print(f"in-place add bandwidth (torch add_, {args.copy_mib} MiB x2, 2 reads + 1 write): {add_bw / 1e9:.2f} GB/s")
    header = (f"{'optimizer':<40s} {'ms/step':>9s} {'Mparam/s':>9s} {'GB/step':>8s} {'GB/s':>7s} {'% copy':>7s} "
              f"{'x foreach':>9s}")
    print(header)  # % copy: achieved bytes/s over the copy bandwidth
    print("-" * len(header))
    for r in rows:
        speed = f"{foreach.step_s / r.step_s:9.2f}" if foreach else f"{'-':>9s}"
        print(f"{r.name:<40s} {r.step_s * 1e3:9.1f} {r.params_per_s / 1e6:9.1f} {r.bytes_per_step / 1e9:8.2f} "
              f"{r.bytes_per_s / 1e9:7.2f} {100 * r.bytes_per_s / copy_bw:6.1f}% {speed}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": total, "tensors": len(sizes), "threads": torch.get_num_threads(),
                       "isa": kernels.active_isa(), "copy_bytes_per_s": copy_bw, "add_bytes_per_s": add_bw,
                       "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
