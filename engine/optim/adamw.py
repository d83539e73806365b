"""CPUAdamW: torch.optim.AdamW on CPU tensors through the fused native kernel."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

from . import kernels

__all__ = ["CPUAdamW"]

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


class CPUAdamW(torch.optim.Optimizer):
    """AdamW (or Adam with L2) whose update is one fused pass per parameter.

    Drop-in for ``torch.optim.AdamW`` on CPU: same arguments, ``param_groups``,
    state keys ('step', 'exp_avg', 'exp_avg_sq') and ``state_dict`` layout, and lr
    read from ``param_groups`` at every step, so LR schedulers work. The update
    follows torch's single-tensor AdamW operation by operation in fp32 (see
    :mod:`engine.optim.kernels` for the one caveat: MKL's square root).

    Args:
        params: contiguous fp32 CPU tensors (or param-group dicts).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        amsgrad: must be False (not implemented).
        adamw_mode: True for AdamW (decoupled decay: param *= 1 - lr*wd); False for
            Adam with L2 (grad += wd*param), i.e. ``torch.optim.Adam(weight_decay=wd)``.
        state_dtype: torch.float32, or torch.bfloat16 to store exp_avg/exp_avg_sq
            rounded to bf16 after every step (halves optimizer state and its I/O).

    Gradients may be fp32, bf16 or fp16. ``step`` takes two extra keyword
    arguments: ``grad_scale`` (gradients are multiplied by it first, e.g.
    clip_coef / loss_scale) and ``out`` (a mapping param -> bf16/fp16 tensor that
    receives the updated weights in the same pass).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        adamw_mode: bool = True,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if amsgrad:
            raise NotImplementedError("CPUAdamW does not implement amsgrad")
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        self.state_dtype = state_dtype
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, adamw_mode=adamw_mode)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("amsgrad"):
            raise NotImplementedError("CPUAdamW does not implement amsgrad")
        for p in group["params"]:
            _check_param(p)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("state_dtype", torch.float32)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("adamw_mode", group.get("decoupled_weight_decay", True))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict of CPUAdamW or of torch.optim.AdamW / Adam."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            # torch's Adam(W) groups say decoupled_weight_decay instead of adamw_mode.
            group.setdefault("adamw_mode", group.get("decoupled_weight_decay", self.defaults["adamw_mode"]))
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if group.get("amsgrad"):
                raise NotImplementedError("CPUAdamW does not implement amsgrad")
            if group.get("maximize"):
                raise NotImplementedError("CPUAdamW does not implement maximize")
        # Optimizer.load_state_dict casts moments to the param dtype; store ours.
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.state_dtype).contiguous()
            if "step" in state and not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)

    @torch.no_grad()
    def step(
        self,
        closure: Optional[Callable[[], Any]] = None,
        *,
        grad_scale: float = 1.0,
        out: Optional[Mapping[torch.Tensor, torch.Tensor]] = None,
    ) -> Any:
        """Performs one optimization step over every parameter that has a gradient.

        grad_scale: multiplies every gradient first (e.g. clip_coef / loss_scale).
        out: optional mapping param -> bf16/fp16 tensor of the same size that
            receives the updated weights in the same pass.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("CPUAdamW does not support sparse gradients")
                _check_param(p)
                if not grad.is_contiguous():
                    grad = grad.contiguous()
                state = self.state[p]
                if len(state) == 0:
                    # Same layout as torch's Adam: step is a CPU fp32 scalar tensor.
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros(p.shape, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=self.state_dtype)
                state["step"] += 1
                kernels.adam_step(
                    p, grad, state["exp_avg"], state["exp_avg_sq"],
                    step=int(state["step"].item()), lr=lr, beta1=float(beta1), beta2=float(beta2),
                    eps=group["eps"], weight_decay=group["weight_decay"], adamw_mode=group["adamw_mode"],
                    grad_scale=grad_scale, out=None if out is None else out.get(p),
                )
        return loss


def _check_param(p: torch.Tensor) -> None:
    if p.device.type != "cpu":
        raise ValueError(f"CPUAdamW needs CPU parameters, got one on {p.device}")
    if p.dtype != torch.float32:
        raise ValueError(f"CPUAdamW needs fp32 parameters (the master weights), got {p.dtype}")
    if not p.is_contiguous():
        raise ValueError(f"CPUAdamW needs contiguous parameters, got shape {tuple(p.shape)} stride {p.stride()}")
