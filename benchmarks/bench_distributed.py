"""1 rank vs 2 ranks (gloo, CPU), partitioned and replicated, with the same global batch: step time,
optimizer time, NVMe bytes, peak RSS and disk use per rank, with ratios to one rank; one table,
and the same figures as JSON in benchmarks/results/bench_distributed-<time>.json.

    python benchmarks/bench_distributed.py [--steps 4] [--batch 4] [--hidden 256] [--layers 4]
    python benchmarks/bench_distributed.py --device cuda --dtype bf16 --torchrun --configs 1,2p   # 2 GPUs (gpu_check)

Each configuration runs in fresh processes given torchrun's environment (the 2 ranks on a free
port), each rank pinned to one thread (OMP_NUM_THREADS=MKL_NUM_THREADS=1; ``--threads``) and its own swap
directory (``nvme_path`` ``.../nvme{rank}``). Partitioned (ZeRO-3 over NVMe), each rank stores and
updates 1/2 of every tensor: the target is optimizer time and NVMe bytes per rank <= 0.55x of one
rank's. Replicated, every rank runs the whole optimizer on its own copy (1.0x). Bytes are the
store's counters per step after a warm-up step, times the median step: "optim s" the engine's
optimizer compute (wall clock: inflated when other processes take the cores), "CPU s" the CPU time
of the same updates (thread time: what the target is checked on, with the NVMe bytes);
optimizer elements are those a rank updates (its shards); disk is what the rank's swap directory occupies
(allocated blocks) at the end. Step times include the collectives over loopback gloo; on a machine
with fewer cores than ranks the ranks also share cores.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

from _common import save_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 0.55  # optimizer time and NVMe bytes per rank at 2 partitioned ranks, vs one rank (issue 16)
_WORKER = r'''
import json, os, statistics, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import engine
from engine.distributed import shard_indices
from engine.offload.stepper import OptimizerStepper

# The optimizer's CPU time: the stepper's update, timed in its thread (a benchmark-only wrapper of a
# private method). Its own counter is wall clock, inflated whenever other processes take the cores.
_update, _cpu = OptimizerStepper._update, [0.0]


def _timed_update(self, *args, **kwargs):
    start = time.thread_time()
    try:
        return _update(self, *args, **kwargs)
    finally:
        _cpu[0] += time.thread_time() - start


OptimizerStepper._update = _timed_update

a = json.loads(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=a["hidden"], intermediate_size=4 * a["hidden"],
                                     num_hidden_layers=a["layers"], num_attention_heads=4, num_key_value_heads=4,
                                     max_position_embeddings=128)).float()
cfg = engine.Config(nvme_path=a["nvme"], device=a["device"], dtype=a["dtype"], gradient_accumulation_steps=1,
                    gradient_clipping=1.0,
                    resident_threshold_bytes=4096, trainable_placement="nvme",
                    state_partitioning=a["partitioning"])
trainer = engine.initialize(model, cfg)
spec = trainer.runtime.distributed
g = torch.Generator().manual_seed(1)
data = [torch.randint(0, 1024, (a["batch"], a["seq"]), generator=g) for _ in range(a["steps"] + 1)]
mine = list(shard_indices(a["batch"], spec))
times, optim, optim_cpu, losses = [], [], [], []
for i, x in enumerate(data):
    if i == 1:
        base = trainer.memory_report()  # step 0 warms up (first reads, allocation)
    before = trainer.runtime.stats().optimizer_compute_s
    t0 = time.perf_counter()
    x = x[mine]
    loss = trainer(input_ids=x, labels=x).loss
    trainer.backward(loss)
    losses.append(loss.item())
    cpu0 = _cpu[0]
    trainer.step()
    cpu = _cpu[0] - cpu0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if i:
        times.append(time.perf_counter() - t0)
        optim.append(trainer.runtime.stats().optimizer_compute_s - before)
        optim_cpu.append(cpu)
r = trainer.memory_report()
part = trainer.runtime.partition  # None: one process, or replicated
updated = sum(part.own(s.numel) if part is not None else s.numel for s in trainer.runtime.trainable)
nvme = a["nvme"].format(rank=spec.rank, local_rank=spec.local_rank)
disk = sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(nvme) for f in files)
# Medians of the timed steps: the ranks share cores with whatever else runs (the bytes are exact).
out = dict(rank=spec.rank, step_s=statistics.median(times), optimizer_s=statistics.median(optim),
           optimizer_cpu_s=statistics.median(optim_cpu), optimizer_elements=updated,
           read=(r["bytes_read"] - base["bytes_read"]) / len(times),
           written=(r["bytes_written"] - base["bytes_written"]) / len(times), peak_rss=r["peak_rss_bytes"],
           disk=disk, planned_disk=r["plan"]["disk_bytes"], device=r["device"],
           gpu_peak=r["gpu_peak_allocated_bytes"], losses=losses)
with open(os.path.join(a["out"], f"rank{spec.rank}.json"), "w") as f:
    json.dump(out, f)
trainer.close()
'''
# --configs name -> (label, ranks, state_partitioning)
CONFIGS = {"1": ("1 rank", 1, "partitioned"), "2p": ("2 partitioned", 2, "partitioned"),
           "2r": ("2 replicated", 2, "replicated")}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, partitioning: str, opts: argparse.Namespace, root: str) -> list[dict]:
    work = tempfile.mkdtemp(dir=root)
    for r in range(world):
        os.makedirs(os.path.join(work, f"nvme{r}"))
    script = os.path.join(work, "worker.py")
    with open(script, "w") as f:
        f.write(_WORKER)
    a = json.dumps(dict(nvme=os.path.join(work, "nvme{rank}"), out=work, steps=opts.steps, batch=opts.batch,
                        seq=opts.seq, hidden=opts.hidden, layers=opts.layers, partitioning=partitioning,
                        device=opts.device, dtype=opts.dtype))
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    # One thread per rank: the ranks' figures compare with one process's on the same single core.
    threads = str(opts.threads)
    base.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS=threads,
                MKL_NUM_THREADS=threads)
    if opts.device == "cpu":
        base["MEMASCEND_AUTO_DEVICE"] = "cpu"
    port = str(_port())
    if opts.torchrun and world > 1:  # torchrun itself (the GPU check): one launcher, its ranks
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                                   "--master-addr=127.0.0.1", f"--master-port={port}", script, a], env=base)]
    else:  # torchrun's environment, set here: no launcher between the ranks and this script
        procs = [subprocess.Popen([sys.executable, script, a], env=dict(
            base, **({} if world == 1 else dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port))))
                 for r in range(world)]
    if any([p.wait() for p in procs]):  # a list: wait for every rank, not only up to the first failure
        raise SystemExit(f"a rank of the {world}-rank {partitioning} run failed")
    results = []
    for r in range(world):
        with open(os.path.join(work, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def ratios(r: dict, one: dict) -> dict:
    """This rank's figures over one rank's (optimizer time, NVMe bytes read + written, disk)."""
    return dict(optimizer=r["optimizer_s"] / one["optimizer_s"],
                optimizer_cpu=r["optimizer_cpu_s"] / one["optimizer_cpu_s"],
                optimizer_elements=r["optimizer_elements"] / one["optimizer_elements"],
                nvme_bytes=(r["read"] + r["written"]) / (one["read"] + one["written"]),
                disk=r["disk"] / one["disk"] if one["disk"] else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="global batch (split over the ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cpu", help="compute device: cpu (gloo, default) or cuda (NCCL, a GPU per rank)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"which runs, comma-separated, the first being the baseline (default {','.join(CONFIGS)})")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per rank, the same in every run (1)")
    p.add_argument("--torchrun", action="store_true", help="launch the ranks with torchrun (default: its "
                   "environment set by this script)")
    p.add_argument("--path", default=None, help="directory for the swap files (default: the temp directory)")
    p.add_argument("--out", default=None, help="JSON file for the results (default benchmarks/results/...)")
    opts = p.parse_args()
    chosen = opts.configs.split(",")
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown or not chosen or CONFIGS[chosen[0]][1] != 1:
        p.error(f"--configs: of {', '.join(CONFIGS)}, the first one '1' (got {opts.configs!r})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-", dir=opts.path) as root:
        for key in chosen:
            label, world, partitioning = CONFIGS[key]
            rows += [dict(config=label, ranks=world, state_partitioning=partitioning, **r)
                     for r in run(world, partitioning, opts, root)]
    one = rows[0]
    for r in rows:
        r["vs_1_rank"] = ratios(r, one)
    print(f"{opts.device}, {opts.dtype}, global batch {opts.batch} x seq {opts.seq}, hidden {opts.hidden}, "
          f"{opts.layers} layers; per rank, per step after a warm-up step")
    print(f"{'config':>14} {'rank':>4} {'step s':>7} {'optim s':>8} {'CPU s':>6} {'read MB':>8} {'written MB':>10} "
          f"{'peak RSS MB':>11} {'disk MB':>8}  vs 1 rank (optim, CPU, elements, NVMe bytes, disk)")
    for r in rows:
        v = r["vs_1_rank"]
        print(f"{r['config']:>14} {r['rank']:>4} {r['step_s']:>7.3f} {r['optimizer_s']:>8.3f} "
              f"{r['optimizer_cpu_s']:>6.3f} {r['read'] / 1e6:>8.1f} "
              f"{r['written'] / 1e6:>10.1f} {r['peak_rss'] / 1e6:>11.1f} {r['disk'] / 1e6:>8.1f}  "
              f"{v['optimizer']:.2f}x, {v['optimizer_cpu']:.2f}x, {v['optimizer_elements']:.2f}x, "
              f"{v['nvme_bytes']:.2f}x, {v['disk']:.2f}x")
    payload = dict(settings=vars(opts), rows=rows, target=TARGET)
    partitioned = [r for r in rows if r["config"] == "2 partitioned"]
    if partitioned:
        worst = {k: max(r["vs_1_rank"][k] for r in partitioned) for k in ("optimizer", "optimizer_cpu", "nvme_bytes")}
        met = worst["optimizer_cpu"] <= TARGET and worst["nvme_bytes"] <= TARGET
        print(f"target (2 partitioned ranks, every rank): optimizer CPU {worst['optimizer_cpu']:.2f}x, NVMe bytes "
              f"{worst['nvme_bytes']:.2f}x <= {TARGET}x: {'met' if met else 'NOT met'} (optimizer wall clock "
              f"{worst['optimizer']:.2f}x)")
        payload.update(worst_partitioned=worst, target_met=met)
    if opts.out:
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out, "w") as f:
            json.dump(payload, f, indent=2)
        path = opts.out
    else:
        path = save_result("bench_distributed", payload)
    print("results written to", path)


if __name__ == "__main__":
    main()
