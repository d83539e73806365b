"""TensorStore: round trips in both layouts and across paths, integrity, privacy and cleanup, bad input."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import REPO, run_unprivileged, tiny_llama_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import AsyncIOError, PinnedPool
from engine.errors import IntegrityError, StoreCapacityError
from engine.storage import TensorStore
from engine.storage.extents import ExtentAllocator
from engine.units import format_bytes

KiB, MiB = 1 << 10, 1 << 20
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


def random_tensor(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def make_paths(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"nvme{i}"
        p.mkdir(exist_ok=True)
        paths.append(str(p))
    return paths


# ----------------------------------------------------------------------------- property tests
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 40_000), st.sampled_from(range(len(DTYPES)))),
        st.tuples(st.just("free"), st.integers(0, 1000), st.just(0)),
        st.tuples(st.just("get"), st.integers(0, 1000), st.just(0)),
        st.tuples(st.just("overwrite"), st.integers(0, 1000), st.just(0)),
    ),
    min_size=1, max_size=40,
)


@pytest.mark.parametrize("layout,npaths", [("direct", 1), ("direct", 2), ("files", 1), ("files", 2)])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops, seed=st.integers(0, 2**16))
def test_random_put_get_free_round_trips(tmp_path, layout, npaths, script, seed):
    gen = torch.Generator().manual_seed(seed)
    live: dict = {}
    with TensorStore(make_paths(tmp_path, npaths), layout=layout, grow_step=256 * KiB, stripe_size=32 * KiB) as store:
        for n, (op, a, b) in enumerate(script):
            keys = sorted(live)
            if op == "put":
                t = random_tensor((a,), DTYPES[b], gen)
                store.put(("t", n), t)
                live[("t", n)] = t
            elif keys and op == "free":
                key = keys[a % len(keys)]
                store.free(key)
                del live[key]
                assert key not in store
            elif keys and op == "overwrite":
                key = keys[a % len(keys)]
                t = random_tensor(live[key].shape, live[key].dtype, gen)
                store.put(key, t)
                live[key] = t
            elif keys and op == "get":
                key = keys[a % len(keys)]
                assert torch.equal(store.get(key), live[key])
        for key, t in live.items():
            got = store.get(key)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
        if layout == "direct":
            used = sum(store.meta(k).padded_nbytes for k in live)
            assert store.stats()["disk_used"] == used


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300_000)), max_size=80))
def test_extent_allocator_never_overlaps_and_coalesces(script):
    grown = []
    alloc = ExtentAllocator(0, 4096, grow=grown.append, grow_step=64 * KiB)
    live = {}
    for is_alloc, n in script:
        if is_alloc or not live:
            off = alloc.allocate(n)
            size = -(-n // 4096) * 4096
            assert off % 4096 == 0 and off + size <= alloc.capacity
            for o, s in live.items():
                assert off + size <= o or o + s <= off
            live[off] = size
        else:
            off = sorted(live)[n % len(live)]
            alloc.free(off)
            del live[off]
    assert grown == sorted(grown)
    for off in list(live):
        alloc.free(off)
    assert alloc.free_extents() == ({0: alloc.capacity} if alloc.capacity else {})


# ----------------------------------------------------------------------------- direct layout specifics
def test_freed_space_is_reused_without_growing(tmp_path):
    with TensorStore(str(tmp_path), grow_step=MiB) as store:
        store.put("a", torch.zeros(100_000))
        first = store.meta("a").segments[0].file_offset
        reserved = store.stats()["disk_reserved"]
        store.free("a")
        store.put("b", torch.ones(100_000))
        assert store.meta("b").segments[0].file_offset == first
        assert store.stats()["disk_reserved"] == reserved


def test_large_tensors_are_striped_round_robin(tmp_path):
    with TensorStore(make_paths(tmp_path, 2), stripe_size=64 * KiB, grow_step=MiB) as store:
        t = torch.randn(100_000)  # 400 KB -> 7 segments
        store.put("big", t)
        indices = [s.path_index for s in store.meta("big").segments]
        assert len(indices) == 7 and all(indices[i] != indices[i + 1] for i in range(6))
        assert torch.equal(store.get("big"), t)
        sizes = [os.path.getsize(os.path.join(d, "swap.bin")) for d in store.directories]
        assert all(s > 0 for s in sizes)


def test_partial_reads(tmp_path):
    with PinnedPool(4 * MiB) as pool, TensorStore(str(tmp_path), pool=pool, stripe_size=64 * KiB) as store:
        t = torch.arange(300_000, dtype=torch.int32)
        store.put("t", t)
        block = pool.alloc(store.buffer_nbytes("t"))
        for offset, nbytes in [(0, 4), (4096, 8192), (64 * KiB, 64 * KiB), (8192, 1_200_000 - 8192), (1_196_032, 3968)]:
            store.read_into("t", block, offset, nbytes).wait()
            got = block.tensor(nbytes // 4, torch.int32)
            assert torch.equal(got, t[offset // 4: (offset + nbytes) // 4])
            del got
        with pytest.raises(ValueError, match="multiples of 4096"):
            store.read_into("t", block, 100, 8)
        with pytest.raises(ValueError, match="outside"):
            store.read_into("t", block, 0, 2_000_000)


def test_write_from_and_read_into_pool_blocks(tmp_path):
    with PinnedPool(4 * MiB) as pool, TensorStore(str(tmp_path), pool=pool) as store:
        assert store.stats()["backend"] in ("uring", "threads")
        store.allocate(("param", "w"), (256, 300), torch.float32)
        src = pool.alloc(store.buffer_nbytes(("param", "w")))
        w = src.tensor((256, 300), torch.float32)
        w.copy_(torch.randn(256, 300))
        store.write_from(("param", "w"), src).wait()
        dst = pool.alloc(store.buffer_nbytes(("param", "w")))
        req = store.read_into(("param", "w"), dst)
        req.wait()
        assert req.done() and torch.equal(dst.tensor((256, 300), torch.float32), w)
        small = pool.alloc(4096)
        with pytest.raises(ValueError, match="buffer"):
            store.write_from(("param", "w"), small)


# ----------------------------------------------------------------------------- integrity
@pytest.mark.parametrize("layout", ["direct", "files"])
def test_flipped_byte_is_detected_with_key_file_and_offset(tmp_path, layout):
    with TensorStore(str(tmp_path), layout=layout, stripe_size=64 * KiB) as store:
        t = torch.randn(50_000)
        store.put(("master", "layer.weight"), t)
        meta = store.meta(("master", "layer.weight"))
        seg = meta.segments[1]
        path = meta.file or os.path.join(store.directories[0], "swap.bin")
        fd = os.open(path, os.O_RDWR)
        try:
            byte = os.pread(fd, 1, seg.file_offset + 1000)
            os.pwrite(fd, bytes([byte[0] ^ 0x10]), seg.file_offset + 1000)
        finally:
            os.close(fd)
        with pytest.raises(IntegrityError) as info:
            store.get(("master", "layer.weight"))
        err = info.value
        assert err.key == ("master", "layer.weight") and err.path == path and err.offset == seg.file_offset
        assert "layer.weight" in str(err) and path in str(err) and str(seg.file_offset) in str(err)


def test_checksum_can_be_turned_off(tmp_path):
    with TensorStore(str(tmp_path), checksum=False) as store:
        store.put("x", torch.zeros(1024))
        path = os.path.join(store.directories[0], "swap.bin")
        with open(path, "r+b") as f:
            f.seek(store.meta("x").segments[0].file_offset)
            f.write(b"\x01")
        assert store.get("x")[0].item() != 0  # corrupt, and nobody checked
        assert store.stats()["crc_seconds"] == 0.0


def test_io_errors_surface_through_the_store(tmp_path):
    with TensorStore(str(tmp_path)) as store:
        store.put("x", torch.ones(10_000))
        store._io.inject_fault(1, errno.EIO)
        with pytest.raises(AsyncIOError) as info:
            store.get("x")
        assert info.value.errno == errno.EIO and "swap.bin" in info.value.filename
        assert torch.equal(store.get("x"), torch.ones(10_000))


# ----------------------------------------------------------------------------- privacy and cleanup
@pytest.mark.parametrize("layout", ["direct", "files"])
def test_files_are_private_and_removed_on_close(tmp_path, layout):
    store = TensorStore(str(tmp_path), layout=layout)
    store.put("x", torch.ones(10))
    (directory,) = store.directories
    assert os.stat(directory).st_mode & 0o777 == 0o700
    for name in os.listdir(directory):
        assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o600
    store.close()
    assert not os.path.exists(directory) and os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        store.put("y", torch.ones(1))


def test_removed_after_exception_inside_a_step(tmp_path):
    with pytest.raises(RuntimeError, match="step failed"):
        with TensorStore(str(tmp_path)) as store:
            store.put("w", torch.ones(100))
            raise RuntimeError("step failed")
    assert os.listdir(tmp_path) == []



def test_close_releases_everything_when_closing_a_file_fails(tmp_path):
    store = TensorStore(str(tmp_path))
    store.put("w", torch.ones(100))
    (directory,) = store.directories
    (backing,) = store._backings
    real_close = backing.file.close

    def failing_close():
        real_close()
        raise OSError(5, "injected close failure")

    backing.file.close = failing_close
    with pytest.raises(OSError, match="injected close failure"):
        store.close()
    assert not os.path.exists(directory) and os.listdir(tmp_path) == []  # removed despite the failure
    store.close()  # the error was reported once: a second close is a no-op


CHILD = """
import sys, time, torch
from engine.storage import TensorStore
store = TensorStore(sys.argv[1])
store.put("w", torch.ones(1000))
print(store.directories[0], flush=True)
if sys.argv[2] == "raise":
    sys.stdin.readline()  # the parent has seen the directory
    raise RuntimeError("uncaught")
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["raise", "SIGTERM", "SIGINT"])
def test_removed_when_the_process_dies(tmp_path, how):
    env = dict(os.environ, PYTHONPATH=REPO)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), how], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    directory = child.stdout.readline().strip()
    assert directory and os.path.isdir(directory)
    if how == "raise":
        child.stdin.write("go\n")
        child.stdin.flush()
    else:
        child.send_signal(getattr(signal, how))
    child.wait(timeout=60)
    assert child.returncode != 0
    assert not os.path.exists(directory), f"{how}: swap directory left behind"


# ----------------------------------------------------------------------------- bad input
def test_missing_path_and_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TensorStore(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        TensorStore(str(tmp_path / "file"))
    with pytest.raises(ValueError, match="layout"):
        TensorStore(str(tmp_path), layout="lmdb")
    with pytest.raises(ValueError, match="distinct"):
        TensorStore([str(tmp_path), str(tmp_path)])


def test_unwritable_path(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    result = run_unprivileged(f"""
        from engine.storage import TensorStore
        try:
            TensorStore({str(locked)!r})
        except PermissionError as exc:
            print("PermissionError:", exc)
    """, drop="cap_dac_override,cap_dac_read_search")
    assert result.returncode == 0, result.stderr
    assert "not writable" in result.stdout and str(locked) in result.stdout


def test_not_enough_disk_is_reported_before_writing(tmp_path):
    with TensorStore(str(tmp_path)) as store:
        free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
        with pytest.raises(StoreCapacityError) as info:
            store.ensure_capacity(free * 4)
        assert info.value.needed == free * 4 and "needed" in str(info.value) and "available" in str(info.value)
        store.ensure_capacity(MiB)
        with pytest.raises(StoreCapacityError, match="not enough disk space"):
            store.allocate("huge", (free * 2,), torch.uint8)
        assert "huge" not in store


def test_key_errors(tmp_path):
    with TensorStore(str(tmp_path)) as store:
        store.allocate("a", (10,), torch.float32)
        with pytest.raises(ValueError, match="never written"):
            store.get("a")
        with pytest.raises(ValueError, match="already stored"):
            store.allocate("a", (11,), torch.float32)
        with pytest.raises(KeyError):
            store.get("nope")
        store.put("empty", torch.empty(0, 5))
        assert store.get("empty").shape == (0, 5)


def test_raw_device_is_opt_in_and_mounted_devices_are_refused(tmp_path):
    device = next((d for d in ("/dev/vda", "/dev/nvme0n1", "/dev/sda") if os.path.exists(d)), None)
    if device is None:
        pytest.skip("no block device node to test against")
    with pytest.raises(ValueError, match="allow_raw_device"):
        TensorStore(device)
    mounted = any(line.split()[0] == device for line in open("/proc/mounts"))
    if not mounted:
        pytest.skip(f"{device} is not mounted here")
    with pytest.raises(ValueError, match="mounted|in use"):
        TensorStore(device, allow_raw_device=True)


def test_partial_writes_of_whole_segments_across_dtypes(tmp_path):
    """Segments hold the same number of elements for every dtype, so an fp32 master and its
    bf16 copy split at the same indices, and whole segments can be rewritten in place."""
    with PinnedPool(8 * MiB) as pool, TensorStore(str(tmp_path), pool=pool, stripe_size=64 * KiB) as store:
        n = 100_000  # 16384 elements per segment -> 7 segments
        master, half = torch.randn(n), torch.randn(n).to(torch.bfloat16)
        store.put("master", master)
        store.put("half", half)
        per_seg = store.segment_elements
        assert per_seg == 16384
        assert [s.tensor_offset // 4 for s in store.meta("master").segments] == \
               [s.tensor_offset // 2 for s in store.meta("half").segments]
        # Rewrite segments 2..3 of the fp32 tensor and the tail segment of the bf16 one.
        block = pool.alloc(2 * per_seg * 4)
        new = torch.randn(2 * per_seg)
        block.tensor(2 * per_seg, torch.float32).copy_(new)
        store.write_from("master", block, offset=2 * per_seg * 4, nbytes=2 * per_seg * 4).wait()
        master[2 * per_seg: 4 * per_seg] = new
        tail = n - 6 * per_seg
        tail_block = pool.alloc(tail * 2)
        tail_new = torch.randn(tail).to(torch.bfloat16)
        tail_block.tensor(tail, torch.bfloat16).copy_(tail_new)
        store.write_from("half", tail_block, offset=6 * per_seg * 2).wait()
        half[6 * per_seg:] = tail_new
        del block, tail_block
        assert torch.equal(store.get("master"), master) and torch.equal(store.get("half"), half)
        with pytest.raises(ValueError, match="whole segments"):
            store.write_from("master", pool.alloc(8192), offset=4096, nbytes=4096)
        with pytest.raises(ValueError, match="whole segments"):
            store.write_from("master", pool.alloc(per_seg * 4), offset=0, nbytes=per_seg * 2)
        # A partially written, never fully written tensor cannot be read where it was not written.
        store.allocate("fresh", (n,), torch.float32)
        seg0 = pool.alloc(per_seg * 4)
        store.write_from("fresh", seg0, offset=0, nbytes=per_seg * 4).wait()
        store.read_into("fresh", seg0, 0, per_seg * 4).wait()
        with pytest.raises(ValueError, match="never written"):
            store.read_into("fresh", seg0, per_seg * 4, 4096)


def test_requests_on_one_key_are_ordered(tmp_path):
    """A read issued while a write of the same key is in flight sees the written data; a write
    issued while a read is in flight does not change what that read returns."""
    with PinnedPool(8 * MiB) as pool, TensorStore(str(tmp_path), pool=pool) as store:
        store.allocate("k", (262_144,), torch.float32)
        blocks = [pool.alloc(store.buffer_nbytes("k")) for _ in range(3)]
        for i in range(20):
            a, b, out = (blk.tensor(262_144, torch.float32) for blk in blocks)
            a.fill_(i)
            b.fill_(i + 0.5)
            w1 = store.write_from("k", blocks[0])
            r1 = store.read_into("k", blocks[2])   # must see a
            r1.wait()
            assert torch.all(out == i)
            r2 = store.read_into("k", blocks[2])
            w2 = store.write_from("k", blocks[1])  # must not overtake r2
            r2.wait()
            assert torch.all(out == i)
            w1.wait()
            w2.wait()
            assert torch.all(store.get("k") == i + 0.5)
            del a, b, out


def test_an_error_is_raised_to_its_owner_even_if_another_request_waited_first(tmp_path):
    with PinnedPool(4 * MiB) as pool, TensorStore(str(tmp_path), pool=pool) as store:
        store.allocate("k", (1024,), torch.float32)
        block = pool.alloc(store.buffer_nbytes("k"))
        store._io.inject_fault(1, errno.EIO)
        failed = store.write_from("k", block)
        store.write_from("k", block).wait()  # waits for `failed` internally
        with pytest.raises(AsyncIOError):
            failed.wait()
        with pytest.raises(AsyncIOError):
            failed.wait()


def test_disjoint_ranges_of_one_key_do_not_wait_for_each_other(tmp_path):
    with PinnedPool(8 * MiB) as pool, TensorStore(str(tmp_path), pool=pool, stripe_size=64 * KiB) as store:
        store.put("k", torch.zeros(100_000))
        seg = store.segment_elements * 4
        block = pool.alloc(2 * seg)
        w = store.write_from("k", block, offset=0, nbytes=seg)
        r = store.read_into("k", block.tensor(2 * seg, torch.uint8)[seg:], offset=seg, nbytes=seg)
        assert len(store._inflight["k"]) == 2 or w.done()  # the read did not wait for the write
        r.wait()
        w.wait()
        assert "k" not in store._inflight


# ----------------------------------------------------------------------------- swap growth
@contextlib.contextmanager
def loop_fs(tmp_path, name: str, size: int):
    """An ext4 file system of ``size`` bytes (a loop mount: needs root); skips where one cannot be made."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("a loop-mounted file system needs root and mkfs.ext4")
    image, mnt = tmp_path / f"{name}.img", tmp_path / name
    with open(image, "wb") as f:
        f.truncate(size)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    mnt.mkdir()
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                                                      capture_output=True, text=True).returncode == 0
    if not mounted:
        pytest.skip("cannot loop-mount a file system here")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB ext4 file system."""
    with loop_fs(tmp_path, "mnt", 64 * MiB) as mnt:
        yield mnt


@pytest.fixture
def unequal_fs(tmp_path):
    """Two ext4 file systems of unequal free space: 64 MiB (about 50 MiB free) and 16 MiB (about 12.6 MiB free)."""
    with loop_fs(tmp_path, "big", 64 * MiB) as big, loop_fs(tmp_path, "small", 16 * MiB) as small:
        yield big, small


def test_a_mounted_loop_device_is_refused_naming_its_mount_point(small_fs):
    dev = os.stat(small_fs).st_dev
    node = "/dev/" + os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    if not os.path.exists(node):
        pytest.skip(f"no device node {node} for the loop mount")
    with pytest.raises(ValueError, match=f"is mounted at '{small_fs}'"):
        TensorStore(node, allow_raw_device=True)


def test_ensure_capacity_reserves_exactly_what_is_asked_and_allocations_fit_in_it(tmp_path):
    with TensorStore(str(tmp_path)) as store:
        store.ensure_capacity(3 * MiB + 100)
        reserved = 3 * MiB + 4096  # rounded up to the I/O alignment, no further
        swap = os.path.join(store.directories[0], "swap.bin")
        assert store.stats()["disk_reserved"] == reserved and os.stat(swap).st_size == reserved
        store.put("a", torch.zeros(MiB // 4))
        store.put("b", torch.zeros(2 * MiB // 4 + 25))
        assert store.stats()["disk_reserved"] == reserved and os.stat(swap).st_size == reserved
        # Beyond the reservation (grow_step 1 GiB): at most the file's size more, not 1 GiB.
        store.put("c", torch.zeros(MiB // 4))
        assert reserved + MiB <= store.stats()["disk_reserved"] <= 2 * reserved
    with TensorStore(make_paths(tmp_path, 2), stripe_size=64 * KiB) as store:  # each path: its share
        store.ensure_capacity(MiB)
        share = (MiB + 64 * KiB) // 2  # the even half plus half a segment (path_share: least-used placement)
        assert store.stats()["disk_reserved"] == 2 * share
        assert [os.stat(os.path.join(d, "swap.bin")).st_size for d in store.directories] == [share] * 2


def test_path_share_is_the_even_share_plus_the_spill_of_one_extent():
    from engine.storage.store import path_share

    assert path_share(3 * MiB + 100, 1, 16 * MiB) == 3 * MiB + 4 * KiB  # one path: everything, aligned
    assert path_share(10 * MiB, 2, MiB) == 10 * MiB // 2 + MiB // 2
    assert path_share(9 * MiB, 3, MiB) == 939 * 4 * KiB  # (9 + 2) MiB / 3 = 3844778.7 bytes, rounded up to 4 KiB
    assert path_share(64 * KiB, 2, 16 * MiB) == 64 * KiB  # an extent is never larger than the total
    assert path_share(0, 4, MiB) == 0


def stored_bytes_per_path(store) -> list[int]:
    used = [0] * len(store.directories)
    for key in store.keys():
        for seg in store.meta(key).segments:
            used[seg.path_index] += seg.length
    return used


@pytest.mark.parametrize("seed", range(4))
def test_each_path_holds_what_placement_puts_on_it(tmp_path, seed):
    """Tensors of unequal sizes (here: whole segments alternating with single pages, which plain
    round-robin puts all on one path) fit the per-path reservation: nothing grows."""
    from engine.storage.store import path_share

    gen = torch.Generator().manual_seed(seed)
    seg = 64 * KiB
    if seed == 0:
        sizes = [seg, 4 * KiB] * 12
    else:
        sizes = [int(n) * 4 * KiB for n in torch.randint(1, 40, (30,), generator=gen)]  # up to 2.4 segments
    total = sum(sizes)
    for npaths in (2, 3):
        with TensorStore(make_paths(tmp_path, npaths), stripe_size=seg, grow_step=MiB) as store:
            store.ensure_capacity(total)  # default largest extent: one segment of 4-byte elements
            share = path_share(total, npaths, seg)
            swaps = [os.path.join(d, "swap.bin") for d in store.directories]
            assert [os.stat(f).st_size for f in swaps] == [share] * npaths
            for i, n in enumerate(sizes):
                store.allocate(i, (n // 4,), torch.float32)
            assert [os.stat(f).st_size for f in swaps] == [share] * npaths, stored_bytes_per_path(store)
            assert max(stored_bytes_per_path(store)) <= share


def test_plan_and_initialize_agree_on_paths_of_unequal_free_space(unequal_fs):
    """64 MiB and 16 MiB file systems: a run whose total fits their sum but whose share does not
    fit the small one is refused by the plan check, initialize and the store alike, with the same
    numbers; one that fits trains with each swap file exactly its planned share."""
    from transformers import LlamaForCausalLM

    import engine
    from engine.offload.planner import PlanError, check_disk

    big_fs, small = unequal_fs
    paths = [big_fs, small]
    cfg = engine.Config(nvme_path=paths, optimizer=engine.AdamWConfig(lr=1e-3))
    free = [os.statvfs(p).f_bavail * os.statvfs(p).f_frsize for p in paths]

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config(hidden=256, inter=512, vocab=2048))
    plan = engine.plan(model, cfg)
    share = plan.disk_per_path[small]
    assert plan.disk_bytes < sum(free) and free[1] < share < free[0]  # the case a summed check let through
    with pytest.raises(PlanError) as planned:
        check_disk(plan, paths)
    with pytest.raises(PlanError) as initialized:
        engine.initialize(model, cfg, initializer=lambda name, shape: torch.zeros(shape))
    assert str(planned.value) == str(initialized.value)
    assert f"on {small}: the run needs {format_bytes(share)}" in str(planned.value)
    with TensorStore(paths, stripe_size=plan.segment_elements * 4) as store:
        with pytest.raises(StoreCapacityError) as stored:
            store.ensure_capacity(plan.disk_bytes, plan.disk_largest_extent)
        assert store.stats()["disk_reserved"] == 0  # refused before anything grew
    assert stored.value.needed == share and small in str(stored.value) and big_fs not in str(stored.value)
    assert abs(stored.value.available - free[1]) <= 64 * KiB  # the store's directory and empty swap file

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).float()
    plan = engine.plan(model, cfg)
    check_disk(plan, paths)
    with engine.initialize(model, cfg) as trainer:
        swaps = [os.path.join(p, d, "swap.bin") for p in paths for d in os.listdir(p) if d.startswith("memascend-")]
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        for _ in range(trainer.gradient_accumulation_steps):
            trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()
        assert trainer.global_steps == 1 and trainer.skipped_steps == 0
        assert [os.stat(f).st_size for f in swaps] == [plan.disk_per_path[p] for p in paths]  # no growth
    assert [os.listdir(p) for p in paths] == [["lost+found"]] * 2


def test_growth_beyond_the_reservation_is_bounded_by_the_free_space(small_fs):
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    with TensorStore(small_fs) as store:  # grow_step 1 GiB by default: far more than this file system
        store.put("w", torch.ones(MiB // 4))
        assert MiB <= store.stats()["disk_reserved"] <= max(MiB, free // 8)
        assert torch.equal(store.get("w"), torch.ones(MiB // 4))


def test_plan_and_initialize_agree_on_a_small_file_system(small_fs, tmp_path, capsys):
    """A model whose plan fits a 64 MiB file system trains there (its swap file is exactly the
    planned size); one that does not fit is refused by plan, the plan command and initialize alike."""
    from transformers import LlamaForCausalLM

    import engine
    from engine.cli import main
    from engine.offload.planner import PlanError, check_disk

    cfg = engine.Config(nvme_path=small_fs, optimizer=engine.AdamWConfig(lr=1e-3))
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).float()
    plan = engine.plan(model, cfg)
    check_disk(plan, [small_fs])  # "fits"
    with engine.initialize(model, cfg) as trainer:
        (swap_dir,) = [d for d in os.listdir(small_fs) if d.startswith("memascend-swap-")]
        swap = os.path.join(small_fs, swap_dir, "swap.bin")
        assert os.stat(swap).st_size == plan.disk_bytes
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        for _ in range(trainer.gradient_accumulation_steps):
            trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()
        assert trainer.global_steps == 1 and trainer.skipped_steps == 0
        assert os.stat(swap).st_size == plan.disk_bytes  # the plan was the whole of it
    assert os.listdir(small_fs) == ["lost+found"]

    big = tiny_llama_config(hidden=512, inter=1024, vocab=8192, layers=4)  # ~18M parameters, ~290 MiB on disk
    with torch.device("meta"):
        model = LlamaForCausalLM(big)
    with pytest.raises(PlanError) as planned:
        check_disk(engine.plan(model, cfg), [small_fs])
    with pytest.raises(PlanError) as initialized:
        engine.initialize(model, cfg, initializer=lambda name, shape: torch.zeros(shape))
    assert str(planned.value) == str(initialized.value) and "not enough disk space" in str(planned.value)
    big.save_pretrained(tmp_path / "big")
    assert main(["plan", str(tmp_path / "big"), "--nvme-path", small_fs]) == 1
    assert str(planned.value) in capsys.readouterr().err
    assert os.listdir(small_fs) == ["lost+found"]
