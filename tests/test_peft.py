"""PEFT: LoRA (built in and Hugging Face peft) over a frozen base streamed read-only from NVMe."""
from __future__ import annotations

import copy
import json
import os
import weakref

import helpers
import pytest
import torch
from helpers import ACCUMULATING, batches, engine_config, tiny_llama, tiny_llama_config, train_steps, trainable
from transformers import LlamaConfig, LlamaForCausalLM

import engine
from engine.peft import LoraConfig, LoraLinear, apply_lora

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def tiny_config(tied: bool = False) -> LlamaConfig:
    return tiny_llama_config(tied=tied)


def perturb_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """B starts at zero (a no-op adapter); give it values so step 1 already exercises both paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def lora_llama(tied: bool = False, dropout: float = 0.0, **kw) -> LlamaForCausalLM:
    model = apply_lora(tiny_llama(tied), LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS, **kw))
    perturb_adapters(model)
    return model


def peft_llama() -> torch.nn.Module:
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=TARGETS))
    perturb_adapters(model)
    return model


def config(tmp_path, **overrides) -> engine.Config:
    return engine_config(tmp_path, lr=1e-2, **{**ACCUMULATING, **overrides})


def reference_run(model, data, steps, lr=1e-2, wd=0.1, clip=1.0, seed=7, ieee_sqrt=False):
    """Plain PyTorch in memory: torch.optim.AdamW over the adapters (``ieee_sqrt``: its square
    root correctly rounded, see :func:`helpers.correctly_rounded_sqrt`; the model's forward is untouched)."""
    return helpers.reference_run(model, data, steps, lr=lr, wd=wd, clip=clip, seed=seed, ieee_sqrt=ieee_sqrt,
                                 params=[p for _, p in trainable(model)])


def train(trainer, data, steps, seed=7):
    return train_steps(trainer, data, steps, seed=seed)


def assert_same_training(ref_model, ref_losses, losses, trainer, rtol=1e-5):
    """Losses and every adapter tensor within ``rtol`` (relative; L2 norm for tensors). Not
    bit-exact: torch's AdamW takes its square root from MKL, the fused kernel's is IEEE (see
    helpers.assert_same_training)."""
    helpers.assert_same_training(trainable(ref_model), ref_losses, losses, trainer.parameter, rtol, nonempty=True)


def assert_bit_identical(ref_model, ref_losses, losses, trainer):
    """Losses and every adapter tensor equal bit for bit (the reference must share the fused
    kernel's arithmetic: ``reference_run(..., ieee_sqrt=True)``)."""
    assert losses == ref_losses
    names = trainable(ref_model)
    assert names
    for name, p in names:
        got = trainer.parameter(name).view(p.shape)
        assert torch.equal(got, p.detach()), (name, ((got - p.detach()).norm() / p.detach().norm()).item())


def frozen_streamed_keys(trainer) -> list:
    return [sp.key for sp in trainer.runtime.streamer.params.streamed.values() if not sp.param.requires_grad]


# ---------------------------------------------------------------------------------------- training parity
@pytest.mark.parametrize("placement", ["memory", "nvme"])
def test_builtin_lora_fp32_matches_torch_in_memory(tmp_path, placement):
    """10 steps (2 micro-batches each, clipping, dropout): losses and adapters equal plain torch."""
    ref = lora_llama(dropout=0.1)
    model = copy.deepcopy(ref)
    data = batches(2 * 10)
    ref_losses = reference_run(ref, data, 10)
    cfg = config(tmp_path, trainable_placement=placement)
    with engine.initialize(model, cfg) as trainer:
        assert trainer.plan.trainable_in_memory == (placement == "memory")
        assert frozen_streamed_keys(trainer)  # the base is on NVMe
        losses = train(trainer, data, 10)
        assert_same_training(ref, ref_losses, losses, trainer)
        assert trainer.global_steps == 10
    assert os.listdir(tmp_path) == []


def test_model_small_enough_to_stay_resident_trains_with_adapters_in_memory(tmp_path):
    """Nothing above the resident threshold and adapters in DRAM: the plan needs no staging at
    all, and the trainer still builds (a minimal pool) and trains like torch."""
    ref = lora_llama()
    model = copy.deepcopy(ref)
    data = batches(2 * 3)
    ref_losses = reference_run(ref, data, 3)
    with engine.initialize(model, config(tmp_path, resident_threshold_bytes=1 << 20)) as trainer:
        assert trainer.plan.trainable_in_memory and not trainer.runtime.streamer.params.streamed
        assert trainer.memory_report()["pool"]["capacity"] == trainer.plan.pool_bytes
        assert_same_training(ref, ref_losses, train(trainer, data, 3), trainer)


def test_planner_keeps_small_adapters_in_memory_and_sizes_for_a_read_only_base(tmp_path):
    model = lora_llama()
    plan = engine.plan(model, config(tmp_path))
    assert plan.trainable_in_memory
    assert plan.grad_staging_bytes == 0 and plan.optimizer_bytes == 0
    n_train = sum(p.numel() for _, p in trainable(model))
    assert plan.trainable_state_bytes == n_train * (4 + 4 + 4)  # fp32 gradient and two moments
    frozen = [p for p in model.parameters() if not p.requires_grad and p.numel() * 4 > 4096]
    assert plan.disk_bytes == sum(-(-p.numel() * 4 // 4096) * 4096 for p in frozen)  # one read-only copy each
    # a bf16 base: half the disk, and the staging slots sized for bf16
    bf16 = engine.plan(model, config(tmp_path, frozen_dtype="bf16"))
    frozen16 = [p for p in frozen if p.numel() * 2 > 4096]  # the resident threshold applies to bf16 sizes
    assert len(frozen16) < len(frozen)
    assert bf16.disk_bytes == sum(-(-p.numel() * 2 // 4096) * 4096 for p in frozen16)
    assert bf16.staging_bytes < plan.staging_bytes
    # full fine-tuning keeps its state on NVMe; "nvme" forces it for adapters too
    assert not engine.plan(tiny_llama(), config(tmp_path)).trainable_in_memory
    forced = engine.plan(model, config(tmp_path, trainable_placement="nvme"))
    assert not forced.trainable_in_memory and forced.grad_staging_bytes > 0 and forced.optimizer_bytes > 0
    with engine.initialize(model, config(tmp_path)) as trainer:
        assert trainer.memory_report()["pool"]["capacity"] == plan.pool_bytes


def test_meta_device_base_with_builtin_lora(tmp_path):
    """apply_lora on a meta model: adapters are real at once, the base goes tensor by tensor to NVMe."""
    ref = lora_llama()
    values = {n: p.detach().clone() for n, p in ref.named_parameters()}
    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_config())
    apply_lora(meta, LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    lora = {n: p for n, p in meta.named_parameters() if p.requires_grad}
    assert lora and all(p.device.type == "cpu" for p in lora.values())
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(values[n])
    asked = []

    def init(name, shape):
        asked.append(name)
        return values[name].view(shape) if name in values else None

    data = batches(8)
    ref_losses = reference_run(ref, data, 4)
    with engine.initialize(meta, config(tmp_path), initializer=init) as trainer:
        assert not any("lora_" in n for n in asked)  # only the base came from the initializer
        losses = train(trainer, data, 4)
        assert_same_training(ref, ref_losses, losses, trainer)


def test_bf16_base_with_fp32_adapters_matches_torch(tmp_path):
    """frozen_dtype='bf16': the base is stored and streamed in bf16, the adapters train in fp32
    (peft's layout for a bf16 base). The same trajectory, bit for bit, as the same bf16/fp32 model
    in memory under torch.optim.AdamW with its sqrt correctly rounded (see correctly_rounded_sqrt:
    against MKL's sqrt a bf16 base amplifies 1-ulp update differences past any fixed rtol)."""
    ref = lora_llama()
    for p in ref.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    model = copy.deepcopy(ref)
    data = batches(8)
    ref_losses = reference_run(ref, data, 4, ieee_sqrt=True)
    with engine.initialize(model, config(tmp_path, frozen_dtype="bf16")) as trainer:
        for key in frozen_streamed_keys(trainer):
            assert trainer.runtime.store.meta(key).dtype == torch.bfloat16
        for name, p in trainable(model):
            assert p.dtype == torch.float32 and trainer.parameter(name).dtype == torch.float32
        losses = train(trainer, data, 4)
        assert_bit_identical(ref, ref_losses, losses, trainer)
        out = tmp_path.parent / f"{tmp_path.name}-merged"
        trainer.merge_and_export(str(out))
        layer = model.model.layers[1].mlp.down_proj
        a = trainer.parameter("model.layers.1.mlp.down_proj.lora_A.weight")
        b = trainer.parameter("model.layers.1.mlp.down_proj.lora_B.weight")
        base = trainer.weight("model.layers.1.mlp.down_proj.base_layer.weight")
    from safetensors.torch import load_file

    exported = load_file(str(out / "model.safetensors"))
    assert exported["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16  # the base's dtype
    assert torch.equal(exported["model.layers.1.mlp.down_proj.weight"],
                       (base.float() + (b @ a) * layer.scaling).to(torch.bfloat16))  # merged in fp32, rounded once
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_peft_wrapped_bf16_base_matches_peft_in_memory(tmp_path):
    """A peft model over a bf16 base (peft keeps the adapters in fp32) trains as in memory, bit for
    bit (torch.optim.AdamW with its sqrt correctly rounded, see correctly_rounded_sqrt)."""
    def build():
        base = tiny_llama().to(torch.bfloat16)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        perturb_adapters(model)
        return model

    ref, model = build(), build()
    assert all(p.dtype == torch.float32 for _, p in trainable(ref))
    data = batches(8)
    ref_losses = reference_run(ref, data, 4, ieee_sqrt=True)
    with engine.initialize(model, config(tmp_path, frozen_dtype="bf16")) as trainer:
        assert all(trainer.runtime.store.meta(k).dtype == torch.bfloat16 for k in frozen_streamed_keys(trainer))
        losses = train(trainer, data, 4)
        assert_bit_identical(ref, ref_losses, losses, trainer)


def test_bf16_compute_keeps_fp32_masters_for_adapters(tmp_path):
    """dtype='bf16': adapters compute in bf16 with fp32 master weights in memory; loss falls."""
    model = lora_llama()
    x = batches(1)[0]
    cfg = config(tmp_path, dtype="bf16", gradient_accumulation_steps=1,
                 optimizer=engine.AdamWConfig(lr=1e-2, weight_decay=0.0))
    with engine.initialize(model, cfg) as trainer:
        losses = []
        for _ in range(12):
            out = trainer(input_ids=x, labels=x)
            trainer.backward(out.loss)
            trainer.step()
            losses.append(out.loss.item())
        assert losses[-1] < 0.9 * losses[0], losses
        for name, p in trainable(model):
            master = trainer.parameter(name)
            assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
            assert torch.equal(p.detach(), master.to(torch.bfloat16))  # the step writes both in one pass


# ---------------------------------------------------------------------------------------- read-only base
@pytest.mark.parametrize("placement", ["memory", "nvme"])
def test_base_weights_are_never_written_and_have_no_state(tmp_path, placement, monkeypatch):
    model = lora_llama()
    data = batches(6)
    with engine.initialize(model, config(tmp_path, trainable_placement=placement)) as trainer:
        store = trainer.runtime.store
        base = frozen_streamed_keys(trainer)
        assert len(base) >= 2 * len(TARGETS)
        before = {k: store.get(k).clone() for k in base}
        written = []
        real_write = store.write_from

        def spy(key, *args, **kwargs):
            written.append(key)
            return real_write(key, *args, **kwargs)

        monkeypatch.setattr(store, "write_from", spy)
        bytes_written = store.stats()["bytes_written"]
        train(trainer, data, 3)
        assert not set(written) & set(base)
        if placement == "memory":
            assert written == [] and store.stats()["bytes_written"] == bytes_written
        else:
            assert written and all(k[1] in dict(trainable(model)) for k in written)
        for k in base:
            assert torch.equal(store.get(k), before[k]), k  # bit-identical
        frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
        for kind, name in store.keys():
            assert kind == "param" or name not in frozen_names, (kind, name)  # no grad/master/moment extents
        expected = {("param", k[1]) for k in base}
        if placement == "memory":
            assert set(store.keys()) == expected  # nothing but the read-only base
        assert trainer.runtime.streamer.stats()["reads"] > 0


# ---------------------------------------------------------------------------------------- Hugging Face peft
def test_builtin_lora_computes_what_peft_computes():
    ours = lora_llama(use_rslora=True)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               use_rslora=True))
    mapping = {n.replace(".default", "").removeprefix("base_model.model."): p for n, p in theirs.named_parameters()}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            mapping[name].copy_(p)
    assert {n for n, _ in trainable(ours)} == {n.replace(".default", "").removeprefix("base_model.model.")
                                                for n, _ in trainable(theirs)}
    x = batches(1)[0]
    assert torch.equal(ours(input_ids=x).logits, theirs(input_ids=x).logits)


def test_peft_wrapped_model_trains_like_in_memory_and_its_adapter_loads(tmp_path):
    ref = peft_llama()
    model = copy.deepcopy(ref)
    data = batches(8)
    ref_losses = reference_run(ref, data, 4)
    with engine.initialize(model, config(tmp_path)) as trainer:
        assert trainer.plan.trainable_in_memory
        assert any("base_layer" in str(k) for k in frozen_streamed_keys(trainer))
        losses = train(trainer, data, 4)
        assert_same_training(ref, ref_losses, losses, trainer)
        x = batches(1, seed=9)[0]
        with torch.no_grad():
            logits = trainer.eval()(input_ids=x).logits
        out = tmp_path.parent / f"{tmp_path.name}-adapter"
        files = trainer.save_adapter(str(out))
    assert all(os.path.exists(f) for f in files)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, logits)


def test_builtin_adapter_saves_in_peft_format(tmp_path):
    model = lora_llama()
    data = batches(4)
    with engine.initialize(model, config(tmp_path)) as trainer:
        train(trainer, data, 2)
        x = batches(1, seed=9)[0]
        with torch.no_grad():
            logits = trainer.eval()(input_ids=x).logits
        out = tmp_path.parent / f"{tmp_path.name}-adapter"
        trainer.save_adapter(str(out))
        adapters = {n: trainer.parameter(n).clone() for n, _ in trainable(model)}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == {f"base_model.model.{n}" for n in adapters}
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, logits)
    for n, v in adapters.items():
        key = "base_model.model." + n.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default.")
        assert torch.equal(dict(loaded.named_parameters())[key], v)


# ---------------------------------------------------------------------------------------- merge and export
@pytest.mark.parametrize("wrapped", ["builtin", "peft"])
def test_merge_and_export_loads_in_transformers(tmp_path, wrapped):
    model = lora_llama(tied=False) if wrapped == "builtin" else peft_llama()
    data = batches(4)
    out = tmp_path.parent / f"{tmp_path.name}-merged"
    with engine.initialize(model, config(tmp_path)) as trainer:
        train(trainer, data, 2)
        adapter = tmp_path.parent / f"{tmp_path.name}-adapter"
        trainer.save_adapter(str(adapter))
        reads = trainer.runtime.store.stats()["bytes_read"]
        base_keys = {sp.name for sp in trainer.runtime.streamer.params.streamed.values()}
        alive, real_weight = [], trainer.weight

        def weight(name):  # one base tensor in memory at a time: every earlier one is gone
            if name in base_keys:
                assert all(ref() is None for ref in alive), name
            value = real_weight(name)
            if name in base_keys:
                alive.append(weakref.ref(value))
            return value

        trainer.weight = weight
        files = trainer.merge_and_export(str(out), max_shard_size="40KiB")
        assert len(alive) == len(base_keys)
        # every base tensor was read from the store once, one at a time
        assert trainer.runtime.store.stats()["bytes_read"] - reads == trainer.runtime.streamer.params.streamed_bytes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert not any("lora" in k or "base_layer" in k for k in index["weight_map"])
    assert all(str(out / f).startswith(str(out)) for f in files)
    merged_ref = peft.PeftModel.from_pretrained(tiny_llama(), str(adapter)).merge_and_unload()
    exported = LlamaForCausalLM.from_pretrained(str(out))
    assert exported.config.dtype == torch.float32
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x).logits, merged_ref(input_ids=x).logits, rtol=1e-6, atol=1e-6)
    for name, p in merged_ref.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], p, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------- bad input
def test_bad_lora_input_is_a_clear_error():
    with pytest.raises(ValueError, match="match no nn.Linear.*q_proj"):
        apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig(r=-2)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        LoraConfig(alpha=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LoraConfig(target_modules="q_proj(")
    with pytest.raises(ValueError, match="non-empty list"):
        LoraConfig(target_modules=[])
    with pytest.raises(ValueError, match="not nn.Linear.*mlp"):
        apply_lora(tiny_llama(), LoraConfig(target_modules=["mlp"]))
    model = lora_llama()
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(target_modules=["k_proj"]))
    with pytest.raises(engine.ConfigError, match="frozen_dtype must be"):
        engine.Config(frozen_dtype="int8")
    with pytest.raises(engine.ConfigError, match="trainable_placement must be one of"):
        engine.Config(trainable_placement="gpu")
    with pytest.raises(ValueError, match="no LoRA layers"):
        engine.peft.merge_and_export(tiny_llama(), "/nonexistent-never-written")


def test_regex_targets_and_untouched_modules():
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=r".*\.layers\.1\..*_proj"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped and all(".layers.1." in n for n in wrapped) and len(wrapped) == 7
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
