"""A drop-in for ``deepspeed.initialize`` scripts: ``import engine.deepspeed_compat as deepspeed``.

``initialize`` takes DeepSpeed's arguments and config (ZeRO-3 ``offload_param`` /
``offload_optimizer`` to NVMe, ``optimizer``, ``scheduler``, batch sizes, ``gradient_clipping``,
fp16/bf16) and returns ``(model_engine, optimizer, training_dataloader, lr_scheduler)`` over
the engine (:class:`DeepSpeedCompatEngine` wrapping :func:`engine.initialize`'s Trainer).
One process only (no ``torch.distributed`` yet); the optimizer is always the engine's NVMe
one, built from the config's ``"optimizer"`` section.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..api import initialize as engine_initialize
from ..errors import ConfigError
from . import lr_schedules
from .lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR
from .model_engine import DeepSpeedCompatEngine
from .settings import config_source, read, resolve

__all__ = ["DeepSpeedCompatEngine", "TrainingDataLoader", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR",
           "add_config_arguments", "init_distributed", "initialize", "lr_schedules"]


def _single_process(what: str) -> None:
    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1"):
        raise ConfigError(f"{what}: WORLD_SIZE={world}, but the engine trains in one process (multi-process "
                          "training is not supported yet); run the script with plain python", "WORLD_SIZE")


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's command-line arguments: ``--deepspeed``, ``--deepspeed_config`` (and the
    deprecated ``--deepscale``/``--deepscale_config``)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true", help="enable DeepSpeed (accepted)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed JSON configuration file")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser


def init_distributed(*args: Any, **kwargs: Any) -> None:
    """Accepted for scripts that call it; checks that this is one process (nothing to set up)."""
    _single_process("init_distributed")


def _trainable_set(model: nn.Module, model_parameters: Optional[Iterable[Any]]
                   ) -> tuple[list[nn.Parameter], Optional[list[dict[str, Any]]]]:
    """Applies ``model_parameters``, DeepSpeed's "what the optimizer updates": parameters of the
    model that are not named are frozen (``requires_grad=False``: not updated, as in DeepSpeed);
    named parameters that are already frozen stay so (ZeRO optimizes ``requires_grad`` ones only).
    Param-group dicts may set ``lr`` / ``weight_decay`` (over the config's, as in DeepSpeed).
    Returns the parameters it froze, and the param groups for the engine (None: one group)."""
    if model_parameters is None:
        return [], None
    named: set[int] = set()
    groups: list[dict[str, Any]] = []
    loose: list[torch.Tensor] = []  # tensors outside any dict: the config's values
    for item in model_parameters:
        if isinstance(item, dict):  # a param group
            params = item.get("params", [])
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            named.update(id(p) for p in params)
            groups.append({**item, "params": params})
        elif isinstance(item, torch.Tensor):
            named.add(id(item))
            loose.append(item)
        else:
            raise ConfigError(f"model_parameters must be tensors or param-group dicts, got {type(item).__name__}",
                              "model_parameters")
    own = {id(p) for p in model.parameters()}
    foreign = named - own
    if foreign:
        raise ConfigError(f"model_parameters: {len(foreign)} tensor(s) are not parameters of the model",
                          "model_parameters")
    frozen = [p for p in model.parameters() if id(p) not in named and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    if not any(set(g) - {"params"} for g in groups):
        return frozen, None  # no per-group options: one group with the config's values
    if loose:
        groups.append({"params": loose})
    for g in groups:  # parameters the caller had frozen stay out of the optimizer
        g["params"] = [p for p in g["params"] if p.requires_grad]
    return frozen, groups


def _scheduler(lr_scheduler: Any, section: Any, optimizer: torch.optim.Optimizer) -> Any:
    """DeepSpeed's order: a client scheduler (a callable gets the optimizer), else the config's."""
    if lr_scheduler is None:
        return lr_schedules.from_config(optimizer, section) if section is not None else None
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler) or not callable(lr_scheduler):
        target = getattr(lr_scheduler, "optimizer", None)
        if target is not None and target is not optimizer:
            raise ConfigError("lr_scheduler was built on another optimizer; pass a callable "
                              "(lambda opt: torch.optim.lr_scheduler.X(opt, ...)) or a config 'scheduler' section: "
                              "it must act on the engine's optimizer", "lr_scheduler")
        return lr_scheduler
    return lr_scheduler(optimizer)


class TrainingDataLoader(torch.utils.data.DataLoader):
    """A torch DataLoader with DeepSpeed's ``data_sampler`` attribute (``DeepSpeedDataLoader``'s
    sampler: scripts call ``loader.data_sampler.set_epoch(epoch)``); None for an IterableDataset."""

    def __init__(self, dataset: Any, sampler: Optional[torch.utils.data.Sampler], **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.data_sampler = sampler


def _dataloader(dataset: Any, engine: DeepSpeedCompatEngine, collate_fn: Optional[Callable]) -> Any:
    """DeepSpeed's training loader, one process: a ``DistributedSampler`` over 1 replica
    (shuffled with seed 0; the same order every epoch unless the script calls
    ``loader.data_sampler.set_epoch(epoch)``), micro-batch size, ``dataloader_drop_last``; no worker
    processes (DeepSpeed starts 2 per GPU) and pinned memory only when computing on CUDA."""
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if not iterable and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):  # DeepSpeed's test
        raise ConfigError(f"training_data must be a torch Dataset (map-style: __getitem__ and __len__, e.g. a "
                          f"datasets.Dataset; or an IterableDataset), got {type(dataset).__name__}", "training_data")
    sampler: Optional[torch.utils.data.Sampler] = None
    if not iterable:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0)
    return TrainingDataLoader(dataset, sampler, batch_size=engine.train_micro_batch_size_per_gpu(),
                              collate_fn=collate_fn, drop_last=engine.settings.drop_last,
                              pin_memory=engine.device.type == "cuda")


def initialize(args: Any = None, model: Optional[nn.Module] = None, optimizer: Any = None,
               model_parameters: Optional[Iterable[Any]] = None, training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: Any = None, mpu: Any = None, dist_init_required: Optional[bool] = None,
               collate_fn: Optional[Callable] = None, config: Any = None, mesh_param: Any = None,
               config_params: Any = None) -> tuple[DeepSpeedCompatEngine, torch.optim.Optimizer, Any, Any]:
    """``deepspeed.initialize`` over the engine; returns ``(model_engine, optimizer,
    training_dataloader, lr_scheduler)`` (the loader None without ``training_data``, the
    scheduler None without ``lr_scheduler`` or a config ``"scheduler"``).

    ``optimizer`` must be None: the engine's optimizer keeps its state on NVMe and is built from
    the config's ``"optimizer"`` section (a torch optimizer or a callable is refused, with its
    hyper-parameters in the message). ``lr_scheduler``: a callable ``f(optimizer)`` (or a
    scheduler already on the returned optimizer); otherwise the config's ``"scheduler"``
    (WarmupLR, WarmupDecayLR, WarmupCosineLR, or a ``torch.optim.lr_scheduler`` name).
    ``model_parameters``: the parameters to train; the model's others are frozen.
    ``mpu``/``mesh_param`` (model parallelism) are refused; ``distributed_port`` and
    ``dist_init_required`` are accepted and unused (one process)."""
    if model is None:
        raise ConfigError("initialize requires a model", "model")
    _single_process("initialize")
    if mpu is not None or mesh_param is not None:
        raise ConfigError("mpu / mesh_param (model or sequence parallelism) are not supported: one process",
                          "mpu")
    if optimizer is not None:
        hints = ""
        if isinstance(optimizer, torch.optim.Optimizer):
            group = optimizer.param_groups[0]
            hints = " (this one: " + ", ".join(f"{k}={group[k]!r}" for k in ("lr", "betas", "eps", "weight_decay")
                                                 if k in group) + ")"
        raise ConfigError(f"optimizer={type(optimizer).__name__}: a client optimizer is not supported - the engine's "
                          "optimizer keeps its state on NVMe. Pass optimizer=None and put the hyper-parameters in the "
                          f'config: "optimizer": {{"type": "AdamW", "params": {{"lr": ..., "betas": ..., '
                          f'"eps": ..., "weight_decay": ...}}}}{hints}', "optimizer")
    settings = resolve(read(config_source(args, config, config_params)))
    if args is not None and hasattr(args, "local_rank"):
        args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # as DeepSpeed aligns it
    frozen, param_groups = _trainable_set(model, model_parameters)
    try:
        trainer = engine_initialize(model, settings.config, param_groups=param_groups)
        try:
            scheduler = _scheduler(lr_scheduler, settings.scheduler, trainer.optimizer)
            model_engine = DeepSpeedCompatEngine(trainer, settings, scheduler)
            loader = _dataloader(training_data, model_engine, collate_fn) if training_data is not None else None
        except BaseException:
            trainer.close(restore_weights=True)  # the model goes back to the caller as it was
            raise
    except BaseException:
        for p in frozen:  # ... and as trainable as it came, whichever step failed
            p.requires_grad_(True)
        raise
    model_engine.training_dataloader = loader
    return model_engine, trainer.optimizer, loader, scheduler
