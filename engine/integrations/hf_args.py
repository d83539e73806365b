"""``TrainingArguments`` -> the engine's :class:`~engine.config.Config`.

Two sources of a Config, one rule each (what the Hugging Face Trainer's loop does is driven
by ``TrainingArguments``, so the engine must step the same way):

* a DeepSpeed config (``TrainingArguments(deepspeed=...)`` through :class:`OffloadTrainingArguments`,
  or ``engine_config=`` in DeepSpeed format): resolved as transformers'
  ``HfTrainerDeepSpeedConfig.trainer_config_process`` resolves it - ``"auto"`` takes the
  argument's value, a concrete value that disagrees with the argument is an error listing
  every mismatch - and a key the file leaves out takes the argument's value (transformers
  then uses its own optimizer/clipping/accumulation, which are these values);
* an engine Config (object, dict or JSON/YAML path): the arguments win; a field the Config
  set to something other than its default and other than the argument is named in one warning.

Scheduler sections of a DeepSpeed file are not used: the Trainer's own LR scheduler
(``lr_scheduler_type``, warmup) acts on the engine optimizer's ``param_groups``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Union

from transformers import TrainingArguments

from .._log import logger
from ..config import Config, OptimizerConfig
from ..ds_config import AutoValues, looks_like_deepspeed
from ..errors import ConfigError

EngineConfigLike = Union[Config, dict, str, "os.PathLike[str]", None]
# The AdamW implementations of TrainingArguments.optim the engine's fused AdamW stands in for.
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


@dataclass
class OffloadTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose ``deepspeed=`` is a config for this engine, not for DeepSpeed.

    transformers 5.24 turns ``TrainingArguments(deepspeed=...)`` into DeepSpeed's own
    integration while the arguments are built (``__post_init__`` makes an
    ``HfTrainerDeepSpeedConfig`` and an accelerate ``DeepSpeedPlugin``, which need the
    ``deepspeed`` package; without it the constructor fails with
    ``PackageNotFoundError: deepspeed>=0.9.3``), and ``_setup_devices`` would start DeepSpeed's
    distributed backend. This class takes the value out first: it is kept as
    :attr:`engine_deepspeed` (a path or dict) and ``deepspeed`` stays ``None``, so neither
    happens; :class:`~engine.integrations.transformers.OffloadTrainer` reads it. For a subclass of
    the arguments put it last, so the subclass's field defaults stay:
    ``@dataclass class OffloadSFTConfig(trl.SFTConfig, OffloadTrainingArguments): pass``."""

    def __post_init__(self) -> None:
        self.engine_deepspeed: Union[dict, str, None] = self.deepspeed
        self.deepspeed = None
        super().__post_init__()


def training_values(args: TrainingArguments) -> AutoValues:
    """What ``"auto"`` stands for, from the arguments (the keys trainer_config_process fills)."""
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return AutoValues(
        lr=float(args.learning_rate), betas=(float(args.adam_beta1), float(args.adam_beta2)),
        eps=float(args.adam_epsilon), weight_decay=float(args.weight_decay),
        gradient_accumulation_steps=int(args.gradient_accumulation_steps),
        gradient_clipping=float(args.max_grad_norm), dtype=dtype,
        train_micro_batch_size_per_gpu=int(args.per_device_train_batch_size),
        train_batch_size=int(args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps))


def _with_values(cfg: Config, values: AutoValues) -> Config:
    opt = dataclasses.replace(cfg.optimizer, lr=values["lr"], betas=values["betas"], eps=values["eps"],
                              weight_decay=values["weight_decay"])
    changes: dict[str, Any] = dict(optimizer=opt, dtype=values["dtype"],
                                   gradient_accumulation_steps=values["gradient_accumulation_steps"],
                                   gradient_clipping=values["gradient_clipping"])
    return dataclasses.replace(cfg, **changes).validate()


def _current(cfg: Config) -> dict[str, Any]:
    o = cfg.optimizer
    return dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, dtype=cfg.dtype,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                gradient_clipping=cfg.gradient_clipping)


def _ds_mismatches(ds: dict, values: AutoValues) -> list[str]:
    """Concrete DeepSpeed values that disagree with the arguments, as transformers lists them."""
    def concrete(section: Any, key: str) -> Any:
        v = section.get(key) if isinstance(section, dict) else None
        return None if v is None or v == "auto" else v

    params = ds.get("optimizer", {}).get("params", {}) if isinstance(ds.get("optimizer"), dict) else {}
    checks = [
        (concrete(ds, "train_micro_batch_size_per_gpu"), values["train_micro_batch_size_per_gpu"],
         "train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
        (concrete(ds, "train_batch_size"), values["train_batch_size"], "train_batch_size",
         "train_batch_size (calculated)"),
        (concrete(ds, "gradient_accumulation_steps"), values["gradient_accumulation_steps"],
         "gradient_accumulation_steps", "gradient_accumulation_steps"),
        (concrete(ds, "gradient_clipping"), values["gradient_clipping"], "gradient_clipping", "max_grad_norm"),
        (concrete(params, "lr"), values["lr"], "optimizer.params.lr", "learning_rate"),
        (None if concrete(params, "betas") is None else tuple(params["betas"]), values["betas"],
         "optimizer.params.betas", "adam_beta1+adam_beta2"),
        (concrete(params, "eps"), values["eps"], "optimizer.params.eps", "adam_epsilon"),
        (concrete(params, "weight_decay"), values["weight_decay"], "optimizer.params.weight_decay", "weight_decay"),
        (concrete(ds.get("fp16"), "enabled"), values["dtype"] == "fp16", "fp16.enabled", "fp16"),
        (concrete(ds.get("bf16"), "enabled"), values["dtype"] == "bf16", "bf16.enabled", "bf16"),
    ]
    return [f"ds {ds_key}={ds_val!r} vs hf {hf_key}={hf_val!r}" for ds_val, hf_val, ds_key, hf_key in checks
            if ds_val is not None and ds_val != hf_val]


def _read(source: Union[dict, str, "os.PathLike[str]"]) -> dict:
    """A dict as given (copied) or a JSON/YAML file's mapping (engine or DeepSpeed format)."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = os.fspath(source)
    try:
        with open(path) as f:
            text = f.read()
        data = _yaml_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the engine/DeepSpeed config {path!r}: {exc}", "engine_config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path!r} must hold a mapping at the top level", "engine_config")
    return data


def _yaml_load(text: str) -> Any:
    try:
        import yaml  # optional dependency, as in Config.load
    except ImportError:
        raise ConfigError("a YAML engine config needs PyYAML (pip install pyyaml)", "engine_config") from None
    return yaml.safe_load(text)


def resolve_config(engine_config: EngineConfigLike, args: TrainingArguments) -> Config:
    """The engine Config for training with ``args`` (see the module docstring for the rules)."""
    if engine_config is None:
        engine_config = getattr(args, "engine_deepspeed", None)
    values = training_values(args)
    source: Union[dict, Config] = Config() if engine_config is None else \
        engine_config if isinstance(engine_config, Config) else _read(engine_config)
    if isinstance(source, dict) and looks_like_deepspeed(source):
        mismatches = _ds_mismatches(source, values)
        if mismatches:
            raise ConfigError("the DeepSpeed config disagrees with TrainingArguments (set the key to \"auto\" or "
                              "make them equal): " + "; ".join(mismatches), "deepspeed")
        cfg = Config.from_deepspeed(source, auto=values)
    else:
        cfg = Config.load(source)
        defaults = _current(Config(optimizer=OptimizerConfig()))
        conflicts = [f"{k}={v!r} -> {values[k]!r}" for k, v in _current(cfg).items()  # type: ignore[literal-required]
                     if v != defaults[k] and v != values[k]]  # type: ignore[literal-required]
        if cfg.optimizer.type != "adamw":  # optim=adamw_torch (check_arguments): decoupled weight decay
            conflicts.append(f"optimizer.type={cfg.optimizer.type!r} -> 'adamw'")
            cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, type="adamw"))
        if conflicts:
            logger.warning("engine config: TrainingArguments win over the engine config's %s", ", ".join(conflicts))
    cfg = _with_values(cfg, values)
    if cfg.device == "auto" and args.use_cpu:
        cfg = dataclasses.replace(cfg, device="cpu")  # use_cpu=True: no CUDA even when one is there
    batches_on = args.device.type  # where the Trainer's _prepare_inputs puts every batch
    if (cfg.device == "cpu" and batches_on == "cuda") or (cfg.device.startswith("cuda") and batches_on == "cpu"):
        raise ConfigError(f"the engine computes on {cfg.device!r} but the Trainer puts batches on {batches_on!r}: "
                          "use the same device (use_cpu=True for the CPU, or the engine's device 'auto')", "device")
    return cfg


def check_arguments(args: TrainingArguments) -> None:
    """Refuses, in one error naming each, the arguments whose meaning the engine cannot keep."""
    problems = []
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in ADAMW_OPTIMS:
        problems.append(f"optim={optim!r} (the engine's fused CPU AdamW stands in for {' / '.join(ADAMW_OPTIMS)})")
    if args.optim_args:
        problems.append(f"optim_args={args.optim_args!r}")
    if args.torch_compile:
        problems.append("torch_compile=True (compiled graphs bypass the streaming hooks)")
    if args.fsdp:
        problems.append(f"fsdp={args.fsdp!r} (the engine partitions like ZeRO-3 itself)")
    if args.world_size > 1 or args.n_gpu > 1:
        problems.append(f"world_size={args.world_size}, n_gpu={args.n_gpu} (one process, one device)")
    if getattr(args, "deepspeed_plugin", None) is not None:
        problems.append("deepspeed= with plain TrainingArguments (DeepSpeed itself would run): use "
                        "engine.integrations.transformers.OffloadTrainingArguments, or pass engine_config=")
    if args.load_best_model_at_end:
        problems.append("load_best_model_at_end=True (it loads weights into the model behind the engine)")
    if args.auto_find_batch_size:
        problems.append("auto_find_batch_size=True (a retry after an out-of-memory error would restart the loop "
                        "inside an accumulation window the engine holds)")
    if args.fp16_full_eval or args.bf16_full_eval:
        problems.append("fp16_full_eval/bf16_full_eval (evaluation runs in the engine's dtype)")
    if problems:
        raise ConfigError("TrainingArguments not supported by the engine-backed Trainer: " + "; ".join(problems),
                          "TrainingArguments")
