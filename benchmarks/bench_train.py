"""Full fine-tuning: this engine vs plain PyTorch in memory vs this engine with every
ablation switch off (ZeRO-Infinity-like), side by side in one run.

HF Llama-style presets (vocab 32000, fp32, AdamW, batch 2 x seq 256):
  125m: 768 hidden / 12 layers     350m: 1024 / 24     1b: 2048 / 16
  125m-deep: 768 / 24 (doubles the layers at equal width: peak RSS must rise < 5%)
Each configuration runs in a fresh subprocess; a sampler thread records the peak of
RSS (VmHWM) and of system-wide used memory (MemTotal - MemAvailable). Step time is
the median of the steps after the first (which records the execution order).

Targets (issue 5): engine peak RSS at 1B <= 2.7 GiB; RSS +< 5% when layers double;
step time <= 1.15 x max(in-memory torch step, bytes moved / fio bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PRESETS = {
    "125m": dict(hidden=768, layers=12, intermediate=2048, heads=12),
    "125m-deep": dict(hidden=768, layers=24, intermediate=2048, heads=12),
    "350m": dict(hidden=1024, layers=24, intermediate=2816, heads=16),
    "1b": dict(hidden=2048, layers=16, intermediate=5632, heads=32),
}
MODES = ("engine", "torch", "baseline")


def _meminfo() -> tuple[int, int]:
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024
    return fields["MemTotal"], fields["MemAvailable"]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


class Sampler(threading.Thread):
    """Peak system-wide used memory, sampled every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_system = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total, available = _meminfo()
            self.peak_system = max(self.peak_system, total - available)
            self._halt.wait(0.02)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak_system


def worker(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    p = PRESETS[args.model]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    baseline_system = _meminfo()[0] - _meminfo()[1]
    sampler = Sampler()
    sampler.start()
    data = [torch.randint(0, 32000, (args.batch, args.seq)) for _ in range(args.steps)]
    times = []
    extra = {}
    if args.mode == "torch":
        model = LlamaForCausalLM(cfg)
        if args.checkpointing:
            model.gradient_checkpointing_enable()
            model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        for x in data:
            start = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
    else:
        import engine

        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        if args.checkpointing:
            model.gradient_checkpointing_enable()
            model.train()
        gen = torch.Generator().manual_seed(0)

        def init(name, shape):
            if "norm" in name:
                return torch.ones(shape)
            if name.endswith("inv_freq"):
                return None
            return torch.randn(shape, generator=gen) * 0.02

        conf = engine.Config(nvme_path=args.path, optimizer=engine.AdamWConfig(lr=1e-5))
        if args.mode == "baseline":
            conf = conf.with_baseline()
        with engine.initialize(model, conf, initializer=init) as trainer:
            for x in data:
                start = time.perf_counter()
                trainer.backward(trainer(input_ids=x, labels=x).loss)
                trainer.step()
                times.append(time.perf_counter() - start)
            report = trainer.memory_report()
        extra = dict(bytes_read=report["bytes_read"], bytes_written=report["bytes_written"],
                     pool_bytes=report["pool"]["capacity"], predicted_peak=report["plan"]["predicted_peak_bytes"],
                     io_wait_s=report["io_wait_s"], backend=report["backend"])
    peak_system = sampler.stop()
    return dict(model=args.model, mode=args.mode, params=sum(p.numel() for p in model.parameters()),
                peak_rss=_status("VmHWM"), peak_system=peak_system - baseline_system,
                step_s=statistics.median(times[1:]) if len(times) > 1 else times[0], times=times, **extra)


def fio_write_read_bandwidth(path: str) -> float:
    """fio's sequential 1 MiB QD16 O_DIRECT bandwidth (mean of write and read), bytes/s."""
    if shutil.which("fio") is None:
        return float("nan")
    f = os.path.join(path, "fio.bin")
    out = []
    for rw in ("write", "read"):
        res = subprocess.run(["fio", "--name=b", f"--filename={f}", f"--rw={rw}", "--bs=1M", "--iodepth=16",
                              "--ioengine=io_uring", "--direct=1", "--size=1G", "--output-format=json"],
                             capture_output=True, text=True, check=True).stdout
        out.append(json.loads(res[res.index("{"):])["jobs"][0][rw]["bw_bytes"])
    os.unlink(f)
    return sum(out) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="125m,125m-deep,350m,1b")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--path", default=None, help="NVMe directory (default: system temp dir)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every mode")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from _common import print_table, save_result

    path = args.path or tempfile.gettempdir()
    fio_bw = fio_write_read_bandwidth(path)
    results = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--mode", mode, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--path", path] + \
                (["--checkpointing"] if args.checkpointing else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{model}/{mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{model:10s} {mode:8s} peak RSS {r['peak_rss'] / 2**30:6.2f} GiB  step {r['step_s']:7.2f} s",
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
    print(f"\nbatch {args.batch} x seq {args.seq}, fp32 AdamW{', activation checkpointing' if args.checkpointing else ''}, "
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
