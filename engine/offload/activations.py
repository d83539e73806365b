"""The activation estimate: bytes autograd saves for one training step, from shapes alone
(the planner adds them to host memory, or to GPU memory on CUDA)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


def estimate_activation_bytes(model: nn.Module, example_inputs: dict, dtype: torch.dtype = torch.float32, *,
                              frozen_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of the activations one training step keeps, from shapes alone.

    Runs ``model(**example_inputs)`` and its backward on the meta device (parameters replaced
    by meta stand-ins through ``torch.func.functional_call``; nothing is allocated) and adds up
    the tensors autograd saves for backward, weights excluded, plus the largest of them once
    more for the gradient buffers that exist while backward runs. With activation checkpointing
    (Hugging Face's ``gradient_checkpointing_enable``), backward recomputes one checkpointed layer
    at a time and holds all it saves: the largest such layer is added. ``frozen_dtype``: the dtype of
    parameters with ``requires_grad=False`` (default ``dtype``), e.g. a bf16 base under fp32 adapters.
    """
    def meta_dtype(p: torch.Tensor) -> torch.dtype:
        if not p.is_floating_point():
            return p.dtype
        return dtype if p.requires_grad or frozen_dtype is None else frozen_dtype

    saved = _saved_activations_any_device(model, example_inputs, meta_dtype)
    total = sum(saved.values()) + max(saved.values(), default=0)
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
                    and not hasattr(m, "gradient_checkpointing_enable")]  # the layers, not the model
    if checkpointed and model.training:
        # What one layer saves when run without checkpointing: HF layers checkpoint only in
        # training mode, so the same forward in eval mode shows it.
        per_layer: dict[int, int] = {}
        current: list[int] = []
        def enter(mod: nn.Module, args: Any) -> None:
            current.append(id(mod))

        def leave(mod: nn.Module, args: Any, out: Any) -> None:
            current.pop()

        handles = [h for m in checkpointed
                   for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]

        def attribute(key: int, nbytes: int) -> None:
            if current:
                per_layer[current[-1]] = per_layer.get(current[-1], 0) + nbytes

        try:
            model.eval()
            _saved_activations_any_device(model, example_inputs, meta_dtype, on_saved=attribute)
        finally:
            model.train()
            for h in handles:
                h.remove()
        total += max(per_layer.values(), default=0)
    return total


def _saved_activations_any_device(model: nn.Module, example_inputs: dict,
                                  dtype_of: Callable[[torch.Tensor], torch.dtype],
                                  on_saved: Optional[Callable[[int, int], None]] = None) -> dict[int, int]:
    try:
        return _saved_activations(model, example_inputs, dtype_of, device="meta", on_saved=on_saved)
    except RuntimeError as exc:
        # Data-dependent Python control flow (e.g. transformers' packed-sequence check, taken
        # when activation checkpointing turns the KV cache off) calls .item(), which meta
        # tensors refuse; fake tensors tell such code it is being traced, and still allocate nothing.
        if "meta tensors" not in str(exc):
            raise
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            return _saved_activations(model, example_inputs, dtype_of, device="cpu", on_saved=on_saved)


def _saved_activations(model: nn.Module, example_inputs: dict, dtype_of: Callable[[torch.Tensor], torch.dtype],
                       device: str, on_saved: Optional[Callable[[int, int], None]] = None) -> dict[int, int]:
    """Bytes of each tensor autograd saves during ``model(**example_inputs)``, weights excluded,
    with stand-in parameters made on ``device`` (meta, or CPU under a FakeTensorMode);
    ``on_saved(key, nbytes)`` sees each one as it is first saved."""
    from torch.func import functional_call

    params = {n: torch.empty(p.shape, dtype=dtype_of(p), device=device).requires_grad_(p.requires_grad)
              for n, p in model.named_parameters()}
    buffers = {n: torch.empty(b.shape, dtype=b.dtype, device=device) for n, b in model.named_buffers()}
    weights = {id(p) for p in params.values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in weights and id(t) not in weights and id(base) not in saved:
            saved[id(base)] = base.numel() * base.element_size()
            if on_saved is not None:
                on_saved(id(base), saved[id(base)])
        return t

    inputs = {k: torch.empty(v.shape, dtype=v.dtype, device=device).zero_() if isinstance(v, torch.Tensor) else v
              for k, v in example_inputs.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = functional_call(model, {**params, **buffers}, (), inputs)
    del out
    return saved
