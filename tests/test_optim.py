"""Fused CPU optimizer kernels and CPUAdamW against PyTorch.

Two kinds of parity are checked:
- bit-exact against torch's single-tensor AdamW formula run with torch ops, with
  the square root taken in fp64 (correctly rounded), on every instruction set;
- within 1e-6 (relative to the tensor's largest magnitude) against
  torch.optim.AdamW / Adam themselves over 1,000 steps. PyTorch's MKL builds
  compute Tensor.sqrt with MKL's vectorized sqrt, which is not always correctly
  rounded, so bit-exactness against them is not attainable by an IEEE kernel.
"""
from __future__ import annotations

import copy
import io
import threading
import time

import pytest
import torch

from engine import _native
from engine.optim import CPUAdamW, kernels
from engine.optim.kernels import adam_step, cast_to, grad_norm, grad_stats

ISAS = kernels.supported_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test once per instruction set this CPU supports."""
    before = kernels.active_isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(before)


def ref_adam_step(p, g, m, v, *, step, lr, beta1, beta2, eps, wd, adamw, state_bf16=False):
    """torch's _single_tensor_adam op for op (torch/optim/adam.py), with an IEEE sqrt."""
    if wd != 0:
        if adamw:
            p.mul_(1 - lr * wd)
        else:
            g = g.add(p, alpha=wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (v.double().sqrt().float() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
    if state_bf16:  # the bf16-state option: moments stored rounded after each step
        m.copy_(m.bfloat16())
        v.copy_(v.bfloat16())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    diff = (bits(a) != bits(b)).nonzero().flatten()
    assert diff.numel() == 0, f"{what}: {diff.numel()} of {a.numel()} differ, first at {diff[:5].tolist()}"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest magnitude in b."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CONFIGS = [
    # lr, betas, weight_decay, adamw
    (1e-3, (0.9, 0.999), 0.0, True),
    (1e-2, (0.9, 0.999), 0.01, True),
    (1e-1, (0.9, 0.99), 0.1, True),
    (3e-4, (0.3, 0.6), 0.05, True),   # 1 - beta1 >= 0.5: torch's lerp takes its other branch
    (1e-3, (0.9, 0.999), 0.01, False),  # Adam with L2
    (1e-2, (0.8, 0.95), 0.0, False),
]


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("lr,betas,wd,adamw", CONFIGS)
def test_bit_exact_vs_torch_formula(isa, lr, betas, wd, adamw):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 17, 4099):
        p = torch.randn(n, generator=gen)
        m, v = torch.zeros(n), torch.zeros(n)
        rp, rm, rv = p.clone(), m.clone(), v.clone()
        for step in range(1, 201):
            g = torch.randn(n, generator=gen) * 0.1
            adam_step(p, g, m, v, step=step, lr=lr, beta1=betas[0], beta2=betas[1], eps=1e-8,
                      weight_decay=wd, adamw_mode=adamw)
            ref_adam_step(rp, g, rm, rv, step=step, lr=lr, beta1=betas[0], beta2=betas[1], eps=1e-8,
                          wd=wd, adamw=adamw)
        assert_bits_equal(m, rm, f"exp_avg n={n}")
        assert_bits_equal(v, rv, f"exp_avg_sq n={n}")
        assert_bits_equal(p, rp, f"param n={n}")


@pytest.mark.parametrize("lr,betas,wd,adamw", CONFIGS)
def test_parity_with_torch_optim_1000_steps(lr, betas, wd, adamw):
    gen = torch.Generator().manual_seed(1)
    shapes = [(4099,), (31, 33), (17,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = CPUAdamW(ours, lr=lr, betas=betas, weight_decay=wd, adamw_mode=adamw)
    ref_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    ref = ref_cls(theirs, lr=lr, betas=betas, weight_decay=wd, foreach=False)
    for _ in range(1000):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g, g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert rel_diff(a.detach(), b.detach()) <= 1e-6
        sa, sb = opt.state[a], ref.state[b]
        assert sa["step"].item() == sb["step"].item() == 1000
        assert rel_diff(sa["exp_avg"], sb["exp_avg"]) <= 1e-6
        assert rel_diff(sa["exp_avg_sq"], sb["exp_avg_sq"]) <= 1e-6


def test_isas_agree_bitwise_on_large_tensor():
    """Block boundaries, OpenMP and the SIMD tails do not change a single bit."""
    n = 3 * (1 << 15) + 13
    gen = torch.Generator().manual_seed(2)
    p0, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen).bfloat16()
    results = []
    before = kernels.active_isa()
    try:
        for name in ISAS:
            kernels.set_isa(name)
            p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
            out = torch.empty(n, dtype=torch.bfloat16)
            for step in (1, 2, 3):
                adam_step(p, g, m, v, step=step, lr=1e-2, weight_decay=0.1, grad_scale=0.5, out=out)
            results.append((p, m, v, out))
    finally:
        kernels.set_isa(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bits_equal(a, b)


def test_grad_dtypes_and_grad_scale(isa):
    """bf16/fp16 gradients are converted exactly; grad_scale is one fp32 multiply."""
    every = torch.arange(65536 + 13, dtype=torch.int32).remainder(65536).to(torch.int16)  # + a SIMD tail
    n = every.numel()
    for dtype in (torch.bfloat16, torch.float16):
        g = every.view(dtype)
        finite = torch.isfinite(g.float())
        g = torch.where(finite, g, torch.zeros((), dtype=dtype))  # keep the trajectory finite
        p0 = torch.randn(n)
        for scale in (1.0, 0.37):
            p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
            rp, rm, rv = p0.clone(), torch.zeros(n), torch.zeros(n)
            adam_step(p, g, m, v, step=1, lr=1e-3, weight_decay=0.01, grad_scale=scale)
            gf = g.float() * torch.tensor(scale, dtype=torch.float32)
            adam_step(rp, gf, rm, rv, step=1, lr=1e-3, weight_decay=0.01)
            assert_bits_equal(p, rp, f"{dtype} scale {scale}")
            assert_bits_equal(v, rv, f"{dtype} scale {scale}")


def test_bf16_state_matches_rounded_reference(isa):
    """state_dtype=bf16: each step uses the fp32 moments it computes, then stores
    them rounded to nearest even; equal bit for bit to that reference."""
    gen = torch.Generator().manual_seed(3)
    n = 1001
    p = torch.randn(n, generator=gen)
    m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    rp, rm, rv = p.clone(), torch.zeros(n), torch.zeros(n)
    for step in range(1, 201):
        g = torch.randn(n, generator=gen)
        adam_step(p, g, m, v, step=step, lr=1e-3, weight_decay=0.01)
        ref_adam_step(rp, g, rm, rv, step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01, adamw=True,
                      state_bf16=True)
    assert_bits_equal(m, rm.bfloat16(), "exp_avg")
    assert_bits_equal(v, rv.bfloat16(), "exp_avg_sq")
    assert_bits_equal(p, rp, "param")


def test_bf16_state_optimizer_tracks_fp32():
    """CPUAdamW(state_dtype=bf16) converges like torch's fp32 AdamW on a quadratic."""
    gen = torch.Generator().manual_seed(4)
    a = torch.nn.Parameter(torch.randn(4096, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    target = torch.randn(4096, generator=gen)
    start = (a - target).norm().item()
    opt_a = CPUAdamW([a], lr=3e-2, state_dtype=torch.bfloat16)
    opt_b = torch.optim.AdamW([b], lr=3e-2)
    for _ in range(500):
        for p, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            ((p - target) ** 2).sum().backward()
            o.step()
    assert opt_a.state[a]["exp_avg"].dtype == torch.bfloat16
    assert (a - target).norm().item() < 0.01 * start
    assert ((a - b).norm() / b.norm()).item() < 5e-3


# --------------------------------------------------------------------------- casts


def _special_floats() -> torch.Tensor:
    patterns = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,                    # +-0, +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF,        # NaNs with payloads
        0xFFFFFFFF, 0x7FA00000, 0x7F801234, 0xFFA5A5A5,
        0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,                    # bf16 overflow / max
        0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x00400000,        # fp32 subnormals, min normal
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF,                    # bf16 ties to even
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,        # fp16 max, 65519.99, 65520
        0x38800000, 0x387FFFFF, 0x387FF000, 0x33800000, 0x33000000,        # fp16 min normal, subnormals
        0x33000001, 0x32FFFFFF, 0x33C00000, 0x33A00000, 0x33E00000,        # around 2^-25, 2^-24
        0x3A801000, 0x3A803000, 0x3A802000, 0xB3000001, 0xB8800000,        # fp16 subnormal ties
    ]
    vals = torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in patterns], dtype=torch.int32)
    return vals.view(torch.float32)


def _sweep_floats() -> torch.Tensor:
    """Specials, ~1M bit patterns strided over all 2^32, and 64k random ones."""
    stride = torch.arange(0, 1 << 32, 4093, dtype=torch.int64)
    rand = torch.randint(0, 1 << 32, (65536,), generator=torch.Generator().manual_seed(5), dtype=torch.int64)
    allbits = torch.cat([stride, rand])
    allbits = torch.where(allbits >= 1 << 31, allbits - (1 << 32), allbits).to(torch.int32)
    return torch.cat([_special_floats(), allbits.view(torch.float32)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_bit_identical_to_torch(isa, dtype):
    x = _sweep_floats()
    # Lengths that exercise the tail only, SIMD body + tail, and the OpenMP blocks.
    for n in (1, 5, 17, 47, x.numel()):
        src = x[:n].contiguous()
        out = torch.empty(n, dtype=dtype)
        cast_to(src, out)
        assert_bits_equal(out, src.to(dtype), f"{dtype} n={n}")
    specials = _special_floats()
    for shift in range(16):  # every special at every SIMD lane, in body and tail
        src = torch.cat([torch.ones(shift), specials, torch.ones(3)])
        assert_bits_equal(cast_to(src, torch.empty(src.numel(), dtype=dtype)), src.to(dtype), f"shift {shift}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adam_out_is_torch_cast_of_new_weights(isa, dtype):
    gen = torch.Generator().manual_seed(6)
    n = 4099
    p = torch.randn(n, generator=gen) * 3e4  # reaches fp16 overflow after the update
    p[:8] = torch.tensor([65519.0, 65520.0, -65520.0, 1e-7, -1e-7, 2.0**-25, 0.0, -0.0])
    m, v = torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=dtype)
    g = torch.randn(n, generator=gen)
    g[:8] = 0.0
    adam_step(p, g, m, v, step=1, lr=1e-3, weight_decay=0.0, out=out)
    assert_bits_equal(out, p.to(dtype))
    assert torch.isinf(out.float()).any() or dtype == torch.bfloat16


# --------------------------------------------------------------------------- gradient statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 17, 1_000_003])
def test_grad_stats_norm(isa, dtype, n):
    g = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    sumsq, bad = grad_stats(g)
    assert bad is False
    # The fp64 norm is the reference: torch's fp32 vector_norm itself is off by
    # ~1e-5 relative at a million elements (it accumulates in fp32).
    ref = torch.linalg.vector_norm(g, dtype=torch.float64).item()
    assert abs(sumsq**0.5 - ref) <= 1e-6 * ref
    if n == 0:
        assert sumsq == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 17, 1_000_003])
def test_grad_stats_detects_nonfinite_anywhere(isa, dtype, n):
    g = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(dtype)
    positions = sorted({0, n // 2, n - 1, *(max(0, n - k) for k in range(1, 18)), min(n - 1, 1 << 16)})
    for pos in positions:
        keep = g[pos].clone()
        for bad in (float("inf"), float("-inf"), float("nan")):
            g[pos] = bad
            sumsq, flag = grad_stats(g)
            assert flag is True, (pos, bad)
        g[pos] = keep
    assert grad_stats(g)[1] is False


def test_grad_stats_large_finite_values_are_finite():
    for dtype, big in ((torch.float32, torch.finfo(torch.float32).max), (torch.float16, 65504.0),
                       (torch.bfloat16, torch.finfo(torch.bfloat16).max)):
        g = torch.full((1000,), big, dtype=dtype)
        sumsq, bad = grad_stats(g)
        assert bad is False and sumsq > 0


def test_grad_stats_identical_across_isas_and_threads():
    g = torch.randn(1_000_003, generator=torch.Generator().manual_seed(8))
    before, threads = kernels.active_isa(), torch.get_num_threads()
    seen = set()
    try:
        for name in ISAS:
            kernels.set_isa(name)
            for t in (1, threads):
                torch.set_num_threads(t)
                seen.add(grad_stats(g)[0])
    finally:
        kernels.set_isa(before)
        torch.set_num_threads(threads)
    assert len(seen) == 1


def test_grad_norm_over_tensors():
    gs = [torch.randn(100), torch.randn(7).bfloat16(), torch.randn(33).half()]
    norm, bad = grad_norm(gs)
    ref = torch.linalg.vector_norm(torch.cat([g.double() for g in gs])).item()
    assert not bad and abs(norm - ref) <= 1e-9 * ref
    gs[1][3] = float("nan")
    assert grad_norm(gs)[1] is True


# --------------------------------------------------------------------------- optimizer API


def _train(opt: torch.optim.Optimizer, params, gen: torch.Generator, steps: int, sched=None) -> None:
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_identically(state_dtype):
    init = [torch.randn(257), torch.randn(16, 9)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a = CPUAdamW([{"params": a[:1]}, {"params": a[1:], "lr": 3e-3, "weight_decay": 0.0}], lr=1e-2,
                     state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(9)
    _train(opt_a, a, gen, 20)

    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in a], "optim": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert set(saved["optim"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert saved["optim"]["state"][0]["exp_avg"].dtype == state_dtype

    b = [torch.nn.Parameter(t) for t in saved["params"]]
    opt_b = CPUAdamW([{"params": b[:1]}, {"params": b[1:]}], lr=0.5, state_dtype=state_dtype)
    opt_b.load_state_dict(saved["optim"])
    assert opt_b.param_groups[1]["lr"] == 3e-3
    assert opt_b.state[b[0]]["exp_avg"].dtype == state_dtype

    gen_b = copy.deepcopy(gen)
    _train(opt_a, a, gen, 20)
    _train(opt_b, b, gen_b, 20)
    for pa, pb in zip(a, b):
        assert_bits_equal(pa.detach(), pb.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert_bits_equal(opt_a.state[pa][key], opt_b.state[pb][key], key)


def test_loads_torch_adamw_state_dict():
    init = torch.randn(300)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.05)
    gen = torch.Generator().manual_seed(10)
    _train(ref, [a], gen, 10)
    b.data.copy_(a.data)
    ours = CPUAdamW([b])
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)  # a live state_dict shares its tensors, as in torch
    buf.seek(0)
    ours.load_state_dict(torch.load(buf))
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["adamw_mode"] is True
    gen_b = copy.deepcopy(gen)
    _train(ref, [a], gen, 10)
    _train(ours, [b], gen_b, 10)
    assert rel_diff(b.detach(), a.detach()) <= 1e-6


def test_lr_scheduler_drives_like_torch():
    init = [torch.randn(1000), torch.randn(33)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    manual = [torch.nn.Parameter(t.clone()) for t in init]
    opt = CPUAdamW(ours, lr=1e-2, weight_decay=0.01)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.01)
    man = CPUAdamW(manual, lr=1e-2, weight_decay=0.01)
    s_ours = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    s_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=10, gamma=0.5)
    gen = torch.Generator().manual_seed(11)
    for step in range(50):
        for group in man.param_groups:  # the schedule applied by hand
            group["lr"] = 1e-2 * 0.5 ** (step // 10)
        for a, b, c in zip(ours, theirs, manual):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad, c.grad = g, g.clone(), g.clone()
        opt.step(), ref.step(), man.step()
        s_ours.step(), s_ref.step()
        assert s_ours.get_last_lr() == s_ref.get_last_lr()
    for a, b, c in zip(ours, theirs, manual):
        assert_bits_equal(a.detach(), c.detach())
        assert rel_diff(a.detach(), b.detach()) <= 1e-6


def test_optimizer_step_options():
    gen = torch.Generator().manual_seed(12)
    init, g = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    low = torch.empty(1000, dtype=torch.bfloat16)
    opt_a, opt_b = CPUAdamW([a]), CPUAdamW([b])
    if hasattr(a, "grad_dtype"):
        a.grad_dtype = None  # recent torch lets a grad differ from its param only when asked
    a.grad = g.half()
    b.grad = (g.half().float() * 0.25)
    closure_calls = []
    loss = opt_a.step(lambda: closure_calls.append(1) or 7.0, grad_scale=0.25, out={a: low})
    opt_b.step()
    assert loss == 7.0 and closure_calls == [1]
    assert_bits_equal(a.detach(), b.detach())
    assert_bits_equal(low, a.detach().bfloat16())
    # A non-contiguous gradient is made contiguous; params without grad are skipped.
    c = torch.nn.Parameter(torch.randn(8, 8))
    d = torch.nn.Parameter(torch.randn(3))
    opt_c = CPUAdamW([c, d])
    c.grad = torch.randn(8, 8).t()
    opt_c.step()
    assert d not in opt_c.state or len(opt_c.state[d]) == 0


# --------------------------------------------------------------------------- errors


def test_optimizer_rejects_bad_params():
    with pytest.raises(ValueError, match="contiguous"):
        CPUAdamW([torch.nn.Parameter(torch.randn(4, 4).t())])
    with pytest.raises(ValueError, match="fp32"):
        CPUAdamW([torch.nn.Parameter(torch.randn(4).double())])
    with pytest.raises(ValueError, match="fp32"):
        CPUAdamW([torch.nn.Parameter(torch.randn(4).half())])
    with pytest.raises(ValueError, match="CPU"):
        CPUAdamW([torch.nn.Parameter(torch.empty(4, device="meta"))])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            CPUAdamW([torch.nn.Parameter(torch.zeros(4, device="cuda"))])
    with pytest.raises(NotImplementedError, match="amsgrad"):
        CPUAdamW([torch.nn.Parameter(torch.randn(4))], amsgrad=True)
    with pytest.raises(ValueError):
        CPUAdamW([torch.nn.Parameter(torch.randn(4))], lr=-1.0)
    with pytest.raises(ValueError):
        CPUAdamW([torch.nn.Parameter(torch.randn(4))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="state_dtype"):
        CPUAdamW([torch.nn.Parameter(torch.randn(4))], state_dtype=torch.float16)
    p = torch.nn.Parameter(torch.randn(4))
    opt = CPUAdamW([p])
    if hasattr(p, "grad_dtype"):
        p.grad_dtype = None
    p.grad = torch.randn(4).double()
    with pytest.raises(ValueError, match="grad"):
        opt.step()
    p.grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_kernel_wrappers_reject_bad_tensors():
    p, m, v = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    with pytest.raises(ValueError, match="elements"):
        adam_step(p, torch.zeros(7), m, v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        adam_step(p, torch.zeros(8), m, v.bfloat16(), step=1, lr=1e-3)
    with pytest.raises(ValueError, match="out"):
        adam_step(p, torch.zeros(8), m, v, step=1, lr=1e-3, out=torch.zeros(8))
    with pytest.raises(ValueError, match="contiguous"):
        grad_stats(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="dtype"):
        grad_stats(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="dst"):
        cast_to(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="not supported|unknown"):
        kernels.set_isa("sse9")


def test_native_validates_arguments():
    p, g, m, v = (torch.zeros(8) for _ in range(4))
    addr = dict(param=p.data_ptr(), grad=g.data_ptr(), exp_avg=m.data_ptr(), exp_avg_sq=v.data_ptr())
    hyper = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)

    def call(n=8, **kw):
        args = {**addr, **hyper, **kw}
        _native.adam_step(n, args.pop("param"), args.pop("grad"), args.pop("exp_avg"), args.pop("exp_avg_sq"), **args)

    call()
    call(n=0, param=0, grad=0, exp_avg=0, exp_avg_sq=0)  # nothing to touch: null is fine
    for key in ("param", "grad", "exp_avg", "exp_avg_sq"):
        with pytest.raises(ValueError, match=f"{key} is a null pointer"):
            call(**{key: 0})
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        call(grad_dtype="float64")
    with pytest.raises(ValueError, match="state_dtype"):
        call(state_dtype="float16")
    with pytest.raises(ValueError, match="out_dtype"):
        call(out=torch.zeros(8, dtype=torch.bfloat16).data_ptr(), out_dtype="float32")
    with pytest.raises(ValueError, match="n must be >= 0"):
        call(n=-1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        call(step=0)
    with pytest.raises(ValueError, match="not aligned"):
        call(param=p.data_ptr() + 1)
    with pytest.raises(ValueError, match="overlaps"):
        call(exp_avg=v.data_ptr())
    with pytest.raises(ValueError, match="overlaps"):
        call(grad=p.data_ptr())
    with pytest.raises(ValueError, match="null pointer"):
        _native.grad_stats(5, 0, "float32")
    with pytest.raises(ValueError, match="unknown dtype"):
        _native.grad_stats(5, g.data_ptr(), "int8")
    with pytest.raises(ValueError, match="bfloat16' or 'float16"):
        _native.cast_fp32(8, p.data_ptr(), g.data_ptr(), "float32")
    with pytest.raises(ValueError, match="overlaps"):
        _native.cast_fp32(8, p.data_ptr(), p.data_ptr() + 8, "bfloat16")
    with pytest.raises(ValueError, match="unknown optimizer ISA"):
        _native.set_optim_isa("neon")


def test_kernels_release_the_gil():
    """A Python thread keeps running while kernels work on a large buffer."""
    n = 1 << 23
    p, g, m, v = torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)
    done = threading.Event()
    ticks = []

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    calls = 0
    try:
        time.sleep(0.01)
        start = time.perf_counter()
        while time.perf_counter() - start < 0.25:
            calls += 1
            adam_step(p, g, m, v, step=calls, lr=1e-3)
            grad_stats(g)
        end = time.perf_counter()
    finally:
        done.set()
        t.join()
    during = sum(start <= x <= end for x in ticks)
    # Kernels holding the GIL would let the ticker run about once per call at most.
    assert during > 2 * calls + 10, (during, calls)
