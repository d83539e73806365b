"""TensorStore: checksum cost and layout comparison on a Llama-style tensor mix.

Writes then reads every parameter tensor of a small Llama-style model (default:
hidden 1024, intermediate 2816, 8 layers, fp32 ~ 0.5 GiB) through the store, all
requests in flight at once, for checksum on/off and the ``direct`` / ``files``
layouts. Runs alternate (noisy disk) and medians are reported. The checksum cost
is reported two ways: wall-time overhead vs checksum off, and CRC32C seconds as
a fraction of the I/O time.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import torch
from _common import parameter_shapes, print_table, save_result

from engine import PinnedPool, dtypes
from engine.storage import TensorStore


def one_pass(path: str, layout: str, checksum: bool, shapes, pool: PinnedPool, blocks) -> dict:
    with TensorStore(path, layout=layout, checksum=checksum, io=None, pool=pool) as store:
        keys = [("param", i) for i in range(len(shapes))]
        for key, shape in zip(keys, shapes):
            store.allocate(key, shape, torch.float32)
        start = time.perf_counter()
        for r in [store.write_from(k, b) for k, b in zip(keys, blocks)]:
            r.wait()
        write_s = time.perf_counter() - start
        crc_write = store.stats()["crc_seconds"]
        start = time.perf_counter()
        for r in [store.read_into(k, b) for k, b in zip(keys, blocks)]:
            r.wait()
        read_s = time.perf_counter() - start
        crc_read = store.stats()["crc_seconds"] - crc_write
        nbytes = store.stats()["bytes_written"]
    return dict(write_s=write_s, read_s=read_s, crc_write_s=crc_write, crc_read_s=crc_read, nbytes=nbytes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import LlamaConfig

    shapes = parameter_shapes(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                          intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                          num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False))
    sizes = [dtypes.nbytes(s, torch.float32) for s in shapes]
    pool = PinnedPool(sum(-(-s // 4096) * 4096 for s in sizes))
    blocks = [pool.alloc(s) for s in sizes]
    for b in blocks:
        b.tensor(b.size // 4, torch.float32).normal_()
    directory = tempfile.mkdtemp(prefix="memascend-bench-", dir=args.path)
    configs = [("direct", True), ("direct", False), ("files", True), ("files", False)]
    runs = {c: [] for c in configs}
    try:
        for rep in range(args.repeats):
            for config in configs if rep % 2 == 0 else reversed(configs):
                runs[config].append(one_pass(directory, *config, shapes, pool, blocks))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    nbytes = runs[configs[0]][0]["nbytes"]
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
    rows = []
    for (layout, checksum), m in med.items():
        base = med[(layout, False)]
        rows.append([layout, "on" if checksum else "off", f"{nbytes / m['write_s'] / 2**30:.2f}",
                     f"{nbytes / m['read_s'] / 2**30:.2f}",
                     (f"{(m['write_s'] + m['read_s']) / (base['write_s'] + base['read_s']) - 1:+.1%}"
                      if checksum else ""),
                     f"{(m['crc_write_s'] + m['crc_read_s']) / (m['write_s'] + m['read_s']):.1%}" if checksum else ""])
    print(f"{len(shapes)} tensors, {nbytes / 2**30:.2f} GiB, medians of {args.repeats} alternating runs")
    print_table(["layout", "crc32c", "write GiB/s", "read GiB/s", "time vs crc off", "crc time / io time"], rows)
    print("saved", save_result("store", {f"{layout}-{'crc' if c else 'nocrc'}": m for (layout, c), m in med.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
