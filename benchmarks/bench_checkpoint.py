"""Import and export of a Hugging Face safetensors checkpoint (the ``1b`` preset of
engine/presets.py by default): peak RSS and throughput, next to the disk's sequential
bandwidth measured by fio in the same run.

1. A bf16 Llama-style checkpoint is written in HF's sharded layout (random values, tensor by
   tensor; not measured).
2. In a fresh child process (imports done, then ``VmHWM`` reset through ``/proc/self/clear_refs``):
   ``engine.from_pretrained`` (bf16 training: the store receives the bf16 weights, the fp32
   masters and the zeroed fp32 Adam moments) and then ``trainer.save_pretrained`` (store ->
   pool -> file), each with its own peak-RSS growth and wall time.
3. fio: sequential 1 MiB O_DIRECT writes and reads (io_uring, QD16) on the same file system.

Throughput is reported two ways: checkpoint bytes per second (what the user waits for) and all
bytes moved per second (checkpoint read + store writes for the import; store reads + file writes
for the export), the latter against fio's bandwidth.

Targets (issue 7): peak RSS <= 1 GiB + the largest tensor; throughput >= 70% of the sequential
disk bandwidth.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

from _common import fio_bandwidth, have_fio, print_table, run_worker, save_result

from engine.errors import BenchError
from engine.presets import PRESETS

CHILD = r'''
import json, sys, time
import torch, engine
from transformers import AutoConfig, AutoModelForCausalLM
from engine.procinfo import process_memory, reset_peak_rss

def reset():
    reset_peak_rss()
    return process_memory().rss

src, dst, nvme = sys.argv[1:4]
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))  # lazy imports before measuring
out = {}
base = reset()
start = time.perf_counter()
trainer = engine.from_pretrained(src, engine.Config(nvme_path=nvme, dtype="bf16"))
out["import_s"] = time.perf_counter() - start
out["import_peak_growth"] = process_memory().peak_rss - base
out["import_store_written"] = trainer.runtime.store.stats()["bytes_written"]
out["pool"] = trainer.runtime.pool.stats()["capacity"]
read_before = trainer.runtime.store.stats()["bytes_read"]
base = reset()
start = time.perf_counter()
trainer.save_pretrained(dst)
out["export_s"] = time.perf_counter() - start
out["export_peak_growth"] = process_memory().peak_rss - base
out["export_store_read"] = trainer.runtime.store.stats()["bytes_read"] - read_before
trainer.close()
print(json.dumps(out))
'''


def llama_config(model: str, params: float | None = None):
    """The bf16 ``LlamaConfig`` of preset ``model``; with ``params``, its layer count changed so
    that the model has about that many parameters at the preset's width."""
    from transformers import LlamaConfig

    shape = dict(PRESETS[model])
    if params is not None:
        hidden, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
        kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
        per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
        shape["num_hidden_layers"] = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")


def write_checkpoint(cfg, directory: str, shard_bytes: int = 1 << 30) -> tuple[int, int]:
    """Random bf16 tensors in HF's sharded layout; returns (total bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    size, largest = 0, 0
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    groups: list[list[tuple[str, tuple]]] = [[]]
    for name, shape in names:
        nbytes = math.prod(shape) * 2
        largest = max(largest, nbytes)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in group}
        save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f)
    cfg.save_pretrained(directory)
    return total, largest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None, help="directory on the drive to test (default: system temp dir)")
    parser.add_argument("--model", default="1b", choices=sorted(PRESETS), help="model preset (engine/presets.py)")
    parser.add_argument("--params", type=float, default=None,
                        help="model size in parameters: the preset's width, its layer count scaled to fit")
    parser.add_argument("--fio-seconds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.path)
    try:
        src, dst, nvme = (os.path.join(work, d) for d in ("src", "dst", "nvme"))
        for d in (src, nvme):
            os.makedirs(d)
        cfg = llama_config(args.model, args.params)
        total, largest = write_checkpoint(cfg, src)
        try:
            child = run_worker(["-c", CHILD, src, dst, nvme], what="import/export child")
        except BenchError as exc:
            print(exc)
            return 1
        shutil.rmtree(nvme, ignore_errors=True)
        bw = {}
        if have_fio():
            probe = os.path.join(work, "fio.bin")
            bw["write"] = fio_bandwidth(probe, "write", "4G", seconds=args.fio_seconds)
            bw["read"] = fio_bandwidth(probe, "read", "4G", seconds=args.fio_seconds)
            os.unlink(probe)
        else:
            print("fio not found: no disk baseline (apt-get install fio)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = 2 ** 30
    moved_import = total + child["import_store_written"]
    moved_export = child["export_store_read"] + total
    rows = []
    for phase, seconds, moved, peak in (("import", child["import_s"], moved_import, child["import_peak_growth"]),
                                        ("export", child["export_s"], moved_export, child["export_peak_growth"])):
        disk = bw.get("write")
        rows.append([phase, f"{seconds:.1f}", f"{total / seconds / gib:.2f}", f"{moved / seconds / gib:.2f}",
                     f"{moved / seconds / disk:.2f}" if disk else "-", f"{peak / 2**20:.0f}",
                     f"{(gib + largest) / 2**20:.0f}"])
    print(f"checkpoint: {cfg.num_hidden_layers} layers, {total / gib:.2f} GiB bf16, "
          f"largest tensor {largest / 2**20:.0f} MiB, pinned pool {child['pool'] / 2**20:.0f} MiB")
    if bw:
        print(f"fio seq 1 MiB QD16 O_DIRECT: write {bw['write'] / gib:.2f} GiB/s, read {bw['read'] / gib:.2f} GiB/s")
    print_table(["phase", "seconds", "ckpt GiB/s", "moved GiB/s", "moved/fio write", "peak RSS growth MiB",
                 "target MiB"], rows)
    path = save_result("checkpoint", dict(model=args.model, params=args.params, layers=cfg.num_hidden_layers,
                                          checkpoint_bytes=total, largest_tensor=largest, fio=bw, **child))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
