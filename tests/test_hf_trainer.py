"""The Hugging Face Trainer / TRL integration (engine.integrations.transformers) against the plain Trainer."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, batches, child_env, run_python, tiny_llama

import engine
from engine.errors import ConfigError
from engine.integrations.hf_args import OffloadTrainingArguments, resolve_config
from engine.integrations.transformers import ENGINE_CHECKPOINT_DIR, OffloadTrainer

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

SEQ = 16
RTOL = 1e-5  # fp32; the engine's AdamW has an IEEE sqrt, torch's MKL's (see helpers.assert_same_training)


def token_dataset(rows: int, seed: int = 1, vocab: int = 256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, SEQ), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(out, **extra) -> dict:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                num_train_epochs=2, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2,
                max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                optim="adamw_torch", disable_tqdm=True, seed=7)
    base.update(extra)
    return base


def offload_trainer(tmp_path, data, **extra) -> OffloadTrainer:
    args = transformers.TrainingArguments(**training_args(tmp_path / "out", **extra))
    (tmp_path / "swap").mkdir(parents=True, exist_ok=True)
    cfg = engine.Config(nvme_path=str(tmp_path / "swap"), resident_threshold_bytes=4096)
    return OffloadTrainer(model=tiny_llama(), args=args, train_dataset=data, engine_config=cfg)


def plain_trainer(tmp_path, data, **extra) -> transformers.Trainer:
    args = transformers.TrainingArguments(**training_args(tmp_path / "plain", **extra))
    return transformers.Trainer(model=tiny_llama(), args=args, train_dataset=data)


def train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_same_logs(got: list[dict], ref: list[dict]) -> None:
    assert len(got) == len(ref) and got
    for g, r in zip(got, ref):
        assert g["step"] == r["step"]
        for key in ("loss", "grad_norm", "learning_rate"):
            assert math.isclose(g[key], r[key], rel_tol=RTOL), (key, got, ref)


def assert_same_weights(offload: OffloadTrainer, model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        got = offload.engine.weight(name).view(p.shape)
        rel = ((got - p.detach()).norm() / p.detach().norm()).item()
        assert rel <= RTOL, (name, rel)


@pytest.mark.parametrize("rows, weight_decay", [(16, 0.0), (10, 0.0), (16, 0.1)],
                         ids=["full-windows", "short-last-window", "weight-decay-groups"])
def test_losses_grad_norms_lrs_and_weights_equal_the_plain_trainer(tmp_path, rows, weight_decay):
    # weight_decay > 0: transformers exempts biases and norm weights, and so must the engine's groups
    data = token_dataset(rows)
    ref = plain_trainer(tmp_path, data, weight_decay=weight_decay)
    ref.train()
    with offload_trainer(tmp_path, data, weight_decay=weight_decay) as ours:
        ours.train()
        assert_same_logs(train_logs(ours), train_logs(ref))
        assert max(h["grad_norm"] for h in train_logs(ref)) > 1.0  # clipping acted
        assert all("engine_peak_rss_gb" in h and "engine_nvme_gbps" in h for h in train_logs(ours))
        assert_same_weights(ours, ref.model)


def test_eval_loss_equals_the_plain_trainer(tmp_path):
    data, held_out = token_dataset(8), token_dataset(6, seed=2)
    ref = plain_trainer(tmp_path, data, num_train_epochs=1)
    ref.train()
    with offload_trainer(tmp_path, data, num_train_epochs=1) as ours:
        before = ours.evaluate(eval_dataset=held_out)["eval_loss"]  # streamed, before any step
        ours.train()
        got = ours.evaluate(eval_dataset=held_out)["eval_loss"]
        assert before != got
        assert math.isclose(got, ref.evaluate(eval_dataset=held_out)["eval_loss"], rel_tol=RTOL)
        preds = ours.predict(held_out)
        assert math.isclose(preds.metrics["test_loss"], got, rel_tol=1e-6)  # same forward, same batches


def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    data = token_dataset(12)
    whole = dict(save_strategy="steps", save_steps=2)
    with offload_trainer(tmp_path / "a", data, **whole) as full:
        full.train()
        ref_logs, ref_weights = train_logs(full), {n: full.engine.weight(n).clone()
                                                    for n, _ in full.model.named_parameters()}
    ckpt = tmp_path / "a" / "out" / "checkpoint-4"
    assert (ckpt / ENGINE_CHECKPOINT_DIR).is_dir() and (ckpt / "model.safetensors").is_file()
    assert (ckpt / "training_args.json").is_file() and not (ckpt / "training_args.bin").exists()
    with offload_trainer(tmp_path / "b", data, **whole) as resumed:
        resumed.train(resume_from_checkpoint=str(ckpt))
        after = [h for h in train_logs(resumed) if h["step"] > 4]
        assert_same_logs(after, [h for h in ref_logs if h["step"] > 4])
        for name, value in ref_weights.items():
            assert torch.equal(resumed.engine.weight(name), value), name  # same kernel, same state: bit-identical


def test_resume_after_a_short_window_equals_the_uninterrupted_run(tmp_path):
    # 10 rows, batch 2, accumulation 2: every epoch ends with a one-micro-batch window, and the
    # epoch-end checkpoint is taken right after it.
    data = token_dataset(10)
    whole = dict(save_strategy="epoch")
    with offload_trainer(tmp_path / "a", data, **whole) as full:
        full.train()
        ref_logs, ref_weights = train_logs(full), {n: full.engine.weight(n).clone()
                                                    for n, _ in full.model.named_parameters()}
    ckpt = tmp_path / "a" / "out" / "checkpoint-3"
    assert (ckpt / ENGINE_CHECKPOINT_DIR).is_dir()
    with offload_trainer(tmp_path / "b", data, **whole) as resumed:
        resumed.train(resume_from_checkpoint=str(ckpt))
        assert_same_logs([h for h in train_logs(resumed) if h["step"] > 3], [h for h in ref_logs if h["step"] > 3])
        for name, value in ref_weights.items():
            assert torch.equal(resumed.engine.weight(name), value), name


DS_ZERO3 = {
    "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "SWAP"},
                          "offload_optimizer": {"device": "nvme", "nvme_path": "SWAP"},
                          "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
}


def ds_file(tmp_path) -> str:
    (tmp_path / "swap").mkdir(exist_ok=True)
    text = json.dumps(DS_ZERO3).replace("SWAP", str(tmp_path / "swap"))
    path = tmp_path / "ds_config_zero3.json"
    path.write_text(text)
    return str(path)


def test_deepspeed_file_with_auto_values_takes_the_training_arguments(tmp_path, caplog):
    args = OffloadTrainingArguments(**training_args(tmp_path / "out", deepspeed=ds_file(tmp_path), learning_rate=2e-4,
                                                    adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
                                                    weight_decay=0.05, gradient_accumulation_steps=4,
                                                    max_grad_norm=0.5, bf16=True))
    assert args.deepspeed is None and args.engine_deepspeed.endswith("ds_config_zero3.json")
    with caplog.at_level(logging.WARNING, logger="engine"):
        cfg = resolve_config(None, args)
    opt = cfg.optimizer
    assert (opt.type, opt.lr, opt.betas, opt.eps, opt.weight_decay) == ("adamw", 2e-4, (0.8, 0.95), 1e-7, 0.05)
    assert (cfg.gradient_accumulation_steps, cfg.gradient_clipping, cfg.dtype) == (4, 0.5, "bf16")
    assert cfg.nvme_path == str(tmp_path / "swap") and cfg.device == "cpu"
    warnings = [r.getMessage() for r in caplog.records if "no equivalent" in r.getMessage()]
    assert len(warnings) == 1, warnings
    for key in ("scheduler", "zero_optimization.overlap_comm", "stage3_gather_16bit_weights_on_model_save"):
        assert key in warnings[0]


def test_deepspeed_trainer_switch_and_concrete_mismatch(tmp_path):
    # TrainingArguments(deepspeed=...) users change the two class names; the engine trains.
    args = OffloadTrainingArguments(**training_args(tmp_path / "out", deepspeed=ds_file(tmp_path), max_steps=1))
    with OffloadTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(4)) as t:
        t.train()
        assert t.engine.global_steps == 1 and t.engine_config.optimizer.lr == args.learning_rate
    bad = dict(DS_ZERO3, gradient_accumulation_steps=8, optimizer={"type": "AdamW", "params": {"lr": 0.1}})
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=8 vs hf.*optimizer.params.lr=0.1 vs hf"):
        resolve_config(bad, transformers.TrainingArguments(**training_args(tmp_path / "o2")))


def test_engine_config_loses_to_training_arguments_with_one_warning(tmp_path, caplog):
    args = transformers.TrainingArguments(**training_args(tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="engine"):
        cfg = resolve_config(engine.Config(gradient_accumulation_steps=8, optimizer=engine.AdamWConfig(lr=0.5)), args)
    assert (cfg.gradient_accumulation_steps, cfg.optimizer.lr, cfg.gradient_clipping) == (2, 3e-3, 1.0)
    msgs = [r.getMessage() for r in caplog.records if "TrainingArguments win" in r.getMessage()]
    assert len(msgs) == 1 and "gradient_accumulation_steps=8 -> 2" in msgs[0] and "lr=0.5 -> 0.003" in msgs[0]
    # optim=adamw_torch: an engine config's L2-decay Adam becomes AdamW, named in the warning too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine"):
        cfg = resolve_config(engine.Config(optimizer=engine.OptimizerConfig(type="adam")), args)
    assert cfg.optimizer.type == "adamw"
    assert any("optimizer.type='adam' -> 'adamw'" in r.getMessage() for r in caplog.records)


def test_constructor_refusals_release_an_engine_pretrained_engine(tmp_path, monkeypatch):
    args = transformers.TrainingArguments(**training_args(tmp_path / "out"))
    with pytest.raises(ConfigError, match="optimizer_cls_and_kwargs"):
        OffloadTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(4),
                       optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))
    with pytest.raises(ConfigError, match="auto_find_batch_size"):
        OffloadTrainer(model=tiny_llama(), args=transformers.TrainingArguments(
            **training_args(tmp_path / "out", auto_find_batch_size=True)), train_dataset=token_dataset(4))
    # engine_pretrained builds the engine before the Trainer: a refusal after that closes it
    src = tmp_path / "pretrained"
    tiny_llama().save_pretrained(src)
    closed = []
    monkeypatch.setattr(engine.Trainer, "close", lambda self, **kw: closed.append(self))
    with pytest.raises(ConfigError, match="optimizer_cls_and_kwargs"):
        OffloadTrainer(args=args, train_dataset=token_dataset(4), engine_pretrained=str(src),
                       engine_config=engine.Config(nvme_path=str(tmp_path)),
                       optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))
    assert len(closed) == 1


def test_unsupported_training_arguments_are_named_in_one_error(tmp_path):
    args = transformers.TrainingArguments(**training_args(tmp_path / "out", optim="sgd", torch_compile=True))
    with pytest.raises(ConfigError, match=r"optim='sgd'.*torch_compile=True"):
        OffloadTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(4))


def test_window_end_closes_a_short_window(tmp_path):
    """Runtime API used by the integration: an explicit window end steps after 1 of 2 micro-batches,
    the next micro-batch opens a new window (its gradient overwrites, not adds); windows without a
    call then have the full length again, counted from their own start, and a checkpoint can be
    taken at each boundary."""
    data = batches(5)
    ref_model = tiny_llama()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, weight_decay=0.0, foreach=False)
    for window in ([data[0]], [data[1], data[2]], [data[3], data[4]]):
        for x in window:
            (ref_model(input_ids=x, labels=x).loss / len(window)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    cfg = engine.Config(nvme_path=str(tmp_path), gradient_accumulation_steps=2, resident_threshold_bytes=4096,
                        optimizer=engine.AdamWConfig(lr=1e-3))
    with engine.initialize(tiny_llama(), cfg) as t:
        for x, size, last in ((data[0], 1, True), (data[1], 2, False), (data[2], 2, True)):
            t.set_window_end(last)
            t.backward(t(input_ids=x, labels=x).loss / size, scale_wrt_gas=False)
            t.step()
        assert t.global_steps == 2 and t.runtime.window_micro_batches == 0
        t.save_checkpoint(str(tmp_path / "ckpt"))  # at a boundary, micro_steps 3 of accumulation 2
        for x in data[3:]:  # no set_window_end: a window of gradient_accumulation_steps
            t.backward(t(input_ids=x, labels=x).loss)
            t.step()
            assert t.global_steps == (3 if x is data[4] else 2)
        for name, p in ref_model.named_parameters():
            rel = ((t.weight(name).view(p.shape) - p.detach()).norm() / p.detach().norm()).item()
            assert rel <= RTOL, (name, rel)


def test_example_script_runs(tmp_path):
    out = tmp_path / "run"
    proc = run_python(os.path.join(REPO, "examples", "hf_trainer.py"), "--output-dir", str(out), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "config.json").is_file()


def tiny_tokenizer(vocab_words: int = 200):
    """A word-level fast tokenizer built in memory (no hub download): ``w0 ... w199`` plus specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def test_trl_sft_trainer_with_lora_trains_and_saves_a_loadable_adapter(tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # trl's telemetry ping, and nothing else, would reach the hub
    from engine.integrations.transformers import OffloadTrainerMixin

    class OffloadSFTTrainer(OffloadTrainerMixin, trl.SFTTrainer):
        pass

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{j}" for j in torch.randint(0, 200, (12,), generator=g).tolist()) for _ in range(8)]
    data = datasets.Dataset.from_dict({"text": texts})

    def run(cls, out, **extra):
        # SFTConfig defaults to bf16=True (autocast in the plain Trainer, bf16 weights in the engine): fp32 here
        args = trl.SFTConfig(**training_args(out, max_steps=3, max_length=16, num_train_epochs=1, bf16=False))
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        trainer = cls(model=tiny_llama(), args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                      peft_config=lora, **extra)
        trainer.train()
        return trainer

    ref = run(trl.SFTTrainer, tmp_path / "plain")
    (tmp_path / "swap").mkdir()
    cfg = engine.Config(nvme_path=str(tmp_path / "swap"))
    with run(OffloadSFTTrainer, tmp_path / "out", engine_config=cfg) as ours:
        assert_same_logs(train_logs(ours), train_logs(ref))
        ours.save_model(str(tmp_path / "adapter"))
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
        lora_names = [n for n, _ in ours.model.named_parameters() if "lora_" in n]
        assert lora_names
        values = dict(loaded.named_parameters())
        for name in lora_names:  # the same PeftModel names on both sides
            assert torch.equal(values[name], ours.engine.parameter(name).view(values[name].shape)), name


def test_engine_pretrained_loads_a_checkpoint_and_trains_like_the_plain_trainer(tmp_path):
    tiny_llama().save_pretrained(str(tmp_path / "hf"))  # safetensors + config.json
    data = token_dataset(8)
    ref = transformers.Trainer(model=transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")),
                               args=transformers.TrainingArguments(**training_args(tmp_path / "plain",
                                                                                   num_train_epochs=1)),
                               train_dataset=data)
    ref.train()
    (tmp_path / "swap").mkdir()
    args = transformers.TrainingArguments(**training_args(tmp_path / "out", num_train_epochs=1))
    with OffloadTrainer(args=args, train_dataset=data, engine_pretrained=str(tmp_path / "hf"),
                        engine_config={"nvme_path": str(tmp_path / "swap")}) as ours:
        assert ours.engine is not None and ours.model is ours.engine.module
        ours.train()
        assert_same_logs(train_logs(ours), train_logs(ref))
        assert_same_weights(ours, ref.model)


def test_meta_device_model_with_an_initializer(tmp_path):
    source = tiny_llama()
    values = {n: p.detach().clone() for n, p in source.named_parameters()}
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(source.config)
    data = token_dataset(4)
    ref = transformers.Trainer(model=source, args=transformers.TrainingArguments(
        **training_args(tmp_path / "plain", num_train_epochs=1)), train_dataset=data)
    ref.train()
    (tmp_path / "swap").mkdir()
    args = transformers.TrainingArguments(**training_args(tmp_path / "out", num_train_epochs=1))
    with OffloadTrainer(model=meta, args=args, train_dataset=data, engine_config={"nvme_path": str(tmp_path / "swap")},
                        engine_initializer=lambda name, shape: values[name].view(shape)) as ours:
        ours.train()
        assert_same_logs(train_logs(ours), train_logs(ref))
        assert_same_weights(ours, ref.model)


def test_trl_example_script_runs(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "sft"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "trl_sft.py"), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=180, env=child_env(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_an_fp16_step_the_loss_scaler_skips_does_not_advance_the_schedule(tmp_path):
    # A loss scale of 2**60 overflows fp16 gradients: the engine skips each step (backing off
    # the scale), and the plain Trainer's rule holds - a skipped step leaves the LR where it was.
    args = transformers.TrainingArguments(**training_args(tmp_path / "out", fp16=True, num_train_epochs=1,
                                                          gradient_accumulation_steps=1, lr_scheduler_type="linear",
                                                          warmup_steps=0))
    (tmp_path / "swap").mkdir()
    cfg = engine.Config(nvme_path=str(tmp_path / "swap"), initial_scale_power=60)
    with OffloadTrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(8), engine_config=cfg) as ours:
        ours.train()
        assert ours.engine.skipped_steps == 4 and ours.engine.global_steps == 0
        assert [h["learning_rate"] for h in train_logs(ours)] == [3e-3] * 4
        assert ours.lr_scheduler.last_epoch == 0
