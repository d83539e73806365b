"""The public entry points: ``engine.initialize`` and ``engine.plan``."""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

import torch
from torch import nn

from .checkpoint.hf import load_pretrained
from .config import Config
from .offload.materialize import Initializer
from .offload.param_groups import ParamGroupsLike
from .offload.planner import MemoryPlan
from .offload.planner import plan as _plan
from .trainer import Trainer

ConfigLike = Union[Config, dict, str, "os.PathLike[str]", None]


def initialize(model: nn.Module, config: ConfigLike = None,
               initializer: Optional[Callable[[str, tuple[int, ...]], torch.Tensor]] = None, *,
               buffer_initializer: Optional[Initializer] = None,
               param_groups: ParamGroupsLike = None) -> Trainer:
    """Prepares ``model`` for training with parameters, gradients and optimizer states on NVMe.

    ``config``: an :class:`engine.Config`, a dict, or a JSON/YAML path (engine or DeepSpeed
    format). A model on the meta device is materialized straight into the store, tensor by
    tensor, by ``initializer(name, shape) -> tensor``, called for parameters only. Its meta
    buffers (rotary ``inv_freq``) are computed as the model computes them; to give them
    yourself (e.g. persistent buffers from a checkpoint), pass
    ``buffer_initializer(name, shape) -> tensor or None`` (None: computed by the model).
    ``param_groups``: as ``torch.optim.AdamW`` takes them - dicts of ``params`` (parameters or
    names) with their own ``lr`` / ``weight_decay`` (e.g. no decay for biases and norms);
    trainable parameters no group names form one more group with the config's values. It may
    also be a function ``param_groups(model) -> groups``.
    Returns a :class:`~engine.trainer.Trainer`.
    """
    config = Config.load(config if config is not None else Config())
    return Trainer(model, config, initializer, buffer_initializer=buffer_initializer, param_groups=param_groups)


def plan(model: nn.Module, config: ConfigLike = None, *, activation_bytes: int = 0,
         example_inputs: Optional[dict] = None, gpu_memory: Union[int, str, None] = None) -> MemoryPlan:
    """What training ``model`` with ``config`` will need (pool, disk, predicted peak), without allocating.

    Pass ``example_inputs`` (keyword arguments of one training forward, e.g. ``input_ids`` and
    ``labels`` of the batch shape) to include an estimate of the activations. ``gpu_memory``
    (e.g. ``"24GiB"``): plan the GPU side for a card of that size (default: ``config.gpu_memory``,
    else the free memory of ``config.device`` when it is CUDA; nothing for the CPU).
    """
    return _plan(model, Config.load(config if config is not None else Config()), activation_bytes=activation_bytes,
                 example_inputs=example_inputs, gpu_memory=gpu_memory)


def from_pretrained(path: Union[str, "os.PathLike[str]"], config: ConfigLike = None, *, hf_config=None,
                    model_class=None, trust_remote_code: bool = False, param_groups: ParamGroupsLike = None):
    """A trainer for a Hugging Face model whose safetensors checkpoint may be larger than DRAM.

    ``path``: a directory with ``config.json`` and ``model.safetensors`` or a sharded
    ``model.safetensors.index.json`` (or one ``.safetensors`` file with ``hf_config``). The model
    is built on the meta device (``model_class.from_config``, default
    ``transformers.AutoModelForCausalLM``) and each tensor goes from the file straight into the
    TensorStore, one at a time, cast to ``config.dtype`` (bf16/fp16: the fp32 master is the
    checkpoint's value); ``param_groups`` as for :func:`initialize` (names, or a function of the
    model: it is built inside). Peak DRAM: about the largest tensor plus the pinned pool. Missing
    parameters and shape mismatches are all listed in one :class:`~engine.checkpoint.CheckpointError`;
    a truncated file names the file and tensor. Returns a :class:`~engine.trainer.Trainer`.
    """
    with load_pretrained(path, config, hf_config=hf_config, model_class=model_class,
                         trust_remote_code=trust_remote_code) as src:
        trainer = Trainer(src.model, src.config, src.initializer, buffer_initializer=src.initializer,
                          param_groups=param_groups)
    trainer.pretrained_path = src.path
    return trainer
