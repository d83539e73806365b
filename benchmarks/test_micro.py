"""pytest-benchmark microbenchmarks of the native core (not part of the default test run,
which collects only tests/):

    python -m pytest benchmarks/test_micro.py --benchmark-only

Each benchmark also checks its result, so a fast wrong answer fails instead of winning.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

from engine import AsyncIO, PinnedPool
from engine.optim import kernels

pytest.importorskip("pytest_benchmark")

MiB = 1 << 20


@pytest.fixture(scope="module")
def pool():
    p = PinnedPool(512 * MiB)
    yield p
    p.close()


@pytest.mark.parametrize("nbytes", [4096, 3 * MiB + 17, 64 * MiB])
def test_pool_alloc_free(benchmark, pool, nbytes):
    def alloc_free():
        block = pool.alloc(nbytes)
        block.free()

    benchmark(alloc_free)
    assert pool.stats()["in_use"] == 0


@pytest.mark.parametrize("backend", ["uring", "threads"])
def test_aio_write_read_64mib(benchmark, pool, backend):
    try:
        AsyncIO(backend).close()
    except Exception as exc:  # io_uring compiled out or disabled
        pytest.skip(f"{backend} backend not available here: {exc}")
    size = 64 * MiB
    src, dst = pool.alloc(size), pool.alloc(size)
    src.tensor((size,), torch.uint8).random_(0, 256)
    with tempfile.TemporaryDirectory() as d, AsyncIO(backend, pool=pool) as io:
        f = io.open(f"{d}/bench.bin", "rw", create=True, size=size)

        def round_trip():
            f.write(0, src).wait()
            f.read(0, dst).wait()

        benchmark(round_trip)
        f.close()
    assert torch.equal(src.tensor((size,), torch.uint8), dst.tensor((size,), torch.uint8))
    src.free(), dst.free()


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_16m_params(benchmark, grad_dtype):
    n = 16 * MiB // 4 * 4  # 16M parameters
    g = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g).to(grad_dtype)
    m, v = torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=torch.bfloat16)
    step = iter(range(1, 1 << 30))

    benchmark(lambda: kernels.adam_step(param, grad, m, v, step=next(step), lr=1e-4, weight_decay=0.01, out=out))
    assert torch.isfinite(param).all() and torch.equal(out, param.to(torch.bfloat16))


def test_fused_grad_stats_16m(benchmark):
    grad = torch.randn(16 * MiB, generator=torch.Generator().manual_seed(0))
    norm_sq, nonfinite = benchmark(kernels.grad_stats, grad)
    assert not nonfinite
    assert abs(norm_sq - grad.double().pow(2).sum().item()) <= 1e-9 * norm_sq
