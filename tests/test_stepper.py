"""The pipelined optimizer stepper over NVMe-resident states equals torch.optim.AdamW."""
from __future__ import annotations

import pytest
import torch

from engine import PinnedPool
from engine.offload.stepper import OptimizerStepper, ParamSpec, Piece, plan_sub_groups
from engine.storage import TensorStore

MiB = 1 << 20
SEG = 8192  # elements per store segment with stripe_size=32KiB
SHAPES = {"embed": (300, 70), "w1": (64, 64), "w2": (5000,), "w3": (17, 3), "tail": (40_000,)}


def test_sub_groups_cut_at_segment_boundaries_and_respect_the_limit():
    params = [ParamSpec(n, s) for n, s in SHAPES.items()]
    groups = plan_sub_groups(params, SEG, 3 * SEG)
    covered = {n: 0 for n in SHAPES}
    for g in groups:
        assert sum(p.numel for p in g) <= 3 * SEG
        for piece in g:
            assert piece.start % SEG == 0 and piece.start == covered[piece.name]
            covered[piece.name] += piece.numel
    assert covered == {n: ParamSpec(n, s).numel for n, s in SHAPES.items()}
    assert plan_sub_groups([ParamSpec("x", (10,))], SEG, 1) == [[Piece("x", 0, 10, 0)]]


@pytest.mark.parametrize("adamw", [True, False])
@pytest.mark.parametrize("sub_group", [SEG, 3 * SEG, 1 << 20])
def test_fp32_stepper_matches_torch_adamw(tmp_path, adamw, sub_group):
    torch.manual_seed(0)
    ref = {n: torch.randn(s, requires_grad=True) for n, s in SHAPES.items()}
    lr, wd = 1e-2, 0.1
    opt_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    ref_opt = opt_cls(ref.values(), lr=lr, weight_decay=wd, foreach=False)
    with PinnedPool(16 * MiB) as pool, TensorStore(str(tmp_path), pool=pool, stripe_size=32 * 1024) as store:
        for n, p in ref.items():
            store.put(("param", n), p.detach())
        specs = [ParamSpec(n, s) for n, s in SHAPES.items()]
        stepper = OptimizerStepper(store, pool, specs, sub_group_elements=sub_group, adamw_mode=adamw,
                                   group_hparams=lambda g: (lr, wd))
        stepper.initialize_states()
        for step in range(1, 6):
            for n, p in ref.items():
                p.grad = torch.randn_like(p)
                store.put(("grad", n), p.grad)
            ref_opt.step()
            stepper.step(step)
        for n, p in ref.items():
            got = store.get(("param", n))
            torch.testing.assert_close(got, p.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(store.get(("exp_avg_sq", n)), ref_opt.state[p]["exp_avg_sq"], rtol=1e-6, atol=0)
        assert stepper.stats.bytes_read > 0 and stepper.stats.bytes_written > 0
        stepper.close()
        assert pool.stats()["in_use"] == 0


def test_grad_scale_unscales_and_clips_in_the_same_pass(tmp_path):
    torch.manual_seed(1)
    w = torch.randn(20_000)
    grad = torch.randn(20_000) * 1024.0  # as if scaled by a loss scale of 1024
    with PinnedPool(8 * MiB) as pool, TensorStore(str(tmp_path), pool=pool, stripe_size=32 * 1024) as store:
        store.put(("param", "w"), w)
        store.put(("grad", "w"), grad)
        stepper = OptimizerStepper(store, pool, [ParamSpec("w", (20_000,))], sub_group_elements=SEG,
                                   group_hparams=lambda g: (1e-3, 0.0))
        stepper.initialize_states()
        stepper.step(1, grad_scale=0.5 / 1024.0)
        ref = w.clone().requires_grad_()
        ref.grad = grad / 1024.0 * 0.5
        torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0, foreach=False).step()
        torch.testing.assert_close(store.get(("param", "w")), ref.detach(), rtol=1e-6, atol=1e-7)
        stepper.close()


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_mixed_precision_keeps_fp32_master_and_writes_low_precision_weights(tmp_path, low):
    torch.manual_seed(2)
    shapes = {"a": (100, 100), "b": (30_000,)}
    master = {n: torch.randn(s).to(low).float().requires_grad_() for n, s in shapes.items()}
    ref_opt = torch.optim.AdamW(master.values(), lr=1e-3, weight_decay=0.01, foreach=False)
    with PinnedPool(16 * MiB) as pool, TensorStore(str(tmp_path), pool=pool, stripe_size=32 * 1024) as store:
        for n, p in master.items():
            store.put(("param", n), p.detach().to(low))
        stepper = OptimizerStepper(store, pool, [ParamSpec(n, s) for n, s in shapes.items()], compute_dtype=low,
                                   sub_group_elements=2 * SEG, group_hparams=lambda g: (1e-3, 0.01))
        stepper.initialize_states()
        for step in range(1, 4):
            for n, p in master.items():
                p.grad = torch.randn_like(p)
                store.put(("grad", n), p.grad)
            ref_opt.step()
            stepper.step(step)
        for n, p in master.items():
            torch.testing.assert_close(store.get(("master", n)), p.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(store.get(("param", n)), store.get(("master", n)).to(low))
        stepper.close()


def test_bf16_moments_stay_close_to_fp32(tmp_path):
    torch.manual_seed(3)
    w = torch.randn(10_000, requires_grad=True)
    ref_opt = torch.optim.AdamW([w], lr=1e-3, foreach=False)
    with PinnedPool(8 * MiB) as pool, TensorStore(str(tmp_path), pool=pool) as store:
        store.put(("param", "w"), w.detach())
        stepper = OptimizerStepper(store, pool, [ParamSpec("w", (10_000,))], state_dtype=torch.bfloat16,
                                   group_hparams=lambda g: (1e-3, 1e-2))
        stepper.initialize_states()
        assert store.meta(("exp_avg", "w")).dtype == torch.bfloat16
        for step in range(1, 11):
            w.grad = torch.randn_like(w)
            store.put(("grad", "w"), w.grad)
            ref_opt.step()
            stepper.step(step)
        # bf16 moments carry ~3 significant digits: the weights drift by far less than one update.
        assert (store.get(("param", "w")) - w.detach()).abs().max() < 1e-3 * 10 * 0.05
        stepper.close()


def test_planner_formula_matches_the_pool_taken(tmp_path):
    specs = [ParamSpec(n, s) for n, s in SHAPES.items()]
    with PinnedPool(32 * MiB) as pool, TensorStore(str(tmp_path), pool=pool, stripe_size=32 * 1024) as store:
        for cd in (torch.float32, torch.bfloat16):
            predicted = OptimizerStepper.buffer_bytes(specs, SEG, 2 * SEG, cd, torch.float32)
            before = pool.stats()["in_use"]
            stepper = OptimizerStepper(store, pool, specs, compute_dtype=cd, sub_group_elements=2 * SEG)
            assert pool.stats()["in_use"] - before == predicted
            stepper.close()
