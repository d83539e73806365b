"""1 rank vs 2 ranks (gloo, CPU) with the same global batch: step time, optimizer time, NVMe bytes
and peak RSS per rank, printed as one table.

    python benchmarks/bench_distributed.py [--steps 4] [--batch 4] [--hidden 256] [--layers 4]

Each configuration runs in fresh processes given torchrun's environment (the 2 ranks on a free
port). State is replicated in this increment (every rank runs the whole optimizer on its own
copy), so optimizer time and NVMe bytes per rank do not fall at 2 ranks: only the forward and
backward work is split. The partitioned (ZeRO-3) increment is what brings them to ~1/N.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER = r'''
import json, os, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import engine
from engine.distributed import shard_indices

a = json.loads(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=a["hidden"], intermediate_size=4 * a["hidden"],
                                     num_hidden_layers=a["layers"], num_attention_heads=4, num_key_value_heads=4,
                                     max_position_embeddings=128)).float()
cfg = engine.Config(nvme_path=a["nvme"], device="cpu", gradient_accumulation_steps=1, gradient_clipping=1.0,
                    resident_threshold_bytes=4096, trainable_placement="nvme")
trainer = engine.initialize(model, cfg)
spec = trainer.runtime.distributed
g = torch.Generator().manual_seed(1)
data = [torch.randint(0, 1024, (a["batch"], a["seq"]), generator=g) for _ in range(a["steps"] + 1)]
mine = list(shard_indices(a["batch"], spec))
times = []
for i, x in enumerate(data):
    if i == 1:
        base = trainer.memory_report()  # step 0 warms up (first reads, allocation)
    t0 = time.perf_counter()
    x = x[mine]
    trainer.backward(trainer(input_ids=x, labels=x).loss)
    trainer.step()
    if i:
        times.append(time.perf_counter() - t0)
r = trainer.memory_report()
out = dict(rank=spec.rank, step_s=sum(times) / len(times),
           optimizer_s=(r["optimizer_compute_s"] - base["optimizer_compute_s"]) / len(times),
           read=(r["bytes_read"] - base["bytes_read"]) / len(times),
           written=(r["bytes_written"] - base["bytes_written"]) / len(times), peak_rss=r["peak_rss_bytes"])
with open(os.path.join(a["out"], f"rank{spec.rank}.json"), "w") as f:
    json.dump(out, f)
trainer.close()
'''


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, opts: argparse.Namespace, root: str) -> list[dict]:
    work = tempfile.mkdtemp(dir=root)
    nvme = os.path.join(work, "nvme")
    os.makedirs(nvme)
    script = os.path.join(work, "worker.py")
    with open(script, "w") as f:
        f.write(_WORKER)
    a = json.dumps(dict(nvme=nvme, out=work, steps=opts.steps, batch=opts.batch, seq=opts.seq, hidden=opts.hidden,
                        layers=opts.layers))
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    base.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), MEMASCEND_AUTO_DEVICE="cpu")
    port = str(_port())
    procs = [subprocess.Popen([sys.executable, script, a], env=dict(
        base, **({} if world == 1 else dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port))))
             for r in range(world)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"a rank of the {world}-rank run failed")
    results = []
    for r in range(world):
        with open(os.path.join(work, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="global batch (split over the ranks)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    opts = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as root:
        rows = [(1, r) for r in run(1, opts, root)] + [(2, r) for r in run(2, opts, root)]
    one = rows[0][1]
    print(f"{'ranks':>5} {'rank':>4} {'step s':>8} {'optim s':>8} {'read MB':>8} {'written MB':>10} "
          f"{'peak RSS MB':>11}  vs 1 rank (optim, NVMe bytes)")
    for world, r in rows:
        moved = (r["read"] + r["written"]) / (one["read"] + one["written"])
        ratio = f"{r['optimizer_s'] / one['optimizer_s']:.2f}x, {moved:.2f}x"
        print(f"{world:>5} {r['rank']:>4} {r['step_s']:>8.3f} {r['optimizer_s']:>8.3f} {r['read'] / 1e6:>8.1f} "
              f"{r['written'] / 1e6:>10.1f} {r['peak_rss'] / 1e6:>11.1f}  {ratio}")


if __name__ == "__main__":
    main()
