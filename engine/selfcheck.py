"""Self-check of the native core: allocate from the PinnedPool, round-trip data
through the AsyncIO engine byte for byte, and report the backend and bandwidth."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .config import AioBackend
from .memory.pool import PinnedPool
from .storage.aio import AsyncIO
from .units import format_bytes, parse_bytes


@dataclass
class SelfCheckResult:
    backend: str
    fixed_buffers: bool
    locked: bool
    total_bytes: int
    write_gib_s: float
    read_gib_s: float
    pool_reserved_over_requested: float


def _stamp(buf: torch.Tensor, index: int) -> None:
    buf[:8].copy_(torch.tensor([index], dtype=torch.int64).view(torch.uint8))


def run_selfcheck(path: Optional[str] = None, size: int | str = "1GiB", chunk: int | str = "64MiB",
                  backend: AioBackend = "auto", depth: int = 4, progress: bool = True) -> SelfCheckResult:
    """Writes ``size`` bytes in ``chunk``-sized O_DIRECT requests (``depth`` in flight) to a private
    temporary file under ``path``, reads them back, verifies every byte, and removes the file."""
    total, chunk_bytes = parse_bytes(size), parse_bytes(chunk)
    if chunk_bytes <= 0 or chunk_bytes % 4096 or total < chunk_bytes:
        raise ValueError(f"chunk must be a positive multiple of 4096 and at most size (got chunk={chunk}, size={size})")
    nchunks = total // chunk_bytes
    total = nchunks * chunk_bytes
    directory = tempfile.mkdtemp(prefix="memascend-selfcheck-", dir=path)  # mode 0700
    pool = PinnedPool(depth * chunk_bytes + chunk_bytes)
    io = AsyncIO(backend, pool=pool)
    bar = _progress(2 * nchunks, progress)
    buffers: list[torch.Tensor] = []  # views into the pool: dropped before the pool closes
    try:
        pattern = torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8)
        buffers.extend(pool.alloc(chunk_bytes).tensor(chunk_bytes, torch.uint8) for _ in range(depth))
        for b in buffers:
            b.copy_(pattern)
        f = io.open(os.path.join(directory, "selfcheck.bin"), "rw", create=True, size=total)

        start = time.perf_counter()
        in_flight = [None] * depth
        for i in range(nchunks):
            slot = i % depth
            if in_flight[slot] is not None:
                in_flight[slot].wait()
                bar.update(1)
            _stamp(buffers[slot], i)
            in_flight[slot] = f.write(i * chunk_bytes, buffers[slot])
        io.wait_all()
        write_s = time.perf_counter() - start
        bar.update(sum(r is not None for r in in_flight))

        expected = pattern.clone()
        start = time.perf_counter()
        in_flight = [None] * depth
        bad = []

        def verify(slot: int, index: int) -> None:
            in_flight[slot].wait()
            _stamp(expected, index)
            if not torch.equal(buffers[slot], expected):
                bad.append(index)
            bar.update(1)

        for i in range(nchunks + depth):
            slot = i % depth
            if i >= depth:
                verify(slot, i - depth)
            if i < nchunks:
                in_flight[slot] = f.read(i * chunk_bytes, buffers[slot])
        read_s = time.perf_counter() - start
        bar.close()
        if bad:
            raise RuntimeError(f"self-check FAILED: chunks {bad[:10]} did not read back what was written")
        stats = pool.stats()
        return SelfCheckResult(
            backend=io.backend, fixed_buffers=io.fixed_buffers, locked=stats["locked"], total_bytes=total,
            write_gib_s=total / write_s / 2**30, read_gib_s=total / read_s / 2**30,
            pool_reserved_over_requested=stats["in_use"] / stats["requested"],
        )
    finally:
        bar.close()
        io.close()
        buffers.clear()
        pool.close()
        shutil.rmtree(directory, ignore_errors=True)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="self-check (write + read)", unit="chunk", leave=False, file=sys.stderr)


def main(args) -> int:
    # Removing the private directory needs a normal exit on SIGTERM too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    r = run_selfcheck(args.path, args.size, args.chunk, args.backend, progress=not args.quiet)
    print(f"I/O backend:      {r.backend} (fixed buffers: {'yes' if r.fixed_buffers else 'no'})")
    print(f"pinned pool:      {'page-locked' if r.locked else 'NOT page-locked'}, "
          f"reserved/requested = {r.pool_reserved_over_requested:.3f}")
    print(f"write bandwidth:  {r.write_gib_s:.2f} GiB/s")
    print(f"read bandwidth:   {r.read_gib_s:.2f} GiB/s")
    print(f"OK: {format_bytes(r.total_bytes)} round-tripped through O_DIRECT I/O byte for byte")
    return 0
