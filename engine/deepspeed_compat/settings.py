"""What ``deepspeed.initialize`` reads from its config, resolved the way DeepSpeed resolves it.

The config comes from ``config``, ``config_params`` (DeepSpeed's older alias) or
``args.deepspeed_config`` (what ``add_config_arguments`` parses), as a dict or a JSON path.
The keys the engine's :class:`~engine.config.Config` has no field for but a DeepSpeed script
relies on - the batch sizes, ``"scheduler"``, ``dataloader_drop_last`` - are taken here; the
rest goes to :meth:`Config.load`, which translates DeepSpeed JSON (:mod:`engine.ds_config`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

from ..config import Config
from ..errors import ConfigError
from ..validate import check_bool, check_int, is_auto

# Keys this package consumes; Config.load never sees them (engine.initialize on the same JSON
# still names "scheduler" as not honoured: there nothing would step it).
_OWN_KEYS = ("scheduler", "dataloader_drop_last", "train_batch_size", "train_micro_batch_size_per_gpu")


@dataclasses.dataclass(frozen=True)
class Settings:
    config: Config                      # the engine's
    micro_batch: int                    # train_micro_batch_size_per_gpu
    gradient_accumulation_steps: int
    train_batch: int                    # micro_batch * gradient_accumulation_steps * world size (1)
    scheduler: Optional[Mapping[str, Any]]
    drop_last: bool


def config_source(args: Any, config: Any, config_params: Any) -> Any:
    """The config argument DeepSpeed would use: ``config``, else ``config_params``, else
    ``args.deepspeed_config`` (``args.deepscale_config``, its deprecated name); two at once is an error."""
    if config is None:
        config = config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None:
        if config is not None:
            raise ConfigError("a DeepSpeed config was given both as args.deepspeed_config and as config=: give one",
                              "config")
        config = from_args
    if config is None:
        raise ConfigError("DeepSpeed needs a config: pass config= (a dict or a JSON path) or --deepspeed_config "
                          "(add_config_arguments(parser) adds it)", "config")
    return config


def read(source: Any) -> dict:
    """A DeepSpeed config as a dict: ``source`` itself or the JSON file it names."""
    if isinstance(source, Config):
        raise ConfigError("engine.deepspeed_compat.initialize takes a DeepSpeed config (dict or JSON path); "
                          "an engine.Config goes to engine.initialize", "config")
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"config must be a dict or a JSON path, got {type(source).__name__}", "config")
    path = os.fspath(source)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read DeepSpeed config file {path!r}: {exc.strerror}", "config") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON: {exc}", "config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path!r} must hold a JSON object at the top level", "config")
    return data


def _autos(value: Any, path: str) -> list[str]:
    if is_auto(value):
        return [path]
    if isinstance(value, Mapping):
        return [p for k, v in value.items() for p in _autos(v, f"{path}.{k}" if path else str(k))]
    return []


def _batch_sizes(ds: Mapping[str, Any]) -> tuple[int, int, int]:
    """(train batch, micro batch, accumulation) from the ones given, as DeepSpeed derives them
    (world size 1): any two give the third; all three must agree; one alone means no accumulation."""
    def given(key: str) -> Optional[int]:
        value = ds.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return None if value is None else check_int(key, value)

    train, micro, gas = given("train_batch_size"), given("train_micro_batch_size_per_gpu"), \
        given("gradient_accumulation_steps")
    if train is not None and micro is not None and gas is not None:
        if train != micro * gas:
            raise ConfigError(f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x "
                              f"gradient_accumulation_steps {gas} x world size 1", "train_batch_size")
    elif train is not None and micro is not None:
        gas = train // micro
    elif train is not None and gas is not None:
        micro = train // gas
    elif micro is not None:
        gas = gas or 1
    elif train is not None:
        micro, gas = train, 1
    else:
        raise ConfigError("DeepSpeed config: give train_batch_size or train_micro_batch_size_per_gpu",
                          "train_micro_batch_size_per_gpu")
    if micro < 1 or gas < 1 or micro * gas != (train if train is not None else micro * gas):
        raise ConfigError(f"train_batch_size {train} is not a multiple of the micro batch x accumulation "
                          f"({micro} x {gas})", "train_batch_size")
    return micro * gas, micro, gas


def resolve(ds: Mapping[str, Any]) -> Settings:
    """The engine Config and the script-side settings of DeepSpeed config ``ds``.

    ``"auto"`` is refused anywhere, as DeepSpeed itself refuses it: only its Hugging Face
    integration fills ``"auto"`` (from ``TrainingArguments``), and a ``deepspeed.initialize``
    script has no TrainingArguments."""
    autos = _autos(ds, "")
    if autos:
        raise ConfigError(f"DeepSpeed config: 'auto' is filled only by the Hugging Face Trainer integration "
                          f"(as in DeepSpeed); write values for {', '.join(autos)}", autos[0])
    train, micro, gas = _batch_sizes(ds)
    drop_last = check_bool("dataloader_drop_last", ds.get("dataloader_drop_last", False))
    rest = {k: v for k, v in ds.items() if k not in _OWN_KEYS}
    rest["gradient_accumulation_steps"] = gas
    if not isinstance(rest.get("optimizer"), Mapping):
        raise ConfigError("DeepSpeed config: no 'optimizer' section; the engine's optimizer is built from it "
                          '(e.g. "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}})', "optimizer")
    config = Config.from_deepspeed(rest)
    return Settings(config=config, micro_batch=micro, gradient_accumulation_steps=gas, train_batch=train,
                    scheduler=ds.get("scheduler"), drop_last=drop_last)
