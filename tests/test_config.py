"""Config: validation messages, file loading, DeepSpeed translation, ablation baseline."""
from __future__ import annotations

import json
import logging

import pytest

from engine.config import AdamWConfig, Config, ConfigError, OptimizerConfig


def test_defaults_are_ours_and_valid():
    cfg = Config()
    assert (cfg.buffer_pool, cfg.pinned_alloc, cfg.overflow_check, cfg.store, cfg.grad_buffer) == \
           ("adaptive", "exact", "fused", "direct", "streamed")
    assert cfg.optimizer.type == "adamw" and AdamWConfig(lr=3e-4).lr == 3e-4


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"store": "lmdb"}, "store must be one of"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a positive integer"),
    ({"gradient_clipping": -1.0}, "gradient_clipping must be a non-negative"),
    ({"prefetch_depth": -2}, "prefetch_depth must be 'auto'"),
    ({"sub_group_size": 0}, "sub_group_size must be 'auto'"),
    ({"host_memory_budget": "lots"}, "not a byte size"),
    ({"block_size": 1000}, "block_size must be a positive multiple of 4096"),
    ({"nvme_path": []}, "nvme_path must be"),
    ({"optimizer": {"type": "lion"}}, "optimizer.type must be one of"),
    ({"optimizer": {"betas": (0.9, 1.5)}}, "optimizer.betas"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr must be a non-negative"),
    ({"malloc_mmap_threshold": "64MiB"}, "malloc_mmap_threshold must be None or in"),
    ({"malloc_mmap_threshold": 0}, "malloc_mmap_threshold must be None or in"),
])
def test_invalid_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Config(**kwargs)


def test_unknown_keys_get_suggestions():
    with pytest.raises(ConfigError, match=r"'dtyp' \(did you mean 'dtype'\?\)"):
        Config.from_dict({"dtyp": "bf16"})
    with pytest.raises(ConfigError, match="unknown optimizer key"):
        Config.from_dict({"optimizer": {"learning_rate": 1.0}})


def test_load_from_json_file_and_errors(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"dtype": "bf16", "nvme_path": ["/a", "/b"], "host_memory_budget": "8GiB",
                                "optimizer": {"lr": 1e-4, "weight_decay": 0.1}}))
    cfg = Config.load(str(path))
    assert cfg.dtype == "bf16" and cfg.nvme_paths == ["/a", "/b"] and cfg.budget_bytes == 8 << 30
    assert cfg.optimizer == OptimizerConfig(lr=1e-4, weight_decay=0.1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.load(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="cannot read"):
        Config.load(str(tmp_path / "missing.json"))


def test_deepspeed_zero3_offload_config_is_translated(caplog):
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "fp16": {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 500},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "zero_optimization": {
            "stage": 3, "sub_group_size": 100000000,
            "offload_param": {"device": "nvme", "nvme_path": "/mnt/nvme", "buffer_count": 6, "pin_memory": True},
            "offload_optimizer": {"device": "nvme", "nvme_path": "/mnt/nvme", "buffer_count": 4},
            "stage3_prefetch_bucket_size": 5e7,
        },
        "aio": {"block_size": 1048576, "queue_depth": 16, "thread_count": 1},
    }
    with caplog.at_level(logging.WARNING, logger="engine"):
        cfg = Config.from_dict(ds)
    assert cfg.dtype == "fp16" and cfg.gradient_accumulation_steps == 4 and cfg.gradient_clipping == 1.0
    assert cfg.initial_scale_power == 12 and cfg.loss_scale_window == 500
    assert cfg.optimizer == OptimizerConfig(type="adamw", lr=2e-5, betas=(0.9, 0.95), weight_decay=0.1)
    assert cfg.nvme_path == "/mnt/nvme" and cfg.offload_params == "nvme" and cfg.offload_optimizer == "nvme"
    assert cfg.sub_group_size == 100000000 and cfg.queue_depth == 16 and cfg.block_size == 1048576
    warning = caplog.text
    for key in ("stage3_prefetch_bucket_size", "aio.thread_count", "offload_param.pin_memory"):
        assert key in warning
    assert "train_micro_batch_size_per_gpu" not in warning


def test_deepspeed_unsupported_optimizer_is_refused():
    with pytest.raises(ConfigError, match="Lamb"):
        Config.from_dict({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Lamb"}})


def test_with_baseline_flips_ablation_switches():
    cfg = Config()
    base = cfg.with_baseline()
    assert (base.buffer_pool, base.pinned_alloc, base.overflow_check, base.store, base.grad_buffer) == \
           ("uniform", "torch", "naive", "files", "flat")
    assert cfg.with_baseline("store").store == "files" and cfg.with_baseline("store").buffer_pool == "adaptive"
    with pytest.raises(ConfigError, match="unknown ablation"):
        cfg.with_baseline("fast_mode")


# ----------------------------------------------------------------------------- bad numbers (hardening item 9)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs,field", [
    # Values the issue names: NaN weights, clipping silently off, every step skipped, raw errors later.
    ({"optimizer": {"lr": NAN}}, "optimizer.lr"),
    ({"optimizer": {"lr": INF}}, "optimizer.lr"),
    ({"optimizer": {"lr": True}}, "optimizer.lr"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr"),
    ({"optimizer": {"eps": NAN}}, "optimizer.eps"),
    ({"optimizer": {"eps": INF}}, "optimizer.eps"),
    ({"optimizer": {"eps": 0.0}}, "optimizer.eps"),
    ({"optimizer": {"weight_decay": NAN}}, "optimizer.weight_decay"),
    ({"optimizer": {"weight_decay": -INF}}, "optimizer.weight_decay"),
    ({"optimizer": {"momentum": NAN}}, "optimizer.momentum"),
    ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum"),
    ({"optimizer": {"betas": (NAN, 0.999)}}, "optimizer.betas"),
    ({"optimizer": {"betas": (0.9, INF)}}, "optimizer.betas"),
    ({"optimizer": {"betas": (True, 0.999)}}, "optimizer.betas"),
    ({"optimizer": {"betas": ("0.9", 0.999)}}, "optimizer.betas"),
    ({"optimizer": {"betas": (0.9,)}}, "optimizer.betas"),
    ({"optimizer": {"betas": "auto"}}, "optimizer.betas"),
    ({"optimizer": {"type": 3}}, "optimizer.type"),
    ({"gradient_clipping": NAN}, "gradient_clipping"),
    ({"gradient_clipping": INF}, "gradient_clipping"),
    ({"gradient_clipping": True}, "gradient_clipping"),
    ({"loss_scale": NAN}, "loss_scale"),
    ({"loss_scale": INF}, "loss_scale"),
    ({"loss_scale": 1e39}, "loss_scale"),  # not a finite fp32
    ({"min_loss_scale": NAN}, "min_loss_scale"),
    ({"min_loss_scale": 0.0}, "min_loss_scale"),
    ({"initial_scale_power": 2000}, "initial_scale_power"),
    ({"initial_scale_power": 128}, "initial_scale_power"),  # 2**128 overflows fp32
    ({"initial_scale_power": True}, "initial_scale_power"),
    ({"initial_scale_power": 16.0}, "initial_scale_power"),
    ({"loss_scale_window": 0}, "loss_scale_window"),
    ({"hysteresis": NAN}, "hysteresis"),
    ({"hysteresis": 0}, "hysteresis"),
    ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": 2**40}, "gradient_accumulation_steps"),
    ({"queue_depth": 10**9}, "queue_depth"),
    ({"queue_depth": 4097}, "queue_depth"),  # csrc/aio_uring.cpp accepts [1, 4096]
    ({"queue_depth": 0}, "queue_depth"),
    ({"buffer_count": 0}, "buffer_count"),
    ({"buffer_count": True}, "buffer_count"),
    ({"prefetch_depth": True}, "prefetch_depth"),
    ({"prefetch_depth": "deep"}, "prefetch_depth"),
    ({"prefetch_depth": 2**40}, "prefetch_depth"),
    ({"sub_group_size": NAN}, "sub_group_size"),
    ({"sub_group_size": True}, "sub_group_size"),
    ({"sub_group_size": 2**60}, "sub_group_size"),
    ({"resident_threshold_bytes": True}, "resident_threshold_bytes"),
    ({"resident_threshold_bytes": -1}, "resident_threshold_bytes"),
    ({"resident_threshold_bytes": NAN}, "resident_threshold_bytes"),
    ({"checkpoint_keep_last": True}, "checkpoint_keep_last"),
    ({"nvme_path": 5}, "nvme_path"),
    ({"nvme_path": [5]}, "nvme_path"),
    ({"nvme_path": ["/a", None]}, "nvme_path"),
    ({"nvme_path": ""}, "nvme_path"),
    ({"nvme_path": True}, "nvme_path"),
    ({"nvme_path": "/a\0b"}, "nvme_path"),
    ({"host_memory_budget": NAN}, "host_memory_budget"),
    ({"host_memory_budget": True}, "host_memory_budget"),
    ({"host_memory_budget": 0}, "host_memory_budget"),
    ({"block_size": 2 << 30}, "block_size"),  # one Linux read/write moves at most 2 GiB - 4 KiB
    ({"block_size": True}, "block_size"),
    ({"block_size": NAN}, "block_size"),
    ({"checksum": "false"}, "checksum"),
    ({"checksum": 0}, "checksum"),
    ({"malloc_mmap_threshold": True}, "malloc_mmap_threshold"),
    ({"dtype": ["fp32"]}, "dtype"),
])
def test_bad_numbers_and_types_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{field} must be"), message
    assert info.value.field == field
    assert "got " in message  # the value is named


def test_config_error_is_an_engine_error_and_a_value_error():
    from engine.errors import EngineError

    assert issubclass(ConfigError, EngineError) and issubclass(ConfigError, ValueError)


def test_good_edge_values_are_accepted():
    cfg = Config(optimizer={"lr": 0, "betas": [0.0, 0.999], "weight_decay": 0, "momentum": 0.9},
                 initial_scale_power=127, queue_depth=4096, block_size="1GiB", loss_scale=2.0**127,
                 prefetch_depth=0, checksum=False, nvme_path=("/a", "/b"))
    assert cfg.optimizer.betas == (0.0, 0.999) and cfg.nvme_paths == ["/a", "/b"]


def test_nan_in_a_json_file_is_refused(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"optimizer": {"lr": NaN}}')  # Python's json accepts NaN / Infinity literals
    with pytest.raises(ConfigError, match=r"optimizer\.lr must be .*got nan"):
        Config.load(str(path))
    with pytest.raises(ConfigError, match=r"gradient_clipping must be .*got nan"):
        Config.from_dict(json.loads('{"gradient_clipping": NaN}'))


# ----------------------------------------------------------------------------- DeepSpeed "auto" (item 8)
def hf_zero3_config(**overrides) -> dict:
    """The ZeRO-3 offload config of the Hugging Face DeepSpeed guide: 'auto' wherever the
    Trainer fills the value from TrainingArguments."""
    ds = {
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "nvme", "nvme_path": "/mnt/nvme", "pin_memory": True},
            "offload_param": {"device": "nvme", "nvme_path": "/mnt/nvme", "pin_memory": True},
            "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
            "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 2000,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }
    ds.update(overrides)
    return ds


def test_deepspeed_auto_resolves_to_the_engine_defaults(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(hf_zero3_config()))
    cfg = Config.load(str(path))  # what engine.initialize(model, path) does
    default = Config()
    # fp16 "auto" + bf16 "auto" with nothing asked: the engine's default dtype, never silently bf16.
    assert cfg.dtype == "fp32"
    assert cfg.optimizer == OptimizerConfig(type="adamw")
    assert (cfg.gradient_accumulation_steps, cfg.gradient_clipping) == (1, default.gradient_clipping)
    assert cfg.resident_threshold_bytes == default.resident_threshold_bytes
    assert cfg.sub_group_size == 10**9 and isinstance(cfg.sub_group_size, int)  # 1e9 in JSON is a float
    assert cfg.nvme_path == "/mnt/nvme"


def test_deepspeed_auto_takes_the_given_values():
    auto = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1, "gradient_accumulation_steps": 4,
            "gradient_clipping": 1.0, "dtype": "bf16", "train_micro_batch_size_per_gpu": 2,
            "train_batch_size": 8, "resident_threshold_bytes": 4096}
    cfg = Config.from_deepspeed(hf_zero3_config(), auto=auto)
    assert cfg.optimizer == OptimizerConfig(type="adamw", lr=3e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    assert (cfg.dtype, cfg.gradient_accumulation_steps, cfg.gradient_clipping) == ("bf16", 4, 1.0)
    assert cfg.resident_threshold_bytes == 4096
    assert Config.from_deepspeed(hf_zero3_config(), auto={"dtype": "fp16"}).dtype == "fp16"
    # Given values are used only for "auto": a concrete value in the file stays.
    concrete = hf_zero3_config(gradient_clipping=0.5)
    assert Config.from_deepspeed(concrete, auto={"gradient_clipping": 1.0}).gradient_clipping == 0.5
    # An explicit "enabled": true decides the dtype; the other section's "auto" follows it.
    explicit = hf_zero3_config(bf16={"enabled": True})
    assert Config.from_deepspeed(explicit).dtype == "bf16"


def test_deepspeed_auto_values_are_checked():
    with pytest.raises(ConfigError, match=r"unknown 'auto' value name\(s\): 'weight_decy' "
                                          r"\(did you mean 'weight_decay'\?\)"):
        Config.from_deepspeed(hf_zero3_config(), auto={"weight_decy": 0.1})
    with pytest.raises(ConfigError, match=r"optimizer\.lr must be .*got nan \(in the values given for 'auto'\)"):
        Config.from_deepspeed(hf_zero3_config(), auto={"lr": NAN})
    with pytest.raises(ConfigError, match=r"dtype must be one of .* \(in the values given for 'auto'\)"):
        Config.from_deepspeed(hf_zero3_config(), auto={"dtype": "fp8"})
    with pytest.raises(ConfigError, match=r"auto\['train_batch_size'\] must be a positive integer"):
        Config.from_deepspeed(hf_zero3_config(), auto={"train_batch_size": 0})
    with pytest.raises(ConfigError, match=r"gradient_clipping must be .*got nan \(in the values given"):
        Config.from_deepspeed(hf_zero3_config(gradient_clipping=1.0), auto={"gradient_clipping": NAN})  # even unused


def test_deepspeed_auto_without_a_meaning_is_refused_naming_every_key():
    ds = {"optimizer": {"type": "auto", "params": {"lr": 1e-4, "adam_w_mode": "auto"}},
          "zero_optimization": {"stage": "auto", "offload_param": {"device": "auto", "nvme_path": "auto"}}}
    with pytest.raises(ConfigError) as info:
        Config.from_dict(ds)
    message = str(info.value)
    for key in ("optimizer.type", "optimizer.params.adam_w_mode", "zero_optimization.stage",
                "zero_optimization.offload_param.device", "zero_optimization.offload_param.nvme_path"):
        assert key in message, message


@pytest.mark.parametrize("section,value", [("fp16", "false"), ("bf16", "true"), ("fp16", 0), ("bf16", 1),
                                           ("fp16", None)])
def test_deepspeed_booleans_must_be_json_booleans(section, value):
    with pytest.raises(ConfigError, match=rf"{section}\.enabled must be true or false .*got {value!r}"):
        Config.from_dict({section: {"enabled": value}})


def test_deepspeed_other_booleans_and_sections_are_checked():
    with pytest.raises(ConfigError, match=r"optimizer\.params\.adam_w_mode must be true or false"):
        Config.from_dict({"optimizer": {"type": "Adam", "params": {"adam_w_mode": "false"}}})
    with pytest.raises(ConfigError, match=r"fp16\.auto_cast must be true or false"):
        Config.from_dict({"fp16": {"enabled": True, "auto_cast": "no"}})
    with pytest.raises(ConfigError, match="fp16.enabled and bf16.enabled are both true"):
        Config.from_dict({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="zero_optimization must be a mapping"):
        Config.from_dict({"train_batch_size": 8, "zero_optimization": 3})
    with pytest.raises(ConfigError, match=r"zero_optimization\.offload_param must be a mapping"):
        Config.from_dict({"zero_optimization": {"offload_param": "nvme"}})


@pytest.mark.parametrize("ds,key", [
    ({"optimizer": {"type": "AdamW", "params": {"lr": NAN}}}, "optimizer.params.lr"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "1e-4"}}}, "optimizer.params.lr"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": INF}}}, "optimizer.params.eps"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": NAN}}}, "optimizer.params.weight_decay"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, NAN]}}}, "optimizer.params.betas"),
    ({"optimizer": {"type": "AdamW", "params": "lr"}}, "optimizer.params"),
    ({"gradient_clipping": NAN, "train_batch_size": 8}, "gradient_clipping"),
    ({"gradient_accumulation_steps": "4", "train_batch_size": 8}, "gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": 1.5, "train_batch_size": 8}, "gradient_accumulation_steps"),
    ({"train_batch_size": "lots"}, "train_batch_size"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu"),
    ({"fp16": {"enabled": True, "loss_scale": INF}}, "fp16.loss_scale"),
    ({"fp16": {"enabled": True, "loss_scale": NAN}}, "fp16.loss_scale"),
    ({"fp16": {"enabled": True, "initial_scale_power": 2000}}, "fp16.initial_scale_power"),
    ({"fp16": {"enabled": True, "hysteresis": "2"}}, "fp16.hysteresis"),
    ({"aio": {"queue_depth": 10**9}, "train_batch_size": 8}, "aio.queue_depth"),
    ({"aio": {"block_size": True}, "train_batch_size": 8}, "aio.block_size"),
    ({"zero_optimization": {"sub_group_size": 1.5}}, "zero_optimization.sub_group_size"),
    ({"zero_optimization": {"stage3_param_persistence_threshold": NAN}},
     "zero_optimization.stage3_param_persistence_threshold"),
    ({"zero_optimization": {"offload_param": {"device": "nvme", "nvme_path": 5}}},
     "zero_optimization.offload_param.nvme_path"),
    ({"zero_optimization": {"offload_param": {"device": "nvme", "buffer_count": 0}}},
     "zero_optimization.offload_param.buffer_count"),
    ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage"),
])
def test_deepspeed_values_get_the_same_validation_naming_the_deepspeed_key(ds, key):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(ds)
    assert key in str(info.value), str(info.value)


def test_initialize_with_a_deepspeed_path_refuses_bad_values_before_building(tmp_path):
    import torch

    import engine

    path = tmp_path / "ds_config.json"
    path.write_text('{"train_batch_size": "auto", "optimizer": {"type": "AdamW", "params": {"lr": Infinity}}}')
    with pytest.raises(ConfigError, match=r"optimizer\.lr must be .*got inf \(DeepSpeed key optimizer\.params\.lr\)"):
        engine.initialize(torch.nn.Linear(4, 4), str(path))


# ---------------------------------------------------------------------- the compute device
def fake_cuda(monkeypatch, count: int, current: int = 0) -> None:
    """This CPU machine pretends to have ``count`` CUDA devices (0: CUDA not available)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:7", "separate"])
def test_device_settings_are_accepted_by_format(value):
    assert Config(device=value).device == value
    assert Config.from_dict({"device": value}).device == value


@pytest.mark.parametrize("value", ["cuda:x", "mps", "gpu", "CUDA", "cuda:", "cuda:-1", " cpu", "", None, 0])
def test_unknown_device_settings_are_refused_naming_the_choices(value):
    with pytest.raises(ConfigError, match=r"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'separate'") as info:
        Config(device=value)
    assert info.value.field == "device"


def test_device_defaults_to_auto_and_loads_from_a_file(tmp_path):
    assert Config().device == "auto"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"device": "cuda:1"}))
    assert Config.load(str(path)).device == "cuda:1"  # the format only: no CUDA needed to load it


def test_resolve_device_without_cuda(monkeypatch):
    import torch

    from engine.devices import ComputeDeviceSpec, resolve_device

    fake_cuda(monkeypatch, 0)
    assert resolve_device("auto") == ComputeDeviceSpec("cpu", torch.device("cpu"))
    cpu = resolve_device("cpu")
    assert (cpu.kind, cpu.device, cpu.copies, str(cpu)) == ("cpu", torch.device("cpu"), False, "cpu")
    separate = resolve_device("separate")
    assert (separate.kind, separate.device, separate.copies) == ("separate", torch.device("cpu"), True)
    assert str(separate) == "separate (cpu)"
    for value in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"device='{value}' but CUDA is not available here") as info:
            resolve_device(value)
        assert info.value.field == "device" and "use device='cpu' or 'auto'" in str(info.value)


def test_resolve_device_with_cuda(monkeypatch):
    import torch

    from engine.devices import AUTO_ENV, resolve_device

    fake_cuda(monkeypatch, 2, current=1)
    monkeypatch.delenv(AUTO_ENV, raising=False)  # the suite pins "auto" to the CPU (conftest.py)
    auto = resolve_device("auto")
    assert (auto.kind, auto.device, auto.copies, str(auto)) == ("cuda", torch.device("cuda", 1), True, "cuda:1")
    assert resolve_device("cuda").device == torch.device("cuda", 1)  # the current device
    assert resolve_device("cuda:0").device == torch.device("cuda", 0)
    assert resolve_device("cpu").kind == "cpu" and resolve_device("separate").kind == "separate"  # never CUDA
    with pytest.raises(ConfigError, match=r"device='cuda:2': this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="device must be"):
        resolve_device("cuda:x")


def test_deepspeed_has_no_compute_device_and_keeps_auto(caplog):
    with caplog.at_level(logging.WARNING, logger="engine"):
        cfg = Config.from_dict({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"},
                                                      "offload_optimizer": {"device": "nvme"}},
                                "device": "cuda:1"})
    # offload_*.device is where state is offloaded, not where compute runs; "device" is no DeepSpeed key.
    assert (cfg.device, cfg.offload_params, cfg.offload_optimizer) == ("auto", "nvme", "nvme")
    assert "device" in caplog.text.split("no equivalent in this engine:")[1]


def test_auto_device_can_be_pinned_by_the_environment(monkeypatch):
    import torch

    from engine.devices import AUTO_ENV, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv(AUTO_ENV, "cpu")
    assert resolve_device("auto").kind == "cpu"
    monkeypatch.setenv(AUTO_ENV, "separate")
    assert resolve_device("auto").kind == "separate"
    monkeypatch.delenv(AUTO_ENV)
    assert resolve_device("auto").device == torch.device("cuda", 0)
    monkeypatch.setenv(AUTO_ENV, "tpu")
    with pytest.raises(ConfigError, match=f"{AUTO_ENV}='tpu'"):
        resolve_device("auto")
