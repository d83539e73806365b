"""``DeepSpeedCompatEngine``: DeepSpeed's ``DeepSpeedEngine`` API over an :class:`engine.Trainer`.

What a ``deepspeed.initialize`` script calls on its ``model_engine``, with DeepSpeed's meaning
(deepspeedai/DeepSpeed ``deepspeed/runtime/engine.py``): ``step()`` after every micro-batch,
the optimizer and then the LR scheduler at the accumulation boundary (the scheduler not when
the step was skipped on a non-finite gradient); ``global_steps`` counts boundaries, skipped
ones included; checkpoints are the engine's own (safetensors + JSON, never pickle).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn

from .._log import logger
from ..checkpoint.private import PrivateOutput, check_name
from ..errors import CheckpointError, ConfigError
from ..trainer import Trainer
from .lr_schedules import check_step_kwargs
from .settings import Settings


def _refuse(option: str, why: str) -> CheckpointError:
    return CheckpointError(f"{option} is not supported: {why}")


class DeepSpeedCompatEngine:
    """The ``model_engine`` of ``engine.deepspeed_compat.initialize``; ``trainer`` is the engine's Trainer."""

    def __init__(self, trainer: Trainer, settings: Settings, lr_scheduler: Any = None):
        self.trainer = trainer
        self.settings = settings
        self.lr_scheduler = lr_scheduler
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # what DeepSpeed's launcher sets
        self.training_dataloader: Optional[torch.utils.data.DataLoader] = None

    # ------------------------------------------------------------------ the model
    @property
    def module(self) -> nn.Module:
        return self.trainer.module

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.optimizer

    @property
    def device(self) -> torch.device:
        """The compute device (``config.device``; DeepSpeed's is the launcher's GPU)."""
        return self.trainer.runtime.device.device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.trainer(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.trainer(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.trainer.train(mode)

    def eval(self) -> None:
        self.trainer.eval()

    # ------------------------------------------------------------------ the step
    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backpropagates ``loss / gradient_accumulation_steps()`` and returns that value, as
        DeepSpeed does (``scale_wrt_gas=False``: ``loss`` as it is, the caller has scaled it)."""
        if retain_graph:
            raise ConfigError("backward(retain_graph=True) is not supported: the engine frees each unit's weights "
                              "after its backward", "retain_graph")
        self.trainer.backward(loss, scale_wrt_gas=scale_wrt_gas)
        return loss.detach() / self.gradient_accumulation_steps() if scale_wrt_gas else loss.detach()

    def step(self, lr_kwargs: Optional[dict] = None) -> None:
        """Call after every micro-batch. At the accumulation boundary the optimizer steps and then,
        when the step was applied (not skipped on a non-finite gradient), the LR scheduler, given
        ``lr_kwargs`` (e.g. DeepSpeed's ``{"last_batch_iteration": n}``). ``lr_kwargs`` are checked
        first: a bad one is a ConfigError with nothing stepped. Without a scheduler they are
        unused, as in DeepSpeed."""
        if lr_kwargs is not None and not isinstance(lr_kwargs, dict):
            raise ConfigError(f"step(lr_kwargs=...) must be a dict, got {type(lr_kwargs).__name__}", "lr_kwargs")
        if lr_kwargs and self.lr_scheduler is not None:
            check_step_kwargs(self.lr_scheduler, lr_kwargs)
        applied = self.trainer.global_steps
        self.trainer.step()
        if self.trainer.global_steps != applied and self.lr_scheduler is not None:
            self.lr_scheduler.step(**(lr_kwargs or {}))

    def zero_grad(self) -> None:
        """Gradients live with the engine's gradient sink; each window overwrites them (nothing to do)."""
        self.trainer.zero_grad()

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the current micro-batch (the next ``step()``) ends the accumulation window."""
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    # ------------------------------------------------------------------ counters and values
    @property
    def global_steps(self) -> int:
        """Accumulation boundaries reached, skipped steps included (DeepSpeed's count)."""
        return self.trainer.global_steps + self.trainer.skipped_steps

    @property
    def global_samples(self) -> int:
        return self.global_steps * self.train_batch_size()

    @property
    def micro_steps(self) -> int:
        return self.trainer.micro_steps

    @property
    def skipped_steps(self) -> int:
        return self.trainer.skipped_steps

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.settings.micro_batch

    def gradient_accumulation_steps(self) -> int:
        return self.settings.gradient_accumulation_steps

    def train_batch_size(self) -> int:
        return self.settings.train_batch

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> Optional[float]:
        """The gradient norm of the last optimizer step (before clipping); None before the first."""
        return self.trainer.last_grad_norm

    def memory_report(self) -> dict:
        return self.trainer.memory_report()

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self, save_dir: Union[str, "os.PathLike[str]"], tag: Optional[str] = None,
                        client_state: Optional[dict] = None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False) -> bool:
        """The engine's checkpoint under ``save_dir/<tag>`` (default ``global_step<N>``, as DeepSpeed)
        with the LR scheduler's state and ``client_state`` (JSON values); every checkpoint is kept
        (DeepSpeed keeps all). ``save_latest=False`` is refused: the engine's ``latest`` always
        moves to the newest complete checkpoint (its crash-safety protocol)."""
        if not save_latest:
            raise _refuse("save_checkpoint(save_latest=False)", "the engine always points 'latest' at the newest "
                          "complete checkpoint; load older ones with load_checkpoint(dir, tag=...)")
        if exclude_frozen_parameters:
            raise _refuse("save_checkpoint(exclude_frozen_parameters=True)", "the engine's checkpoint holds the "
                          "complete training state; for adapters only use trainer.save_adapter")
        tag = f"global_step{self.global_steps}" if tag is None else str(tag)
        self.trainer.save_checkpoint(os.fspath(save_dir), client_state or {}, tag=tag,
                                     lr_scheduler=self.lr_scheduler, keep_last=0)
        return True

    def load_checkpoint(self, load_dir: Union[str, "os.PathLike[str]"], tag: Optional[str] = None,
                        load_module_strict: bool = True, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False,
                        custom_load_fn: Any = None) -> tuple[Optional[str], Optional[dict]]:
        """Restores a :meth:`save_checkpoint` and returns ``(path, client_state)``. Without ``tag``
        and without ``load_dir/latest`` it returns ``(None, None)`` as DeepSpeed does (nothing to
        resume). The engine restores the complete state: the options that would load part of it
        (``load_optimizer_states=False``, ``load_module_only=True``, ``load_module_strict=False``,
        ``custom_load_fn``) are refused; ``load_lr_scheduler_states=False`` keeps the scheduler as it is."""
        for bad, option in ((not load_module_strict, "load_module_strict=False"),
                            (not load_optimizer_states, "load_optimizer_states=False"),
                            (load_module_only, "load_module_only=True"),
                            (custom_load_fn is not None, "custom_load_fn")):
            if bad:
                raise _refuse(f"load_checkpoint({option})", "the engine restores the complete training state "
                              "(weights, optimizer moments, counters), checked against its manifest; to start "
                              "from weights only, build the model from a save_16bit_model directory")
        load_dir = os.fspath(load_dir)
        if tag is None and not os.path.isfile(os.path.join(load_dir, "latest")):
            return None, None
        scheduler = self.lr_scheduler if load_lr_scheduler_states else None
        path, client_state = self.trainer.load_checkpoint(load_dir, tag=tag, lr_scheduler=scheduler)
        return path, client_state

    def save_16bit_model(self, save_dir: Union[str, "os.PathLike[str]"], save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Writes the weights in the compute dtype as **safetensors**, never pickle: DeepSpeed's
        default ``pytorch_model.bin`` becomes Hugging Face's ``model.safetensors`` (sharded past 5GB,
        with ``config.json``: ``from_pretrained`` loads the directory); another ``save_filename``
        becomes ``<its stem>.safetensors``, one file (private, written atomically; an earlier file of
        that name is replaced, with a warning). Returns True. Several ranks: call it on every rank,
        as with DeepSpeed (partitioned state gathers each tensor; rank 0 writes)."""
        if exclude_frozen_parameters:
            raise _refuse("save_16bit_model(exclude_frozen_parameters=True)", "the export holds every weight; "
                          "for LoRA adapters only use model_engine.trainer.save_adapter")
        save_dir = os.fspath(save_dir)
        stem = os.path.splitext(os.path.basename(save_filename))[0]
        if save_filename == "pytorch_model.bin" or stem == "model":
            self.trainer.save_pretrained(save_dir)
            return True
        name = check_name(f"{stem}.safetensors", "save_16bit_model file name")
        if not self.trainer.runtime.distributed.is_main:
            # Another rank: it takes part in the gathers (partitioned state; replicated: returns at
            # once) and writes nothing - rank 0 does, as DeepSpeed's save_16bit_model on every rank.
            self.trainer.save_pretrained(save_dir, max_shard_size=2 ** 62)
            return True
        # The engine's one private writer: save_pretrained writes one shard into a subdirectory of
        # the output's private staging directory; the shard is renamed there and committed (0600,
        # fsync'ed, renamed into place; the directory fsync'ed when the output closes).
        with PrivateOutput(save_dir) as out:
            files = self.trainer.save_pretrained(out.path("stage"), max_shard_size=2 ** 62)
            shard = next(os.path.basename(f) for f in files if f.endswith(".safetensors"))
            os.replace(os.path.join("stage", shard), name, src_dir_fd=out.tmp_fd, dst_dir_fd=out.tmp_fd)
            if name in out.names():
                logger.warning("save_16bit_model: replacing %s", os.path.join(save_dir, name))
            out.commit(name)
        return True

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Releases the engine's pool, store and swap files (DeepSpeed has no equivalent; without
        it the swap files are still removed at interpreter exit)."""
        self.trainer.close()

    def __enter__(self) -> "DeepSpeedCompatEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.trainer.close()
