"""Optimizer param groups: per-group lr and weight decay equal torch.optim.AdamW's, on the NVMe
and the DRAM (PEFT) paths, under an LR scheduler, through a checkpoint; bad groups refused."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    ACCUMULATING,
    GAS,
    assert_same_training,
    batches,
    engine_config,
    peft_llama,
    reference_run,
    tiny_llama,
    train_steps,
)

import engine
from engine.errors import ConfigError

STEPS = 4


def no_decay(name: str) -> bool:
    """The Hugging Face Trainer's rule, in short: biases and norm weights get no weight decay
    (and, so that the PEFT case has two groups, the LoRA B matrices)."""
    return name.endswith(".bias") or "norm" in name or "lora_B" in name


def groups_of(model: torch.nn.Module, by_name: bool) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pick = (lambda n, p: n) if by_name else (lambda n, p: p)
    return [{"params": [pick(n, p) for n, p in named if not no_decay(n)], "weight_decay": 0.1},
            {"params": [pick(n, p) for n, p in named if no_decay(n)], "weight_decay": 0.0, "lr": 2e-3}]


def schedule(step: int) -> float:
    return 1.0 / (1 + step)  # a different lr every step, for every group


def reference(model: torch.nn.Module, data: list[torch.Tensor]) -> list[float]:
    return reference_run(model, data, STEPS, lr=1e-2, param_groups=groups_of(model, by_name=False),
                         lr_lambda=schedule)


def engine_run(trainer, data: list[torch.Tensor], start: int = 0, sched=None) -> list[float]:
    sched = sched or torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, schedule)
    return train_steps(trainer, data, STEPS, start=start, lr_scheduler=sched)


@pytest.mark.parametrize("make", [tiny_llama, peft_llama], ids=["nvme", "dram-peft"])
@pytest.mark.parametrize("by_name", [True, False], ids=["names", "parameters"])
def test_per_group_lr_and_weight_decay_equal_torch(tmp_path, make, by_name):
    torch.manual_seed(0)
    model = make()
    assert any(no_decay(n) for n, p in model.named_parameters() if p.requires_grad)
    ref_model = copy.deepcopy(model)
    data = batches(STEPS * GAS)
    ref_losses = reference(ref_model, data)
    cfg = engine_config(tmp_path, lr=1e-2, weight_decay=0.1, **ACCUMULATING)
    with engine.initialize(model, cfg, param_groups=groups_of(model, by_name)) as trainer:
        assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
        losses = engine_run(trainer, data)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-2 / 5, 2e-3 / 5])
        assert_same_training([(n, p) for n, p in ref_model.named_parameters() if p.requires_grad], ref_losses,
                             losses, trainer.weight, nonempty=True)


def test_unnamed_parameters_form_a_last_group_with_the_config_values(tmp_path):
    model = tiny_llama()
    norms = [n for n, _ in model.named_parameters() if no_decay(n)]
    with engine.initialize(model, engine_config(tmp_path, lr=3e-3, weight_decay=0.05),
                           param_groups=[{"params": norms, "weight_decay": 0.0}]) as trainer:
        groups = trainer.optimizer.param_groups
        assert [(g["lr"], g["weight_decay"]) for g in groups] == [(3e-3, 0.0), (3e-3, 0.05)]
        assert len(groups[0]["params"]) == len(norms)
        assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_groups_and_their_schedule_resume_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = batches(STEPS * GAS)
    model = tiny_llama()
    ref_model = copy.deepcopy(model)
    cfg = engine_config(tmp_path / "a", lr=1e-2, **ACCUMULATING)
    (tmp_path / "a").mkdir()
    with engine.initialize(ref_model, cfg, param_groups=groups_of(ref_model, True)) as trainer:
        expected = engine_run(trainer, data)
        expected_weights = {n: trainer.weight(n).clone() for n, _ in ref_model.named_parameters()}
    # resume a fresh trainer from a checkpoint taken after two steps
    (tmp_path / "c").mkdir()
    cfg = engine_config(tmp_path / "c", lr=1e-2, **ACCUMULATING)
    with engine.initialize(copy.deepcopy(model), cfg, param_groups=groups_of(model, True)) as trainer:
        sched = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, schedule)
        train_steps(trainer, data, 2, lr_scheduler=sched)
        trainer.save_checkpoint(str(tmp_path / "ckpt"), lr_scheduler=sched)
    (tmp_path / "d").mkdir()
    cfg = engine_config(tmp_path / "d", lr=1e-2, **ACCUMULATING)
    with engine.initialize(copy.deepcopy(model), cfg, param_groups=groups_of(model, True)) as trainer:
        sched = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, schedule)
        trainer.load_checkpoint(str(tmp_path / "ckpt"), lr_scheduler=sched)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1e-2 / 3, 2e-3 / 3])
        resumed = engine_run(trainer, data, start=2, sched=sched)
        assert resumed == expected[2 * GAS:]
        for name, value in expected_weights.items():
            assert torch.equal(trainer.weight(name), value), name


@pytest.mark.parametrize("groups, message", [
    ({"params": []}, "must be a list of dicts"),
    ([{"weight_decay": 0.0}], "must be a dict with a 'params' entry"),
    ([{"params": ["model.norm.weight"], "betas": (0.8, 0.9)}], "may set only lr, weight_decay"),
    ([{"params": ["model.norm.weight"]}, {"params": ["model.norm.weight"]}], "param_groups[0] names too"),
    ([{"params": ["no.such.weight"]}], "not a trainable parameter"),
    ([{"params": [torch.zeros(3)]}], "not one of the model's trainable parameters"),
    ([{"params": ["model.norm.weight"], "lr": -1.0}], "must be a number >= 0"),
])
def test_bad_groups_are_refused_before_anything_is_built(tmp_path, groups, message):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.initialize(model, engine_config(tmp_path, lr=1e-3), param_groups=groups)
    for n, p in model.named_parameters():  # the model keeps its weights
        assert torch.equal(p.detach(), before[n]), n


def test_a_checkpoint_refuses_groups_with_other_members(tmp_path):
    # The same two groups in the other order would swap their weight decay: refused, as torch's
    # load_state_dict refuses groups of other sizes; another group count is refused too.
    model = tiny_llama()
    norms = [n for n, _ in model.named_parameters() if no_decay(n)]
    others = [n for n, _ in model.named_parameters() if not no_decay(n)]
    (tmp_path / "a").mkdir()
    with engine.initialize(copy.deepcopy(model), engine_config(tmp_path / "a", lr=1e-3),
                           param_groups=[{"params": norms, "weight_decay": 0.0}, {"params": others}]) as trainer:
        trainer.save_checkpoint(str(tmp_path / "ckpt"))
    for i, groups in enumerate(([{"params": others}, {"params": norms, "weight_decay": 0.0}], None)):
        (tmp_path / f"b{i}").mkdir()
        with engine.initialize(copy.deepcopy(model), engine_config(tmp_path / f"b{i}", lr=1e-3),
                               param_groups=groups) as trainer:
            with pytest.raises(engine.errors.CheckpointError, match="param group"):
                trainer.load_checkpoint(str(tmp_path / "ckpt"))
