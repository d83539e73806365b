"""glibc mmap threshold: freed activation-sized blocks go back to the OS."""
from __future__ import annotations

import sys

import pytest
from helpers import run_python

CHILD = """
import ctypes, sys
from engine.memory.malloc import applied_mmap_threshold, set_mmap_threshold
from engine.procinfo import process_memory

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss():
    return process_memory().rss

def touched(n):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p

if sys.argv[1] == "set":
    assert set_mmap_threshold(1 << 20) and applied_mmap_threshold() == 1 << 20
# glibc raises its dynamic threshold to the size of each mmapped block freed: free a 30 MiB one,
# as a training step does with its large activations.
libc.free(touched(30 << 20))
before = rss()
large, small = [], []
for i in range(150):                      # 150 x 1.5 MiB "activations", each followed by a small
    large.append(touched(3 << 19))        # long-lived block that pins the heap top
    small.append(touched(128 << 10))
peak = rss()
for p in large:
    libc.free(p)
print(before, peak, rss())
"""


def run(mode: str) -> tuple[int, int, int]:
    out = run_python("-c", CHILD, mode, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(map(int, out.stdout.split()[-3:]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_fixed_threshold_returns_freed_blocks_to_the_os():
    before, peak, after = run("set")
    assert peak - before >= 200 << 20            # the blocks were really resident
    pins = 150 * (128 << 10)
    assert after - before <= pins + (8 << 20), ((peak - before) >> 20, (after - before) >> 20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_glibc_default_keeps_them_which_is_why_the_engine_sets_it():
    before, peak, after = run("none")
    assert after - before >= 200 << 20, ((peak - before) >> 20, (after - before) >> 20)


def test_out_of_range_threshold_is_refused():
    from engine.memory.malloc import set_mmap_threshold

    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        set_mmap_threshold(64 << 20)
