"""PinnedPool: exact sub-allocation, best fit, coalescing, thread safety, tensor views."""
from __future__ import annotations

import bisect
import random
import threading

import numpy as np
import pytest
import torch
from helpers import run_unprivileged

from engine import PinnedPool, PoolExhaustedError

MiB = 1 << 20
ALIGN = 4096


def rounded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def stamp(block, value: int) -> None:
    """Writes a marker at the first and last byte the block owns."""
    view = block.memoryview()
    view[0] = value
    view[block.size - 1] = value
    del view


def check_stamp(block, value: int) -> None:
    view = block.memoryview()
    assert view[0] == value and view[block.size - 1] == value, "another allocation overwrote this block"
    del view


def test_exact_rounding_to_io_alignment():
    with PinnedPool(4 * MiB) as pool:
        for request, expected in [(1, 4096), (4095, 4096), (4096, 4096), (4097, 8192), (3 * MiB + 1, 3 * MiB + 4096)]:
            block = pool.alloc(request)
            assert block.size == expected and block.nbytes == request
            assert block.address % ALIGN == 0
            block.free()
        assert pool.stats()["in_use"] == 0


def test_fuzz_random_alloc_free_no_overlap_exact_accounting():
    rng = random.Random(1234)
    capacity = 256 * MiB
    pool = PinnedPool(capacity)
    live: dict[int, tuple] = {}  # offset -> (block, marker)
    starts: list[int] = []       # sorted offsets of live blocks
    in_use = requested = 0
    exhausted = 0
    for step in range(10_000):
        if live and (rng.random() < 0.45 or in_use > capacity * 0.9):
            offset = rng.choice(starts)
            block, marker = live.pop(offset)
            starts.pop(bisect.bisect_left(starts, offset))
            check_stamp(block, marker)
            in_use -= block.size
            requested -= block.nbytes
            block.free()
        else:
            # Log-uniform sizes from 1 byte to 16 MiB.
            nbytes = max(1, int(2 ** rng.uniform(0, 24)))
            try:
                block = pool.alloc(nbytes)
            except PoolExhaustedError as exc:
                exhausted += 1
                assert exc.requested == nbytes and exc.largest_free < rounded(nbytes)
                assert exc.free_bytes == capacity - in_use
                continue
            assert block.address % ALIGN == 0 and block.size == rounded(nbytes)
            assert block.address == pool.base + block.offset
            assert 0 <= block.offset and block.offset + block.size <= capacity
            i = bisect.bisect_left(starts, block.offset)
            if i > 0:  # the previous block must end before this one starts
                prev = live[starts[i - 1]][0]
                assert prev.offset + prev.size <= block.offset
            if i < len(starts):
                assert block.offset + block.size <= starts[i]
            marker = step % 251 + 1
            stamp(block, marker)
            starts.insert(i, block.offset)
            live[block.offset] = (block, marker)
            in_use += block.size
            requested += nbytes
        stats = pool.stats()
        assert stats["in_use"] == in_use and stats["requested"] == requested
        assert stats["live_allocations"] == len(live)
        assert stats["free_bytes"] == capacity - in_use
        free_blocks = pool.free_blocks()
        assert sum(free_blocks.values()) == capacity - in_use
        assert max(free_blocks.values(), default=0) == stats["largest_free"]
    for block, marker in live.values():
        check_stamp(block, marker)
        block.free()
    assert pool.free_blocks() == {0: capacity}
    stats = pool.stats()
    assert stats["in_use"] == 0 and stats["fragmentation"] == 0.0 and stats["peak_in_use"] <= capacity
    assert stats["total_allocations"] > 4000
    pool.close()


def test_best_fit_and_coalescing():
    page = ALIGN
    with PinnedPool(64 * page) as pool:
        a, b, c, d, e = (pool.alloc(n * page) for n in (1, 4, 1, 2, 1))
        b_offset, d_offset = b.offset, d.offset
        b.free()
        d.free()
        # Best fit: a 2-page request takes d's 2-page hole, not b's 4-page one.
        f = pool.alloc(2 * page)
        assert f.offset == d_offset
        f.free()
        # Freeing c merges b, c and d's holes into one 7-page block.
        c.free()
        assert pool.free_blocks()[b_offset] == 7 * page
        for blk in (a, e):
            blk.free()
        assert pool.free_blocks() == {0: 64 * page}


def test_exhaustion_error_names_sizes():
    with PinnedPool(16 * ALIGN) as pool:
        blocks = [pool.alloc(ALIGN) for _ in range(16)]
        for blk in blocks[::2]:
            blk.free()
        with pytest.raises(PoolExhaustedError) as info:
            pool.alloc(2 * ALIGN)
        err = info.value
        assert ((err.requested, err.free_bytes, err.largest_free, err.capacity)
                == (2 * ALIGN, 8 * ALIGN, ALIGN, 16 * ALIGN))
        assert "requested 8192 bytes" in str(err) and "largest free block 4096" in str(err)
        assert isinstance(err, MemoryError)


def test_concurrent_alloc_free_from_threads():
    capacity = 128 * MiB
    pool = PinnedPool(capacity)
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine = []
        try:
            for _ in range(2000):
                if mine and rng.random() < 0.5:
                    block, marker = mine.pop(rng.randrange(len(mine)))
                    view = np.frombuffer(block.memoryview(), dtype=np.uint8)
                    if not (view == marker).all():
                        failures.append(f"thread {seed}: block at {block.offset} was overwritten")
                    del view
                    block.free()
                else:
                    try:
                        block = pool.alloc(rng.randint(1, 256 * 1024))
                    except PoolExhaustedError:
                        continue
                    marker = seed * 16 + rng.randrange(16)
                    np.frombuffer(block.memoryview(), dtype=np.uint8)[:] = marker
                    mine.append((block, marker))
            for block, _ in mine:
                block.free()
        except Exception as exc:  # surfaced below: pytest does not see thread exceptions
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert pool.free_blocks() == {0: capacity}
    assert pool.stats()["in_use"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64,
                                   torch.uint8])
def test_tensor_views_share_block_memory(dtype):
    with PinnedPool(MiB) as pool:
        block = pool.alloc(10_000)
        t = block.tensor((5, 7), dtype)
        assert t.shape == (5, 7) and t.dtype == dtype and t.data_ptr() == block.address
        src = (torch.arange(35) % 100).to(dtype).view(5, 7)
        t.copy_(src)
        # The bytes are in the block: read them back through a second, offset view.
        itemsize = t.element_size()
        tail = block.tensor(35 - 7, dtype, offset=7 * itemsize)
        assert torch.equal(tail, src.flatten()[7:])
        raw = bytes(block.memoryview()[: 35 * itemsize])
        assert (raw == src.numpy().tobytes() if dtype != torch.bfloat16
                else raw == src.view(torch.int16).numpy().tobytes())
        with pytest.raises(ValueError, match="needs"):
            block.tensor(block.size // itemsize + 1, dtype)
        del t, tail


def test_view_keeps_memory_alive_and_free_refuses_live_views():
    pool = PinnedPool(MiB)
    block = pool.alloc(8192)
    t = block.tensor(2048, torch.float32)
    t.fill_(7.0)
    with pytest.raises(BufferError, match="live view"):
        block.free()
    view_of_view = t[10:20]
    del t, block
    # The block object is gone but the tensor still views its memory: it must stay allocated.
    assert pool.stats()["in_use"] == 8192
    other = pool.alloc(8192)
    assert other.offset != 0 and pool.stats()["live_allocations"] == 2
    assert torch.all(view_of_view == 7.0)
    del view_of_view
    assert pool.stats()["in_use"] == 8192  # only `other`
    other.free()
    assert pool.stats()["in_use"] == 0
    # alloc_tensor: the block lives exactly as long as the tensor.
    x = pool.alloc_tensor((3, 100), torch.float16)
    assert pool.stats()["in_use"] == 4096
    del x
    assert pool.stats()["in_use"] == 0


def test_closed_pool_keeps_live_blocks_valid():
    pool = PinnedPool(MiB)
    t = pool.alloc_tensor(1024, torch.float32)
    pool.close()
    t.fill_(1.5)  # the arena is unmapped only when the last block goes
    assert float(t.sum()) == 1536.0
    with pytest.raises(ValueError, match="closed"):
        pool.alloc(10)


def test_bad_arguments():
    with pytest.raises(ValueError):
        PinnedPool(0)
    with pytest.raises(ValueError, match="byte size"):
        PinnedPool("lots")
    assert PinnedPool("1MiB").capacity == MiB
    with PinnedPool(MiB) as pool:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError):
                pool.alloc(bad)
        with pytest.raises(ValueError, match="multiple of"):
            pool.alloc(8).tensor(1, torch.float32, offset=2)


def test_arena_is_page_locked_or_says_why():
    with PinnedPool(8 * MiB) as pool:
        stats = pool.stats()
        if not stats["locked"]:
            assert stats["lock_errno"] != 0


def test_lock_failure_warns_or_raises_without_cap_ipc_lock():
    code = """
        import resource, logging
        import engine
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
        pool = engine.PinnedPool("64MiB")
        print("locked", pool.locked, pool.stats()["lock_errno"])
        try:
            engine.PinnedPool("64MiB", require_locked=True)
        except engine.PinnedMemoryError as exc:
            print("raised", exc)
    """
    result = run_unprivileged(code, drop="cap_ipc_lock")
    assert result.returncode == 0, result.stderr
    assert "locked False" in result.stdout
    assert "raised" in result.stdout and "RLIMIT_MEMLOCK" in result.stdout
    assert "could not page-lock" in result.stderr  # the warning, said once


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_registration_and_async_copies():
    with PinnedPool(16 * MiB) as pool:
        assert pool.cuda_registered and pool.stats()["cuda_registered"]
        host = pool.alloc_tensor(MiB, torch.float32)
        host.copy_(torch.randn(MiB))
        dev = host.to("cuda", non_blocking=True)
        back = pool.alloc_tensor(MiB, torch.float32)
        back.copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(host, back)
        del host, back
    assert not pool.cuda_registered


def test_transparent_huge_pages_are_requested():
    with PinnedPool(8 * MiB, hugepages=True) as pool:
        t = pool.alloc_tensor(MiB, torch.float32)
        t.fill_(2.0)
        assert float(t[-1]) == 2.0
        assert pool.stats()["hugepages"] is True
        del t
