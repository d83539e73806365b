"""``engine.deepspeed_compat``: a DeepSpeed script with only its import changed, against the native API."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
from helpers import REPO, run_python
from safetensors.torch import load_file

import engine
import engine.deepspeed_compat as deepspeed
from engine.deepspeed_compat import lr_schedules
from engine.errors import CheckpointError, ConfigError

SCRIPT = os.path.join(REPO, "examples", "deepspeed_script.py")
LR = 1e-3


def _script_module():
    """The example's model and dataset builders (what both sides of the comparison train)."""
    spec = importlib.util.spec_from_file_location("deepspeed_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ds_config(tmp_path, **overrides) -> dict:
    """examples/ds_config.json swapping to ``tmp_path/nvme``."""
    with open(os.path.join(REPO, "examples", "ds_config.json")) as f:
        cfg = json.load(f)
    nvme = tmp_path / "nvme"
    nvme.mkdir(exist_ok=True)
    for section in ("offload_param", "offload_optimizer"):
        cfg["zero_optimization"][section]["nvme_path"] = str(nvme)
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------------- DeepSpeed's formulas, written out
def warmup_fraction(t: int, steps: int, kind: str) -> float:
    w = max(2, steps)
    return math.log(t + 1) / math.log(w) if kind == "log" else t / w


def expected_lr(kind: str, p: dict, t: int, base: float) -> float:
    """DeepSpeed's documented schedules at ``last_batch_iteration`` t (deepspeed/runtime/lr_schedules.py)."""
    w = max(2, p["warmup_num_steps"])
    if kind == "WarmupCosineLR":
        if t < 0:
            return 0.0
        if t < w:
            ratio = warmup_fraction(t, w, p["warmup_type"])
            return base * (p["warmup_min_ratio"] + ratio * (1 - p["warmup_min_ratio"]))
        progress = min(1.0, (t - w + 1) / max(1, p["total_num_steps"] - w))
        return base * max(0.0, p["cos_min_ratio"] + (1 - p["cos_min_ratio"]) * (1 + math.cos(math.pi * progress)) / 2)
    low, high = p["warmup_min_lr"], p.get("warmup_max_lr", base)
    if t < 0:
        return low
    if t < w:
        gamma = warmup_fraction(t, w, p["warmup_type"])
    elif kind == "WarmupLR":
        gamma = 1.0
    else:
        gamma = max(0.0, (p["total_num_steps"] - t) / max(1, p["total_num_steps"] - w))
    return low + (high - low) * gamma


SCHEDULES = [
    ("WarmupLR", dict(warmup_min_lr=1e-5, warmup_max_lr=2e-3, warmup_num_steps=5, warmup_type="log")),
    ("WarmupLR", dict(warmup_min_lr=0.0, warmup_num_steps=1, warmup_type="linear")),  # max: the optimizer's lr
    ("WarmupDecayLR", dict(warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=4, total_num_steps=10,
                           warmup_type="linear")),
    ("WarmupDecayLR", dict(warmup_min_lr=1e-4, warmup_max_lr=1e-3, warmup_num_steps=3, total_num_steps=9,
                           warmup_type="log")),
    ("WarmupCosineLR", dict(warmup_min_ratio=0.1, warmup_num_steps=4, total_num_steps=12, cos_min_ratio=0.01,
                            warmup_type="linear")),
    ("WarmupCosineLR", dict(warmup_min_ratio=0.0, warmup_num_steps=3, total_num_steps=8, cos_min_ratio=0.0001,
                            warmup_type="log")),
]


@pytest.mark.parametrize("kind,params", SCHEDULES)
def test_lr_schedules_follow_deepspeeds_formulas(kind, params):
    """Two param groups with their own lr; 14 steps, past the end of every schedule."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.01}, {"params": [b], "lr": 0.002}], lr=0.01)
    bases = [0.01, 0.002]
    sched = lr_schedules.from_config(opt, {"type": kind, "params": params})
    got, want = [], []
    for t in range(-1, 14):  # construction sets t = -1, then one step each
        got.append([g["lr"] for g in opt.param_groups])
        # WarmupLR's default warmup_max_lr is each group's own lr (DeepSpeed PR #8171)
        want.append([expected_lr(kind, params, t, base) for base in bases])
        opt.step()
        sched.step()
    for g, w in zip(got, want):
        for x, y in zip(g, w):
            assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-15), (kind, got, want)
    assert json.loads(json.dumps(sched.state_dict())) == sched.state_dict()  # JSON: goes into checkpoints


def _decay(total: int):
    a = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([a], lr=0.01)
    params = dict(warmup_min_lr=0.0, warmup_max_lr=0.01, warmup_num_steps=2, total_num_steps=total,
                  warmup_type="linear")
    return opt, lr_schedules.from_config(opt, {"type": "WarmupDecayLR", "params": params}), params


def test_a_resumed_schedule_keeps_its_counter_and_takes_the_new_configs_settings():
    """DeepSpeed's state_dict is the counter only: resumed with total 100, the schedule decays to 100."""
    opt, sched, _ = _decay(10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.state_dict() == {"last_batch_iteration": 4}
    opt2, resumed, params = _decay(100)
    resumed.load_state_dict(json.loads(json.dumps(sched.state_dict())))  # through JSON, as in a checkpoint
    assert resumed.total_num_steps == 100 and resumed.last_batch_iteration == 4
    opt2.step()
    resumed.step()
    assert resumed.last_batch_iteration == 5
    assert opt2.param_groups[0]["lr"] == expected_lr("WarmupDecayLR", params, 5, 0.01) == 0.01 * 95 / 98
    assert resumed.get_last_lr() == [0.01 * 95 / 98]
    with pytest.raises(CheckpointError, match="last_batch_iteration"):
        resumed.load_state_dict({"last_epoch": 3})


def test_step_takes_deepspeeds_last_batch_iteration():
    opt, sched, params = _decay(10)
    for t in (7, 3, -1):
        opt.step()
        sched.step(last_batch_iteration=t)
        assert sched.last_batch_iteration == t
        assert opt.param_groups[0]["lr"] == expected_lr("WarmupDecayLR", params, t, 0.01)
    opt.step()
    sched.step()  # and counts on from there
    assert sched.last_batch_iteration == 0 and opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(ConfigError, match="last_batch_iteration must be an int >= -1"):
        sched.step(last_batch_iteration=-2)


def test_unsupported_schedule_is_a_config_error():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="OneCycle"):
        lr_schedules.from_config(opt, {"type": "OneCycle", "params": {}})
    with pytest.raises(ConfigError, match="total_num_steps"):
        lr_schedules.from_config(opt, {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2}})
    step = lr_schedules.from_config(opt, {"type": "StepLR", "params": {"step_size": 1, "gamma": 0.5}})
    assert isinstance(step, torch.optim.lr_scheduler.StepLR)  # a torch scheduler by name, as DeepSpeed allows


# ---------------------------------------------------------------------- the script vs the native API
def native_run(tmp_path, script, steps: int) -> tuple[list[float], list[float]]:
    """engine.initialize + Trainer backward/step, the data in DistributedSampler's order (seed 0),
    WarmupDecayLR (linear, 3 warmup of 8, min 0, max = the optimizer's lr) as a torch LambdaLR."""
    nvme = tmp_path / "native"
    nvme.mkdir()
    config = engine.Config(nvme_path=str(nvme), gradient_accumulation_steps=2, gradient_clipping=1.0,
                           resident_threshold_bytes=1024 * 4,
                           optimizer=engine.AdamWConfig(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1))
    dataset = script.TokenDataset()
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()

    def gamma(epoch: int) -> float:
        t = epoch - 1  # torch's LambdaLR counts its own first step; DeepSpeed's schedule starts at -1
        if t < 0:
            return 0.0
        return t / 3 if t < 3 else max(0.0, (8 - t) / max(1, 8 - 3))

    losses, lrs = [], []
    with engine.initialize(script.make_model(), config) as trainer:
        sched = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, gamma)
        for i in range(steps):
            rows = order[2 * i:2 * i + 2]
            x = torch.stack([dataset[r]["input_ids"] for r in rows])
            loss = trainer(input_ids=x, labels=x).loss
            trainer.backward(loss)
            before = trainer.global_steps
            trainer.step()
            if trainer.global_steps != before:
                sched.step()
            losses.append(loss.item())
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
    return losses, lrs


def test_deepspeed_script_with_only_its_import_changed_matches_the_native_api(tmp_path):
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps(ds_config(tmp_path)))
    ckpt = tmp_path / "ckpt"
    proc = run_python(SCRIPT, "--deepspeed_config", str(config), "--steps", "8", "--save_dir", str(ckpt), timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    losses, lrs = native_run(tmp_path, _script_module(), 8)
    assert out["losses"] == losses  # bit for bit: the same engine, data order and schedule
    assert out["lrs"] == lrs and lrs[:4] == [0.0, 0.0, 0.0, LR / 3]  # first steps at DeepSpeed's t=-1, 0 lrs
    assert out["global_steps"] == 4
    assert sorted(os.listdir(ckpt)) == ["global_step4", "latest"]
    assert os.listdir(tmp_path / "nvme") == []  # the script's swap files were removed at exit


# ---------------------------------------------------------------------- checkpoints
COSINE = {"type": "WarmupCosineLR", "params": {"warmup_min_ratio": 0.1, "warmup_num_steps": 2, "total_num_steps": 6,
                                               "cos_min_ratio": 0.01, "warmup_type": "linear"}}


def train(model_engine, data, first: int, count: int) -> list[float]:
    losses = []
    for x in data[first:first + count]:
        loss = model_engine(input_ids=x, labels=x).loss
        model_engine.backward(loss)
        model_engine.step()
        losses.append(loss.item())
    return losses


def test_checkpoint_resume_equals_uninterrupted_training(tmp_path):
    script = _script_module()
    data = [script.TokenDataset(n=2, seed=10 + i).tokens for i in range(12)]
    cfg = ds_config(tmp_path, scheduler=COSINE)
    ckpt = str(tmp_path / "ckpt")

    model_engine, optimizer, loader, sched = deepspeed.initialize(model=script.make_model(), config=cfg)
    with model_engine:
        assert loader is None and optimizer is model_engine.optimizer and sched.optimizer is optimizer
        assert model_engine.load_checkpoint(str(tmp_path / "nothing-here")) == (None, None)  # DeepSpeed's answer
        first = train(model_engine, data, 0, 6)
        assert model_engine.save_checkpoint(ckpt, client_state={"epoch": 1, "seen": 6})
        rest = train(model_engine, data, 6, 6)
        lrs = model_engine.get_lr()
        assert model_engine.global_steps == 6 and model_engine.micro_steps == 12

    model_engine, _, _, sched = deepspeed.initialize(model=script.make_model(), config=cfg)
    with model_engine:
        path, client_state = model_engine.load_checkpoint(ckpt)
        assert path.endswith("global_step3") and client_state == {"epoch": 1, "seen": 6}
        assert model_engine.global_steps == 3 and sched.last_batch_iteration == 2
        assert train(model_engine, data, 6, 6) == rest  # bit for bit
        assert model_engine.get_lr() == lrs
    assert len(first) == 6


def test_save_16bit_model_writes_safetensors(tmp_path):
    from transformers import LlamaForCausalLM

    script = _script_module()
    model_engine, _, _, _ = deepspeed.initialize(model=script.make_model(), config=ds_config(tmp_path))
    with model_engine:
        train(model_engine, [script.TokenDataset(n=2).tokens] * 2, 0, 2)
        assert model_engine.save_16bit_model(str(tmp_path / "hf"))
        assert model_engine.save_16bit_model(str(tmp_path / "one"), "weights.bin")
        names = [n for n, _ in model_engine.module.named_parameters()]
        values = {n: model_engine.trainer.weight(n).clone() for n in names}
    assert "model.safetensors" in os.listdir(tmp_path / "hf")
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    one = load_file(str(tmp_path / "one" / "weights.safetensors"))
    assert sorted(os.listdir(tmp_path / "one")) == ["weights.safetensors"]
    for n in names:
        assert torch.equal(loaded.get_parameter(n).detach(), values[n].view(loaded.get_parameter(n).shape)), n
        assert torch.equal(one[n], loaded.get_parameter(n).detach()), n


# ---------------------------------------------------------------------- what is refused, and how
def test_a_client_optimizer_is_refused_with_its_hyperparameters(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    with pytest.raises(ConfigError, match=r"client optimizer is not supported.*lr=0.0003.*weight_decay=0.05"):
        deepspeed.initialize(model=model, optimizer=opt, config=ds_config(tmp_path))
    with pytest.raises(ConfigError, match="client optimizer"):
        deepspeed.initialize(model=model, optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                             config=ds_config(tmp_path))


def test_config_errors(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="cannot read DeepSpeed config file"):
        deepspeed.initialize(model=model, config=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="needs a config"):
        deepspeed.initialize(model=model)
    with pytest.raises(ConfigError, match=r"'auto'.*optimizer.params.lr"):
        cfg = ds_config(tmp_path)
        cfg["optimizer"]["params"]["lr"] = "auto"
        deepspeed.initialize(model=model, config=cfg)
    with pytest.raises(ConfigError, match="train_batch_size 6 != train_micro_batch_size_per_gpu 2"):
        deepspeed.initialize(model=model, config=ds_config(tmp_path, train_batch_size=6))
    args = type("Args", (), {"deepspeed_config": str(tmp_path / "a.json")})()
    with pytest.raises(ConfigError, match="both"):
        deepspeed.initialize(args=args, model=model, config=ds_config(tmp_path))
    with pytest.raises(ConfigError, match="no 'optimizer' section"):
        deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1})


def test_model_parameters_freeze_the_others_and_the_loader_batches(tmp_path):
    script = _script_module()
    model = script.make_model()
    head = model.lm_head.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # train_batch_size with the micro batch: accumulation 8 // 2 = 4, as DeepSpeed derives it
    cfg = ds_config(tmp_path, train_batch_size=8)
    del cfg["gradient_accumulation_steps"], cfg["scheduler"]  # no schedule: DeepSpeed's first step runs at lr 0
    model_engine, _, loader, _ = deepspeed.initialize(model=model, model_parameters=[head],
                                                      training_data=script.TokenDataset(n=8), config=cfg)
    with model_engine:
        assert model_engine.gradient_accumulation_steps() == 4 and model_engine.train_batch_size() == 8
        batches = list(loader)
        assert len(batches) == 4 and batches[0]["input_ids"].shape == (2, 16)
        for batch in batches:
            assert model_engine.is_gradient_accumulation_boundary() == (batch is batches[-1])
            model_engine.backward(model_engine(**batch).loss)
            model_engine.step()
        assert model_engine.global_steps == 1 and model_engine.get_global_grad_norm() > 0
        after = {n: model_engine.trainer.weight(n) for n in before}
    assert [n for n in before if not torch.equal(after[n].view(before[n].shape), before[n])] == ["lm_head.weight"]
    with pytest.raises(ConfigError, match="not parameters of the model"):
        deepspeed.initialize(model=script.make_model(), model_parameters=[torch.nn.Parameter(torch.zeros(1))],
                             config=ds_config(tmp_path))


def test_partial_checkpoint_loads_are_refused(tmp_path):
    script = _script_module()
    model_engine, _, _, _ = deepspeed.initialize(model=script.make_model(), config=ds_config(tmp_path))
    with model_engine:
        with pytest.raises(CheckpointError, match="load_optimizer_states=False"):
            model_engine.load_checkpoint(str(tmp_path), load_optimizer_states=False)
        with pytest.raises(CheckpointError, match="save_latest=False"):
            model_engine.save_checkpoint(str(tmp_path / "c"), save_latest=False)


def test_a_skipped_step_counts_but_does_not_step_the_scheduler(tmp_path):
    """DeepSpeed: a boundary whose gradient is not finite skips the update and the scheduler,
    and still counts in global_steps."""
    script = _script_module()
    model_engine, _, _, sched = deepspeed.initialize(model=script.make_model(), config=ds_config(tmp_path))
    x = script.TokenDataset(n=2).tokens
    with model_engine:
        for _ in range(2):
            model_engine.backward(model_engine(input_ids=x, labels=x).loss * float("inf"))
            model_engine.step()
        assert (model_engine.global_steps, model_engine.skipped_steps) == (1, 1)
        assert sched.last_batch_iteration == -1
        train(model_engine, [x, x], 0, 2)
        assert (model_engine.global_steps, model_engine.skipped_steps) == (2, 1)
        assert sched.last_batch_iteration == 0
    with pytest.raises(ConfigError, match="training_data must be a torch Dataset"):
        deepspeed.initialize(model=script.make_model(), config=ds_config(tmp_path), training_data=object())


def test_a_callable_lr_scheduler_gets_the_engine_optimizer(tmp_path):
    script = _script_module()
    cfg = ds_config(tmp_path)
    del cfg["scheduler"]
    made = []

    def make(opt):
        made.append(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
        return made[-1]

    model_engine, optimizer, _, sched = deepspeed.initialize(model=script.make_model(), config=cfg, lr_scheduler=make)
    x = script.TokenDataset(n=2).tokens
    with model_engine:
        assert sched is made[0] and sched.optimizer is optimizer and model_engine.lr_scheduler is sched
        train(model_engine, [x] * 4, 0, 4)
        assert model_engine.get_lr() == [LR * 0.25]  # halved at each of the two boundaries


def test_lr_kwargs_reach_the_schedule_and_a_bad_one_changes_nothing(tmp_path):
    script = _script_module()
    cfg = ds_config(tmp_path, gradient_accumulation_steps=1, train_batch_size=2)
    model_engine, _, _, sched = deepspeed.initialize(model=script.make_model(), config=cfg)
    x = script.TokenDataset(n=2).tokens
    with model_engine:
        names = [n for n, _ in model_engine.module.named_parameters()]
        train(model_engine, [x, x], 0, 2)  # t = 1: a non-zero lr for the step below
        before = {n: model_engine.trainer.weight(n).clone() for n in names}
        state = (model_engine.global_steps, model_engine.micro_steps, sched.last_batch_iteration, model_engine.get_lr())
        model_engine.backward(model_engine(input_ids=x, labels=x).loss)
        for bad, match in (({"epoch_typo": 1}, "does not take them"), ({"last_batch_iteration": 1.5}, "an int >= -1"),
                           ([("last_batch_iteration", 1)], "must be a dict")):
            with pytest.raises(ConfigError, match=match):
                model_engine.step(lr_kwargs=bad)
            assert (model_engine.global_steps, model_engine.micro_steps, sched.last_batch_iteration,
                    model_engine.get_lr()) == state
            assert all(torch.equal(model_engine.trainer.weight(n), before[n]) for n in names)
        model_engine.step(lr_kwargs={"last_batch_iteration": 5})  # the window's gradient is still there
        assert model_engine.global_steps == 3 and sched.last_batch_iteration == 5
        params = cfg["scheduler"]["params"]
        assert model_engine.get_lr() == [expected_lr(cfg["scheduler"]["type"], params, 5, LR)]
        assert not all(torch.equal(model_engine.trainer.weight(n), before[n]) for n in names)


def test_a_failed_initialize_leaves_requires_grad_as_it_was(tmp_path):
    """model_parameters freezes the others; an error after the trainer is built (here the
    scheduler section's typo) gives the model back trainable as it came."""
    script = _script_module()
    model = script.make_model()
    model.model.norm.weight.requires_grad_(False)  # frozen by the caller: stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = ds_config(tmp_path, scheduler={"type": "WarmupLR", "params": {"warmup_num_step": 10}})
    layer = [p for n, p in model.named_parameters() if ".layers.0." in n]
    with pytest.raises(ConfigError, match="warmup_num_step"):
        deepspeed.initialize(model=model, model_parameters=layer, config=cfg)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not flags["model.norm.weight"]


def test_the_loader_has_deepspeeds_data_sampler(tmp_path):
    script = _script_module()
    cfg = ds_config(tmp_path)
    model_engine, _, loader, _ = deepspeed.initialize(model=script.make_model(), config=cfg,
                                                      training_data=script.TokenDataset(n=8))
    with model_engine:
        assert isinstance(loader.data_sampler, torch.utils.data.DistributedSampler)
        assert loader.data_sampler is loader.sampler
        first = [b["input_ids"] for b in loader]
        assert [torch.equal(a, b) for a, b in zip(first, (b["input_ids"] for b in loader))] == [True] * 4
        loader.data_sampler.set_epoch(1)  # what scripts call: a new order
        second = [b["input_ids"] for b in loader]
        assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_save_16bit_model_with_a_filename_is_private_and_replaces_with_a_warning(tmp_path, caplog):
    script = _script_module()
    model_engine, _, _, _ = deepspeed.initialize(model=script.make_model(), config=ds_config(tmp_path))
    out = tmp_path / "new" / "out"  # two missing directories
    with model_engine:
        assert model_engine.save_16bit_model(str(out), "weights.pt")
        first = load_file(str(out / "weights.safetensors"))
        train(model_engine, [script.TokenDataset(n=2).tokens] * 6, 0, 6)  # 3 steps: the third at lr > 0
        with caplog.at_level("WARNING", logger="engine"):
            assert model_engine.save_16bit_model(str(out), "weights.pt")
        second = load_file(str(out / "weights.safetensors"))
        with pytest.raises(CheckpointError, match="plain name"):
            model_engine.save_16bit_model(str(out), ".hidden.bin")
    assert "save_16bit_model: replacing" in caplog.text and "weights.safetensors" in caplog.text
    assert sorted(os.listdir(out)) == ["weights.safetensors"]  # no staging left behind
    assert any(not torch.equal(first[n], second[n]) for n in first)
    for path, mode in ((tmp_path / "new", 0o700), (out, 0o700), (out / "weights.safetensors", 0o600)):
        assert os.stat(path).st_mode & 0o777 == mode, path


def _groups(model: torch.nn.Module, by_name: bool) -> list[dict]:
    """Weight decay for matrices, none (and another lr) for norm weights, as scripts commonly group."""
    pick = (lambda n, p: n) if by_name else (lambda n, p: p)
    named = list(model.named_parameters())
    return [{"params": [pick(n, p) for n, p in named if "norm" not in n], "weight_decay": 0.1},
            {"params": [pick(n, p) for n, p in named if "norm" in n], "weight_decay": 0.0, "lr": 2 * LR}]


def _steps(step_engine, data, *, prescaled: bool = False) -> list[float]:
    losses = []
    for x in data:
        loss = step_engine(input_ids=x, labels=x).loss
        if prescaled:  # the caller divides by the accumulation itself
            step_engine.backward(loss / 2, scale_wrt_gas=False)
        else:
            step_engine.backward(loss)
        step_engine.step()
        losses.append(loss.item())
    return losses


def test_param_groups_with_options_and_prescaled_losses_match_the_native_api(tmp_path):
    """model_parameters as param groups with their own lr / weight_decay become the engine's
    groups (as DeepSpeed's optimizer takes them); backward(scale_wrt_gas=False) of a loss the
    script divided itself is the same step."""
    script = _script_module()
    g = torch.Generator().manual_seed(4)
    data = [torch.randint(0, 256, (2, 16), generator=g) for _ in range(6)]
    cfg = ds_config(tmp_path)
    del cfg["scheduler"]
    cfg["optimizer"]["params"]["lr"] = LR
    model = script.make_model()
    model_engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=_groups(model, False),
                                                         config=cfg)
    with model_engine:
        assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(LR, 0.1), (2 * LR, 0.0)]
        compat = _steps(model_engine, data, prescaled=True)
        compat_weights = {n: model_engine.trainer.weight(n).clone() for n, _ in model.named_parameters()}
    (tmp_path / "native").mkdir()
    native_cfg = engine.Config(nvme_path=str(tmp_path / "native"), gradient_accumulation_steps=2,
                               gradient_clipping=1.0, resident_threshold_bytes=1024,
                               optimizer=engine.AdamWConfig(lr=LR, weight_decay=0.1))
    model = script.make_model()
    with engine.initialize(model, native_cfg, param_groups=_groups(model, True)) as trainer:
        assert _steps(trainer, data) == compat
        for name, value in compat_weights.items():
            assert torch.equal(trainer.weight(name), value), name
