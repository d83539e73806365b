"""AsyncIO on both backends: byte-exact round trips, every failure surfaced with its location."""
from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch
from helpers import run_unprivileged

from engine import AsyncIO, AsyncIOError, PinnedPool, _native

KiB, MiB = 1 << 10, 1 << 20
ALIGN = 4096


def _uring_works() -> bool:
    if not _native.HAVE_URING:
        return False
    try:
        AsyncIO("uring").close()
        return True
    except RuntimeError:
        return False


BACKENDS = [
    pytest.param("uring", marks=pytest.mark.skipif(not _uring_works(), reason="io_uring not compiled in or disabled")),
    "threads",
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def pool():
    with PinnedPool(160 * MiB) as p:
        yield p


def fill_random(block, rng: np.random.Generator, nbytes: int) -> None:
    np.frombuffer(block.memoryview(), dtype=np.uint8)[:nbytes] = rng.integers(0, 256, nbytes, dtype=np.uint8)


def test_thousands_of_random_requests_round_trip(tmp_path, backend, pool):
    rng = np.random.default_rng(7)
    prng = random.Random(7)
    io = AsyncIO(backend, queue_depth=16, block_size=256 * KiB, pool=pool)
    assert io.backend == backend
    assert io.fixed_buffers == (backend == "uring")
    file_size = 64 * MiB
    f = io.open(tmp_path / "data.bin", "rw", create=True, size=file_size)
    # 3,000 non-overlapping extents of 1..64 pages at shuffled positions, a few of several MiB.
    pages = file_size // ALIGN
    extents, pos = [], 0
    while len(extents) < 3000 and pos < pages:
        n = prng.choice([1, 2, 3, 8, 16, 64]) if prng.random() > 0.002 else 700
        n = min(n, pages - pos)
        extents.append((pos * ALIGN, n * ALIGN))
        pos += n + prng.randrange(2)
    prng.shuffle(extents)
    total = sum(n for _, n in extents)
    src, dst = pool.alloc(total), pool.alloc(total)
    fill_random(src, rng, total)
    np.frombuffer(dst.memoryview(), dtype=np.uint8)[:] = 0
    src_t, dst_t = src.tensor(total, torch.uint8), dst.tensor(total, torch.uint8)
    starts = np.cumsum([0] + [n for _, n in extents])[:-1]
    writes = [f.write(off, src_t[s:s + n]) for (off, n), s in zip(extents, starts)]
    assert io.stats()["in_flight_requests"] > 0 or all(w.done() for w in writes)
    io.wait_all()
    assert all(w.done() for w in writes)
    reads = [f.read(off, dst_t[s:s + n]) for (off, n), s in zip(reversed(extents), reversed(starts))]
    for r in reads:
        r.wait()
    assert torch.equal(src_t, dst_t)
    stats = io.stats()
    assert stats["bytes_written"] == total and stats["bytes_read"] == total and stats["errors"] == 0
    assert stats["requests"] == 2 * len(extents)
    del src_t, dst_t
    io.close()


def test_unaligned_buffered_io_with_python_buffers(tmp_path, backend):
    """Without O_DIRECT any size, offset and buffer type works: bytearray, numpy, torch."""
    rng = np.random.default_rng(3)
    with AsyncIO(backend, block_size=64 * KiB) as io:
        f = io.open(tmp_path / "buffered.bin", "rw", create=True, direct=False)
        payloads = []
        offset = 0
        for i in range(300):
            n = int(rng.integers(1, 200_000))
            data = rng.integers(0, 256, n, dtype=np.uint8)
            buf = [bytearray(data.tobytes()), data.copy(), torch.from_numpy(data.copy())][i % 3]
            payloads.append((offset, data))
            f.write(offset, buf)
            offset += n + int(rng.integers(0, 100))
        io.wait_all()
        outs = [(off, np.empty(len(d), dtype=np.uint8)) for off, d in payloads]
        for off, out in outs:
            f.read(off, out)
        io.wait_all()
        for (_, data), (_, out) in zip(payloads, outs):
            assert np.array_equal(data, out)


def test_read_past_end_of_file_names_file_offset_and_size(tmp_path, backend, pool):
    with AsyncIO(backend, pool=pool) as io:
        path = tmp_path / "short.bin"
        f = io.open(path, "rw", create=True, size=MiB)
        buf = pool.alloc(2 * ALIGN)
        with pytest.raises(AsyncIOError) as info:
            f.read(MiB, buf).wait()
        err = info.value
        assert ((err.errno, err.filename, err.offset, err.nbytes, err.op)
                == (errno.EIO, str(path), MiB, 2 * ALIGN, "read"))
        assert "end of file" in str(err) and str(path) in str(err) and str(MiB) in str(err)
        # Straddling the end: the first page is read, the rest is an error at the end offset.
        with pytest.raises(AsyncIOError, match="end of file after 4096") as info:
            f.read(MiB - ALIGN, buf).wait()
        assert info.value.offset == MiB
        # The engine is still usable.
        f.write(0, buf).wait()
        f.read(0, buf).wait()


def test_unwritable_directory_is_a_clear_error(tmp_path):
    locked_dir = tmp_path / "readonly"
    locked_dir.mkdir()
    locked_dir.chmod(0o500)
    code = f"""
        import engine
        io = engine.AsyncIO()
        try:
            io.open({str(locked_dir / "swap.bin")!r}, "w", create=True)
        except PermissionError as exc:
            print("PermissionError", exc.filename)
    """
    result = run_unprivileged(code, drop="cap_dac_override,cap_dac_read_search")
    assert result.returncode == 0, result.stderr
    assert f"PermissionError {locked_dir / 'swap.bin'}" in result.stdout


def test_missing_directory_and_bad_mode(tmp_path):
    with AsyncIO() as io:
        with pytest.raises(FileNotFoundError):
            io.open(tmp_path / "nope" / "x.bin", "w", create=True)
        with pytest.raises(ValueError, match="mode"):
            io.open(tmp_path / "x.bin", "a")


def test_closed_file_and_closed_engine(tmp_path, backend, pool):
    io = AsyncIO(backend, pool=pool)
    f = io.open(tmp_path / "c.bin", "rw", create=True, size=MiB)
    buf = pool.alloc(ALIGN)
    f.write(0, buf).wait()
    f.close()
    with pytest.raises(ValueError, match="closed file"):
        f.read(0, buf)
    io.close()
    with pytest.raises(ValueError, match="closed"):
        io.open(tmp_path / "c.bin", "r")


def test_misaligned_direct_io_is_rejected_before_submission(tmp_path, backend, pool):
    with AsyncIO(backend, pool=pool) as io:
        f = io.open(tmp_path / "m.bin", "rw", create=True, size=MiB)
        block = pool.alloc(4 * ALIGN)
        raw = block.tensor(4 * ALIGN, torch.uint8)
        with pytest.raises(ValueError, match="buffer address is not a multiple of 4096"):
            f.write(0, raw[512:512 + ALIGN])
        with pytest.raises(ValueError, match="file offset is not a multiple of 4096"):
            f.write(100, block, ALIGN)
        with pytest.raises(ValueError, match="length is not a multiple of 4096"):
            f.read(0, block, 1000)
        with pytest.raises(ValueError, match="does not fit"):
            f.read(0, block, 8 * ALIGN)
        assert io.stats()["requests"] == 0


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_injected_error_surfaces_and_engine_stays_usable(tmp_path, backend, pool, code):
    with AsyncIO(backend, block_size=64 * KiB, pool=pool) as io:
        path = tmp_path / "fault.bin"
        f = io.open(path, "rw", create=True, size=4 * MiB)
        src = pool.alloc(MiB)
        fill_random(src, np.random.default_rng(1), MiB)
        io.inject_fault(3, code)  # the 3rd of 16 chunks fails
        with pytest.raises(AsyncIOError) as info:
            f.write(MiB, src).wait()
        err = info.value
        assert err.errno == code and err.filename == str(path) and err.op == "write"
        assert err.offset == MiB + 2 * 64 * KiB and err.nbytes == 64 * KiB
        assert os.strerror(code) in str(err)
        assert io.stats()["errors"] == 1
        # Retrying the same request now succeeds and the data round-trips.
        f.write(MiB, src).wait()
        dst = pool.alloc(MiB)
        f.read(MiB, dst).wait()
        assert bytes(src.memoryview()) == bytes(dst.memoryview())


def test_injected_short_transfer_is_completed(tmp_path, backend, pool):
    with AsyncIO(backend, block_size=256 * KiB, pool=pool) as io:
        f = io.open(tmp_path / "short.bin", "rw", create=True, size=4 * MiB)
        src, dst = pool.alloc(MiB), pool.alloc(MiB)
        fill_random(src, np.random.default_rng(2), MiB)
        io.inject_fault(2, 0)  # a write chunk transfers half and is resubmitted
        f.write(0, src).wait()
        io.inject_fault(1, 0)  # a read chunk, too
        f.read(0, dst).wait()
        assert bytes(src.memoryview()) == bytes(dst.memoryview())
        stats = io.stats()
        assert stats["short_resubmits"] == 2 and stats["errors"] == 0
        assert stats["bytes_written"] == MiB and stats["bytes_read"] == MiB


def test_wait_all_reports_first_failure_and_counts_others(tmp_path, backend, pool):
    with AsyncIO(backend, pool=pool) as io:
        f = io.open(tmp_path / "w.bin", "rw", create=True, size=MiB)
        buf = pool.alloc(ALIGN)
        good = f.read(0, buf)
        bad = [f.read(MiB + i * ALIGN, buf) for i in range(3)]
        with pytest.raises(AsyncIOError, match="2 more failed"):
            io.wait_all()
        assert good.done() and all(r.done() for r in bad)
        good.wait()  # already retired: a no-op


def test_poll_is_non_blocking_and_eventually_done(tmp_path, backend, pool):
    with AsyncIO(backend, pool=pool) as io:
        f = io.open(tmp_path / "p.bin", "rw", create=True, size=8 * MiB)
        buf = pool.alloc(8 * MiB)
        request = f.write(0, buf)
        while not request.done():
            pass
        request.wait()


def test_backend_choice_is_observable_and_overridable(monkeypatch):
    monkeypatch.setenv("MEMASCEND_AIO_BACKEND", "threads")
    with AsyncIO() as io:
        assert io.backend == "threads" and io.stats()["backend"] == "threads"
    monkeypatch.delenv("MEMASCEND_AIO_BACKEND")
    with AsyncIO() as io:
        assert io.backend == ("uring" if _uring_works() else "threads")
    with pytest.raises(ValueError, match="unknown AsyncIO backend"):
        AsyncIO("libaio")
    with pytest.raises(ValueError, match="block_size"):
        AsyncIO("threads", block_size=1000)


def test_preallocation_failure_is_clear(tmp_path):
    with AsyncIO() as io:
        with pytest.raises(OSError, match="cannot preallocate"):
            io.open(tmp_path / "huge.bin", "w", create=True, size=1 << 62)
        assert not (tmp_path / "huge.bin").exists() or os.path.getsize(tmp_path / "huge.bin") == 0


def test_files_are_created_private(tmp_path):
    with AsyncIO() as io:
        io.open(tmp_path / "private.bin", "w", create=True, size=ALIGN).close()
    assert (os.stat(tmp_path / "private.bin").st_mode & 0o777) == 0o600
