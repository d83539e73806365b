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
