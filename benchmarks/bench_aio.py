"""Sequential and random 1 MiB O_DIRECT reads and writes through each AsyncIO
backend, side by side with fio (io_uring engine, same block size, queue depth and
file system), in one run. The disk of a shared machine drifts by 2x within
seconds, so each repeat runs fio and every backend back to back (alternating
which goes first) and the reported ratio is the median of those adjacent
per-repeat ratios; bandwidths are medians too.

Targets (issue 2): uring >= 90% of fio's bandwidth for sequential read and
write; threads >= 70%.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from _common import fio_bandwidth, have_fio, print_table, save_result

from engine import AsyncIO, PinnedPool, _native
from engine.units import parse_bytes

PATTERNS = {"seq-write": ("write", False), "seq-read": ("read", False),
            "rand-write": ("write", True), "rand-read": ("read", True)}
FIO_RW = {"seq-write": "write", "seq-read": "read", "rand-write": "randwrite", "rand-read": "randread"}


def engine_bandwidth(backend: str, path: str, size: int, bs: int, qd: int, pattern: str, seed: int,
                     seconds: float, window: int) -> float:
    """Bytes per second over ``seconds`` of cycling through the ``size``-byte file.

    The engine's ring (or thread pool) holds ``qd`` requests of ``bs`` bytes, as fio does; the
    caller keeps ``window`` requests submitted so the engine refills a finished slot at once
    instead of waiting for the oldest request (head-of-line blocking fio does not have)."""
    op, random_order = PATTERNS[pattern]
    pool = PinnedPool(window * bs)
    io = AsyncIO(backend, queue_depth=qd, threads=qd, block_size=bs, pool=pool)
    try:
        buffers = [pool.alloc(bs) for _ in range(window)]
        for b in buffers:
            np.frombuffer(b.memoryview(), dtype=np.uint8)[:] = 0xA5
        f = io.open(path, "rw")
        offsets = np.arange(size // bs, dtype=np.int64) * bs
        if random_order:
            np.random.default_rng(seed).shuffle(offsets)
        offsets = offsets.tolist()
        in_flight = [None] * window
        start = time.perf_counter()
        deadline = start + seconds
        done = 0
        while time.perf_counter() < deadline:
            for i, off in enumerate(offsets):
                slot = i % window
                if in_flight[slot] is not None:
                    in_flight[slot].wait()
                in_flight[slot] = f.read(off, buffers[slot]) if op == "read" else f.write(off, buffers[slot])
                done += 1
                if i % qd == 0 and time.perf_counter() >= deadline:
                    break
        io.wait_all()
        elapsed = time.perf_counter() - start
        return done * bs / elapsed
    finally:
        io.close()
        pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default=None, help="directory on the drive to test (default: system temp dir)")
    parser.add_argument("--size", default="2GiB", help="file size per pass")
    parser.add_argument("--bs", default="1MiB", help="request size")
    parser.add_argument("--qd", type=int, default=16, help="requests in flight (threads for the threads backend)")
    parser.add_argument("--window-factor", type=int, default=4,
                        help="requests the caller keeps submitted, as a multiple of --qd (1 = lockstep)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3, help="duration of each measurement")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    args = parser.parse_args()
    size, bs = parse_bytes(args.size), parse_bytes(args.bs)
    backends = ["uring", "threads"] if _native.HAVE_URING else ["threads"]
    fio_present = have_fio()
    if not fio_present:
        print("fio not found: no baseline (apt-get install fio)")
    directory = tempfile.mkdtemp(prefix="memascend-bench-", dir=args.path)
    path = os.path.join(directory, "bench.bin")
    try:
        with open(path, "wb") as f:  # fill once so reads hit allocated, written blocks
            chunk = os.urandom(1 << 20) * 64
            for _ in range(size // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        results = {p: {name: [] for name in (["fio"] if fio_present else []) + backends}
                   for p in args.patterns.split(",")}
        for rep in range(args.repeats):
            for pattern, runs in results.items():
                order = list(runs) if rep % 2 == 0 else list(reversed(runs))
                for name in order:
                    if name == "fio":
                        runs[name].append(fio_bandwidth(path, FIO_RW[pattern], size, bs=bs, iodepth=args.qd,
                                                        seconds=args.seconds))
                    else:
                        runs[name].append(engine_bandwidth(name, path, size, bs, args.qd, pattern, rep, args.seconds,
                                                            args.window_factor * args.qd))
        rows, summary = [], {}
        for pattern, runs in results.items():
            med = {name: statistics.median(v) for name, v in runs.items()}
            summary[pattern] = {name: dict(median_bytes_per_s=m, runs=runs[name]) for name, m in med.items()}
            row = [pattern] + [f"{med[n] / 2**30:.2f}" for n in runs]
            if fio_present:
                for b in backends:
                    ratio = statistics.median(x / y for x, y in zip(runs[b], runs["fio"]))
                    summary[pattern][b]["ratio_to_fio"] = ratio
                    row.append(f"{ratio:.2f}")
            rows.append(row)
        headers = ["pattern"] + [f"{n} GiB/s" for n in next(iter(results.values()))]
        if fio_present:
            headers += [f"{b}/fio" for b in backends]
        print(f"{args.size} file, {args.bs} requests, queue depth {args.qd}, O_DIRECT, {args.seconds} s per run, "
              f"medians of {args.repeats} "
              "interleaved repeats (ratio = median of adjacent-run ratios)")
        print_table(headers, rows)
        if fio_present:
            for pattern in ("seq-read", "seq-write"):
                if pattern in summary:
                    for backend, target in (("uring", 0.9), ("threads", 0.7)):
                        if backend in summary[pattern]:
                            ratio = summary[pattern][backend]["ratio_to_fio"]
                            print(f"{pattern} {backend}: {ratio:.2f} of fio (target {target:.2f}) -> "
                                  f"{'MET' if ratio >= target else 'MISSED'}")
        print("saved", save_result("aio", dict(size=size, bs=bs, qd=args.qd, results=summary)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
