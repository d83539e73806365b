"""The Hugging Face ``Trainer`` (and TRL's trainers) over the engine.

``OffloadTrainer`` is ``transformers.Trainer`` with parameters, gradients and optimizer
states on NVMe; ``OffloadTrainerMixin`` gives the same to any ``Trainer`` subclass
(``class MySFT(OffloadTrainerMixin, trl.SFTTrainer)``). What changes, through the Trainer's
documented override points:

* ``create_optimizer`` builds the engine (:func:`engine.initialize`) and hands the Trainer an
  :class:`~engine.integrations.hf_optimizer.EngineStepOptimizer` over the engine optimizer's
  ``param_groups`` (the Trainer's LR scheduler acts on them);
* ``training_step`` runs the subclass chain's own step (loss normalization exactly as
  transformers does it: ``num_items_in_batch`` or the window length) with ``accelerator.backward``
  routed to the engine's ``backward(loss, scale_wrt_gas=False)``, tells the engine where the
  loop's accumulation window ends (``accelerator.sync_gradients``: an epoch's short last window
  too) and calls the engine's ``step()``; the loop's clip / ``optimizer.step()`` / ``zero_grad``
  then find the work done (``_clip_grad_norm`` returns the engine's pre-clip norm);
* the model is never moved, cast or wrapped (``_move_model_to_device`` is a no-op, the
  accelerator is built with ``device_placement=False`` and ``mixed_precision="no"``: the
  engine places weights and computes in ``Config.dtype``);
* checkpoints: the engine checkpoint in ``checkpoint-N/engine``; ``save_model`` writes
  safetensors through the engine (``save_adapter`` for LoRA) and ``training_args.json``.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator, Optional, Union

import torch
import transformers
from accelerate.utils import TorchDynamoPlugin
from torch import nn

from .. import api
from .._log import logger
from ..checkpoint.private import PrivateOutput, json_bytes
from ..checkpoint.slots import partition_of
from ..config import Config
from ..errors import CheckpointError, ConfigError, TrainerClosedError
from ..peft import LoraLinear, is_peft_model
from ..trainer import Trainer as EngineTrainer
from .hf_args import EngineConfigLike, OffloadTrainingArguments, check_arguments, resolve_config
from .hf_optimizer import EngineStepOptimizer

__all__ = ["ENGINE_CHECKPOINT_DIR", "OffloadTrainer", "OffloadTrainerMixin", "OffloadTrainingArguments"]

ENGINE_CHECKPOINT_DIR = "engine"  # inside the Trainer's checkpoint-N directory
ARGS_FILE = "training_args.json"  # instead of transformers' torch.save'd training_args.bin


class OffloadTrainerMixin:
    """Put before a ``transformers.Trainer`` subclass: ``class T(OffloadTrainerMixin, SFTTrainer)``.

    ``engine_config``: an engine :class:`~engine.config.Config`, a dict or a JSON/YAML path, in
    the engine's format or DeepSpeed's (``"auto"`` resolved from ``TrainingArguments``); default:
    ``OffloadTrainingArguments(deepspeed=...)``'s file, else the engine's defaults. The
    arguments' accumulation, clipping, AdamW hyper-parameters and dtype always apply
    (:func:`~engine.integrations.hf_args.resolve_config`). ``engine_initializer``: for a model on
    the meta device, ``initializer(name, shape) -> tensor`` (see :func:`engine.initialize`).
    The engine is :attr:`engine` once built (first ``train``/``evaluate``/``create_optimizer``);
    it stays open after ``train()`` for ``evaluate``/``save_model``; :meth:`close` (or ``with``)
    releases it, as does garbage collection through the engine's own finalizer.
    ``engine_pretrained``: instead of ``model=``, a Hugging Face checkpoint directory loaded with
    :func:`engine.from_pretrained` (larger than DRAM is fine); the engine exists from the start."""

    # set by transformers.Trainer.__init__; declared for the type checker
    args: transformers.TrainingArguments
    model: Any
    optimizer: Any
    lr_scheduler: Any
    accelerator: Any
    processing_class: Any
    data_collator: Any

    def __init__(self, *args: Any, engine_config: EngineConfigLike = None,
                 engine_initializer: Optional[Callable[[str, tuple[int, ...]], torch.Tensor]] = None,
                 engine_pretrained: Union[str, "os.PathLike[str]", None] = None, **kwargs: Any):
        self.engine: Optional[EngineTrainer] = None
        self._engine_initializer = engine_initializer
        self._io_mark: tuple[float, int] = (time.perf_counter(), 0)
        if engine_pretrained is not None:
            args = self._open_pretrained(engine_pretrained, engine_config, args, kwargs)
        try:
            super().__init__(*args, **kwargs)
            self._check_construction()
            if self.engine is None:
                self.engine_config: Config = resolve_config(engine_config, self.args)
        except BaseException:
            self.close()  # an engine_pretrained engine already holds swap files and pinned memory
            raise
        logger.info("engine config from TrainingArguments: %s", self.engine_config)

    def _check_construction(self) -> None:
        """What the Trainer was given that the engine cannot honour, each a clear error."""
        check_arguments(self.args)
        if getattr(self, "model_init", None) is not None:
            raise ConfigError("model_init= cannot be used with the engine-backed Trainer (train() would replace the "
                              "engine's model): pass model= or engine_pretrained=", "model_init")
        if self.optimizer is not None:
            raise ConfigError("optimizers=(optimizer, ...) cannot be used with the engine-backed Trainer: the "
                              "engine runs its own AdamW (an LR scheduler may be given)", "optimizers")
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            raise ConfigError("optimizer_cls_and_kwargs= cannot be used with the engine-backed Trainer: the engine "
                              "runs its own AdamW over NVMe state (set its hyper-parameters in TrainingArguments)",
                              "optimizer_cls_and_kwargs")
        if self.engine is not None and self.model is not self.engine.module:
            raise ConfigError("the Trainer replaced the engine_pretrained model (e.g. wrapped it for a peft_config): "
                              "with peft, pass model= (the engine is then built over the wrapped model)",
                              "engine_pretrained")

    def _open_pretrained(self, path: Union[str, "os.PathLike[str]"], engine_config: EngineConfigLike,
                         args: tuple, kwargs: dict[str, Any]) -> tuple:
        """``engine_pretrained=``: the model comes from :func:`engine.from_pretrained` (built on the meta
        device, each tensor read from the safetensors straight into the store), before the Trainer
        sees it. Returns the positional arguments with the model in place."""
        given = kwargs.get("model", args[0] if args else None)
        if given is not None:
            raise ConfigError("pass either model= or engine_pretrained=, not both", "engine_pretrained")
        training = kwargs.get("args", args[1] if len(args) > 1 else None)
        if not isinstance(training, transformers.TrainingArguments):
            raise ConfigError("engine_pretrained= needs args=TrainingArguments(...) (the engine config is "
                              "resolved from them before the model is loaded)", "engine_pretrained")
        check_arguments(training)
        self.engine_config = resolve_config(engine_config, training)
        self.engine = api.from_pretrained(path, self.engine_config, param_groups=self._param_groups)
        if args:
            return (self.engine.module, *args[1:])
        kwargs["model"] = self.engine.module
        return args

    # ------------------------------------------------------------------ the engine
    def _ensure_engine(self) -> EngineTrainer:
        if self.engine is None:
            self.engine = api.initialize(self.model, self.engine_config, self._engine_initializer,
                                         param_groups=self._param_groups)
        self.engine.runtime.check_open("the Trainer")
        return self.engine

    def _param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """transformers.Trainer's two groups: weight decay for all but biases and norm weights."""
        decay = set(self.get_decay_parameter_names(model))  # type: ignore[attr-defined]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [n for n in names if n in decay], "weight_decay": self.engine_config.optimizer.weight_decay},
                {"params": [n for n in names if n not in decay], "weight_decay": 0.0}]

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Builds the engine over ``self.model`` and gives the Trainer its optimizer view."""
        engine = self._ensure_engine()
        if self.optimizer is None:
            self.optimizer = EngineStepOptimizer(engine)
        return self.optimizer

    def close(self) -> None:
        """Releases the engine (store, swap files, pinned pool); the model cannot run afterwards."""
        if self.engine is not None:
            self.engine.close()

    def __enter__(self) -> "OffloadTrainerMixin":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the step
    @contextlib.contextmanager
    def _backward_through(self, engine: EngineTrainer) -> Iterator[None]:
        """``accelerator.backward`` for the duration of one training_step: the engine's backward of the
        loss as the Trainer normalized it (accelerate runs with accumulation 1, so nothing else divides)."""
        def backward(loss: torch.Tensor, **kwargs: Any) -> None:
            if kwargs:
                raise ConfigError(f"accelerator.backward options {sorted(kwargs)} are not supported by the engine",
                                  "training_step")
            engine.backward(loss, scale_wrt_gas=False)

        self.accelerator.backward = backward
        try:
            yield
        finally:
            del self.accelerator.backward  # the instance attribute; the class's method shows again

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Union[torch.Tensor, int, None] = None) -> torch.Tensor:
        engine = self._ensure_engine()
        engine.set_window_end(bool(self.accelerator.sync_gradients))  # the loop's boundary, short windows too
        with self._backward_through(engine):
            loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        skipped = engine.skipped_steps
        engine.step()  # the optimizer runs here at the window's last micro-batch
        self._report_skipped(engine.skipped_steps > skipped)
        return loss

    def _report_skipped(self, skipped: bool) -> None:
        """An fp16 step the engine's loss scaler skipped must not advance the LR scheduler: the loop
        asks ``accelerator.optimizer_step_was_skipped``, which reads the prepared optimizer's
        overflow flag (set by accelerate's GradScaler path, unused here: mixed_precision is "no")."""
        if self.accelerator.sync_gradients and hasattr(self.optimizer, "_is_overflow"):
            self.optimizer._is_overflow = skipped

    def _clip_grad_norm(self, model: nn.Module) -> Optional[float]:
        """The engine clipped at its step (``gradient_clipping`` = ``max_grad_norm``): its pre-clip norm."""
        return self._ensure_engine().last_grad_norm

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Optional[float]:
        return self._ensure_engine().last_grad_norm if grad_norm is None else grad_norm

    def _move_model_to_device(self, model: nn.Module, device: torch.device) -> None:
        """The engine places the weights (streamed, resident or on the compute device): never ``model.to``."""

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)  # type: ignore[misc]
        # accelerate must not move the model or its inputs, nor autocast / GradScale it: the engine does.
        # Nor compile it: without torch_compile accelerate still takes ACCELERATE_DYNAMO_BACKEND from
        # the environment (accelerate launch sets it), and dynamo cannot trace streamed weights.
        args.update(device_placement=False, mixed_precision="no", dynamo_plugin=TorchDynamoPlugin(backend="no"))
        return args

    # ------------------------------------------------------------------ logging, evaluation
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.engine is not None and "loss" in logs and self.engine.runtime.poisoned is None:
            logs.update(self._engine_metrics())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _engine_metrics(self) -> dict[str, float]:
        """Peak RSS (GB) and NVMe throughput (GB/s, reads + writes over the wall time since the last log)."""
        try:
            report = self._ensure_engine().memory_report()
        except TrainerClosedError:
            return {}
        now, moved = time.perf_counter(), int(report["bytes_read"]) + int(report["bytes_written"])
        then, before = self._io_mark
        self._io_mark = (now, moved)
        return {"engine_peak_rss_gb": report["peak_rss_bytes"] / 1e9,
                "engine_nvme_gbps": (moved - before) / 1e9 / max(now - then, 1e-9)}

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._io_mark = (time.perf_counter(), self._bytes_moved())  # NVMe rates count from here
        return super().train(*args, **kwargs)  # type: ignore[misc]

    def _bytes_moved(self) -> int:
        if self.engine is None or self.engine.runtime.closed:
            return 0
        report = self.engine.memory_report()
        return int(report["bytes_read"]) + int(report["bytes_written"])

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._ensure_engine()  # evaluation runs with the weights streamed, before train() too
        return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        self._ensure_engine()
        return super().predict(*args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ checkpoints and export
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The engine checkpoint (weights, masters, moments, counters, the HF LR scheduler) in ``output_dir/engine``."""
        self._ensure_engine().save_checkpoint(os.path.join(output_dir, ENGINE_CHECKPOINT_DIR),
                                              lr_scheduler=self.lr_scheduler, keep_last=0)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """Restores the engine checkpoint; RNG states are the Trainer's (``rng_state.pth``, restored by it
        where the plain Trainer restores them)."""
        if checkpoint is None:
            return
        self._ensure_engine().load_checkpoint(self._engine_checkpoint(checkpoint), lr_scheduler=self.lr_scheduler,
                                              load_rng=False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """The weights come with the engine checkpoint (:meth:`_load_optimizer_and_scheduler`, once the
        engine exists); here the directory is only checked."""
        self._engine_checkpoint(resume_from_checkpoint)

    @staticmethod
    def _engine_checkpoint(checkpoint: str) -> str:
        path = os.path.join(checkpoint, ENGINE_CHECKPOINT_DIR)
        if not os.path.isdir(path):
            hint = ("it was saved with save_only_model=True, which keeps no optimizer or engine state: resume "
                    "from a checkpoint saved without it, or start from its model.safetensors with engine_pretrained="
                    if os.path.isfile(os.path.join(checkpoint, "trainer_state.json"))
                    else "resume only from checkpoints an engine-backed Trainer saved")
            raise CheckpointError(f"{checkpoint!r} holds no engine checkpoint ({ENGINE_CHECKPOINT_DIR}/): {hint}")
        return path

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """HF safetensors from the engine (the adapters only, for LoRA), tokenizer, ``training_args.json``."""
        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        # transformers calls _save on every rank. With partitioned state the engine's export is
        # collective (every rank gathers, rank 0 writes): every rank takes part, only the saving
        # one writes the rest.
        collective = self.engine is not None and not self.engine.runtime.closed and \
            partition_of(self.engine.runtime) is not None
        if not self.args.should_save and not collective:
            return
        if state_dict is not None:
            raise ConfigError("save with an explicit state_dict is not supported: the weights live in the engine",
                              "state_dict")
        # (no rank-0-only step before the collective export: a failure there would leave the other
        # ranks waiting in its gathers; the export makes the directory on rank 0 itself)
        if self.engine is None:  # not trained yet: the in-memory model, as transformers saves it (safetensors)
            self.model.save_pretrained(output_dir)
        elif is_peft_model(self.model) or any(isinstance(m, LoraLinear) for m in self.model.modules()):
            self.engine.save_adapter(output_dir)
        else:
            self.engine.save_pretrained(output_dir)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        tokenizer = self.processing_class if self.processing_class is not None else \
            getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        with PrivateOutput(output_dir) as out:  # 0600, replaced atomically; never a pickle
            out.write(ARGS_FILE, json_bytes(self.args.to_dict()))


class OffloadTrainer(OffloadTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with the engine underneath (see :class:`OffloadTrainerMixin`)."""
