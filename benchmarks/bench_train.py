"""Full fine-tuning: this engine vs plain PyTorch in memory vs this engine with every
ablation switch off (ZeRO-Infinity-like), side by side in one run.

HF Llama-style presets (vocab 32000, fp32, AdamW, batch 2 x seq 256):
  125m: 768 hidden / 12 layers     350m: 1024 / 24     1b: 2048 / 16
  125m-deep: 768 / 24 (doubles the layers at equal width: peak RSS must rise < 5%)
Each configuration runs in a fresh subprocess (the runner is engine.bench, also behind
`python -m engine bench`), from the same weights and batches; the memory profiler
records the peak of RSS (VmHWM) and of system-wide used memory (MemTotal -
MemAvailable). Step time is the median of the steps after the first (which records
the execution order). Mode "deepspeed" adds DeepSpeed ZeRO-3 on NVMe when installed.

Targets (issue 5): engine peak RSS at 1B <= 2.7 GiB; RSS +< 5% when layers double;
step time <= 1.15 x max(in-memory torch step, bytes moved / fio bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from _common import fio_bandwidth, have_fio, print_table, save_result

from engine.bench import BenchError, BenchSpec, deepspeed_missing, run_isolated, run_mode

MODES = ("engine", "torch", "baseline")  # and "deepspeed" (ZeRO-3 on NVMe) when installed


def fio_write_read_bandwidth(path: str) -> float:
    """fio's sequential 1 MiB QD16 O_DIRECT bandwidth (mean of write and read, one 1 GiB pass each), bytes/s."""
    if not have_fio():
        return float("nan")
    f = os.path.join(path, "fio.bin")
    out = [fio_bandwidth(f, rw, "1G") for rw in ("write", "read")]
    os.unlink(f)
    return sum(out) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="125m,125m-deep,350m,1b")
    parser.add_argument("--modes", default=",".join(MODES), help="engine, torch, baseline, deepspeed")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--path", default=None, help="NVMe directory (default: system temp dir)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every mode")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = dict(steps=args.steps, batch=args.batch, seq=args.seq, checkpointing=args.checkpointing)
    if args.worker:  # kept for runs started by an older driver
        print(json.dumps(run_mode(BenchSpec(model=args.model, mode=args.mode, path=args.path, **spec))))
        return 0
    path = args.path or tempfile.gettempdir()
    fio_bw = fio_write_read_bandwidth(path)
    results = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            if mode == "deepspeed" and deepspeed_missing():
                print(deepspeed_missing(), file=sys.stderr)
                continue
            try:
                # Each configuration in a fresh process (engine.bench), from the same weights and batches.
                r = run_isolated(BenchSpec(model=model, mode=mode, path=path, **spec))
            except BenchError as exc:
                print(exc, file=sys.stderr)
                continue
            results.append(r)
            print(f"{model:10s} {mode:9s} peak RSS {r['peak_rss'] / 2**30:6.2f} GiB  step {r['step_s']:7.2f} s",
                  flush=True)
    by = {(r["model"], r["mode"]): r for r in results}
    rows = []
    for r in results:
        torch_r = by.get((r["model"], "torch"))
        moved = r.get("bytes_read", 0) + r.get("bytes_written", 0)
        per_step_moved = moved / max(1, len(r["times"]))
        bound = max(torch_r["step_s"] if torch_r else 0.0, per_step_moved / fio_bw if fio_bw == fio_bw else 0.0)
        rows.append([r["model"], r["mode"], f"{r['params'] / 1e6:.0f}M", f"{r['peak_rss'] / 2**30:.2f}",
                     f"{r['peak_system'] / 2**30:.2f}", f"{r['step_s']:.2f}",
                     f"{r['peak_rss'] / torch_r['peak_rss']:.2f}" if torch_r else "",
                     f"{r['step_s'] / bound:.2f}" if r["mode"] != "torch" and bound else ""])
    print(f"\nbatch {args.batch} x seq {args.seq}, "
          f"fp32 AdamW{', activation checkpointing' if args.checkpointing else ''}, "
          f"median step of {args.steps} (first excluded); "
          f"fio 1 MiB QD16 mean(write, read) = {fio_bw / 2**30:.2f} GiB/s")
    print_table(["model", "mode", "params", "peak RSS GiB", "peak sys GiB", "step s", "RSS / torch",
                 "step / max(torch, io/fio)"], rows)
    if ("125m", "engine") in by and ("125m-deep", "engine") in by:
        growth = by[("125m-deep", "engine")]["peak_rss"] / by[("125m", "engine")]["peak_rss"] - 1
        print(f"engine peak RSS when layers double (125m -> 125m-deep): {growth:+.1%} (target < +5%)")
    if ("1b", "engine") in by:
        print(f"engine peak RSS at 1B: {by[('1b', 'engine')]['peak_rss'] / 2**30:.2f} GiB (target <= 2.7 GiB)")
    print("saved", save_result("train", dict(fio_bw=fio_bw, checkpointing=args.checkpointing, results=results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
