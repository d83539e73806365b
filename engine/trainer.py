"""The user-facing Trainer: the model plus DeepSpeed's engine API, over an offload runtime.

:class:`Trainer` is what :func:`engine.initialize` and :func:`engine.from_pretrained` return.
The training step itself - fetch, forward, backward, gradient out, optimizer, refresh - is
:class:`~engine.offload.runtime.OffloadRuntime` (``trainer.runtime``); this class adds what
sits above the runtime: checkpoints (:mod:`engine.checkpoint.state`), Hugging Face export
(:mod:`engine.checkpoint.hf`) and LoRA adapters (:mod:`engine.peft`), each given the
runtime's public surface (peft is given the Trainer itself: it only needs ``.module`` and
``.weight``/``.parameter``, which both classes have).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .checkpoint.hf import save_pretrained
from .checkpoint.state import load_checkpoint, save_checkpoint
from .config import Config
from .memory.profiler import phase as profile_phase
from .offload.materialize import Initializer
from .offload.optimizer import OffloadedOptimizer
from .offload.param_groups import ParamGroupsLike
from .offload.planner import MemoryPlan
from .offload.runtime import OffloadRuntime
from .peft import merge_and_export, save_adapter


def _attribute(name: str) -> property:
    """A runtime attribute read and written through the facade (checkpoint loads set the counters;
    the other attributes were plain ones of the Trainer and stay assignable)."""
    return property(lambda self: getattr(self.runtime, name),
                    lambda self, value: setattr(self.runtime, name, value),
                    doc=f"The runtime's ``{name}``.")


def _view(name: str) -> property:
    return property(lambda self: getattr(self.runtime, name), doc=f"The runtime's ``{name}``.")


class Trainer:
    """Returned by :func:`engine.initialize`. Use it like the model plus DeepSpeed's engine API."""

    def __init__(self, model: nn.Module, config: Config, initializer: Optional[Initializer] = None, *,
                 buffer_initializer: Optional[Initializer] = None, param_groups: ParamGroupsLike = None):
        self.runtime = OffloadRuntime(model, config, initializer, buffer_initializer=buffer_initializer,
                                      param_groups=param_groups)
        self.pretrained_path: Optional[str] = None  # set by engine.from_pretrained

    # ------------------------------------------------------------------ the runtime's state
    config: Config = _attribute("config")  # type: ignore[assignment]
    module: nn.Module = _attribute("module")  # type: ignore[assignment]
    plan: MemoryPlan = _attribute("plan")  # type: ignore[assignment]
    optimizer: OffloadedOptimizer = _attribute("optimizer")  # type: ignore[assignment]
    scaler = _attribute("scaler")
    compute_dtype: torch.dtype = _attribute("compute_dtype")  # type: ignore[assignment]
    frozen_dtype: torch.dtype = _attribute("frozen_dtype")  # type: ignore[assignment]
    mixed: bool = _attribute("mixed")  # type: ignore[assignment]
    gradient_accumulation_steps: int = _view("gradient_accumulation_steps")  # type: ignore[assignment]
    loss_scale: float = _view("loss_scale")  # type: ignore[assignment]
    micro_steps: int = _attribute("micro_steps")  # type: ignore[assignment]
    global_steps: int = _attribute("global_steps")  # type: ignore[assignment]
    skipped_steps: int = _attribute("skipped_steps")  # type: ignore[assignment]
    last_grad_norm: Optional[float] = _attribute("last_grad_norm")  # type: ignore[assignment]

    # ------------------------------------------------------------------ training API
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.forward(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *, scale_wrt_gas: bool = True) -> None:
        """Backpropagates ``loss / gradient_accumulation_steps`` (times the fp16 loss scale);
        ``scale_wrt_gas=False``: ``loss`` as given (already normalized over the window)."""
        self.runtime.backward(loss, scale_wrt_gas=scale_wrt_gas)

    def set_window_end(self, last: bool) -> None:
        """Whether the next micro-batch closes its accumulation window (see
        :meth:`OffloadRuntime.set_window_end`): for loops that end windows early."""
        self.runtime.set_window_end(last)

    def step(self) -> None:
        """Call after every micro-batch; the optimizer runs at the accumulation boundary.

        Like ``torch.optim``, which skips parameters without a gradient: a ``step()`` with no
        gradient since the previous one (no ``backward()``) changes nothing and counts nothing."""
        self.runtime.step()

    def zero_grad(self) -> None:
        """Gradients live with the gradient sink and are overwritten by the next window's first micro-batch."""

    def train(self, mode: bool = True) -> "Trainer":
        self.module.train(mode)
        return self

    def eval(self) -> "Trainer":
        return self.train(False)

    def parameter(self, name: str) -> torch.Tensor:
        """The current value of a trainable parameter (fp32 master when mixed precision)."""
        return self.runtime.parameter(name)

    def weight(self, name: str) -> torch.Tensor:
        """The current value of any parameter, trainable or frozen (see :meth:`OffloadRuntime.weight`)."""
        return self.runtime.weight(name)

    def memory_report(self) -> dict:
        """Backend, pool stats, peak RSS, bytes read/written and bandwidth, I/O wait vs compute time."""
        return self.runtime.memory_report()

    # ------------------------------------------------------------------ teardown
    def close(self, *, restore_weights: bool = False) -> None:
        """Detaches from the model, closes the store (removing swap files), the I/O ring and the pool.

        Everything is released even when a part fails; the first error is raised once, and later
        calls do nothing. By default the streamed weights go with the store and the model refuses
        to run (:class:`~engine.errors.TrainerClosedError`, never NaN); ``restore_weights=True``
        reads them back into the model first (costs the model's compute-dtype size in DRAM; with
        partitioned state every rank's shards are gathered, so every rank must call it)."""
        self.runtime.close(restore_weights=restore_weights)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.runtime.__exit__(exc_type, exc, tb)

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self, save_dir: str, client_state: Optional[dict] = None, *, tag: Optional[str] = None,
                        lr_scheduler: Any = None, keep_last: Optional[int] = None,
                        max_shard_size: Union[int, str] = "2GiB") -> str:
        """Saves the complete training state under ``save_dir/<tag>`` and points ``save_dir/latest`` at it.

        Weights, fp32 masters, Adam moments, step counters, loss scaler, optimizer param groups,
        ``lr_scheduler.state_dict()`` (when given), RNG states and ``client_state`` (JSON values,
        e.g. the data position), as safetensors shards plus ``manifest.json`` with CRC32Cs. Crash
        safe: written under a temporary name, fsync'ed, renamed; ``latest`` moves last. Keeps the
        ``keep_last`` newest checkpoints (default ``config.checkpoint_keep_last``; 0 keeps all).
        Call at an accumulation boundary. ``tag`` defaults to ``step-<global_steps>``. Returns
        the checkpoint's directory."""
        self.runtime.check_open("save_checkpoint")
        with profile_phase("checkpoint"):
            return save_checkpoint(self.runtime, save_dir, client_state, tag=tag, lr_scheduler=lr_scheduler,
                                   keep_last=keep_last, max_shard_size=max_shard_size)

    def load_checkpoint(self, load_dir: str, *, tag: Optional[str] = None, lr_scheduler: Any = None,
                        load_rng: bool = True, convert_dtype: bool = False) -> tuple[str, dict]:
        """Restores what :meth:`save_checkpoint` saved (``latest`` unless ``tag``; ``load_dir`` may
        also be a checkpoint directory itself) and returns ``(path, client_state)``.

        Every file and tensor is checked against the manifest's CRC32Cs; shape mismatches are
        listed in one error. A checkpoint saved with another ``dtype``/``optimizer_state_dtype`` is
        refused unless ``convert_dtype=True``. Pass the same kind of ``lr_scheduler`` to restore
        its state; ``load_rng=False`` leaves the RNGs alone."""
        self.runtime.check_open("load_checkpoint")
        with profile_phase("checkpoint"):
            loaded = load_checkpoint(self.runtime, load_dir, tag=tag, lr_scheduler=lr_scheduler, load_rng=load_rng,
                                     convert_dtype=convert_dtype)
        self.runtime.invalidate()  # the loaded state starts clean (idempotent after the loader's own)
        return loaded

    def save_pretrained(self, save_dir: str, *, max_shard_size: Union[int, str] = "5GB",
                        dtype: Optional[torch.dtype] = None) -> list[str]:
        """Writes the weights as Hugging Face sharded safetensors (``model.safetensors`` or
        ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) with ``config.json``,
        streamed from the store one tensor at a time. ``dtype``: export dtype (default: the
        model's compute dtype; ``torch.float32`` exports the fp32 masters). Returns the files."""
        self.runtime.check_open("save_pretrained")
        if not self.runtime.distributed.is_main:
            return []  # several ranks: the replicas are equal and rank 0 writes (no collective: any rank may call)
        return save_pretrained(self.runtime, save_dir, max_shard_size=max_shard_size, dtype=dtype)

    def save_adapter(self, directory: str) -> list[str]:
        """Saves the LoRA adapters in peft's format (``PeftModel.from_pretrained`` loads them)."""
        self.runtime.check_open("save_adapter")
        if not self.runtime.distributed.is_main:
            return []  # several ranks: rank 0 writes
        return save_adapter(self, directory)  # peft reads values through .module and .weight (ours)

    def merge_and_export(self, directory: str, *, max_shard_size: Union[int, str] = "5GB",
                         dtype: Optional[torch.dtype] = None) -> list[str]:
        """Streams the base weights with the adapters merged to safetensors shards, one tensor at a time."""
        self.runtime.check_open("merge_and_export")
        # the facade itself, not the runtime: values come through self.weight, which callers may wrap
        if not self.runtime.distributed.is_main:
            return []  # several ranks: rank 0 writes
        return merge_and_export(self, directory, max_shard_size=max_shard_size, dtype=dtype)
