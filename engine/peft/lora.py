"""Built-in LoRA: low-rank adapters on ``nn.Linear`` layers, numerically the same as Hugging Face peft's.

``apply_lora(model, LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))``
freezes every parameter of ``model`` and replaces each targeted ``nn.Linear`` by a
:class:`LoraLinear` holding the original layer as ``base_layer`` plus ``lora_A`` (r x in)
and ``lora_B`` (out x r). The forward is peft's::

    result = base_layer(x)
    result = (result + lora_B(lora_A(dropout(x.to(lora dtype)))) * scaling).to(result.dtype)

so adapters may train in fp32 over a bf16/fp16 base. Module names follow peft
(``...q_proj.base_layer.weight``, ``...q_proj.lora_A.weight``), target matching follows
peft (a list: a module name equal to an entry or ending in ``"." + entry``; a string: a
regular expression matched against the whole name), and initialization follows peft's
default (A Kaiming-uniform with a = sqrt(5), B zero). Adapters are created on the CPU even
when the base model is on the meta device: they are small, real from the start, and need no
initializer, while the base goes straight to the store.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["LoraConfig", "LoraLinear", "apply_lora"]


@dataclass
class LoraConfig:
    """LoRA hyper-parameters.

    Args:
        r: rank of the adapters (> 0).
        alpha: scaling numerator: the update is ``(alpha / r) * B @ A`` (``alpha / sqrt(r)`` with
            ``use_rslora``). peft calls it ``lora_alpha``.
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: names of the ``nn.Linear`` modules to adapt: a list (a module matches when
            its full name equals an entry or ends with ``"." + entry``) or one regular expression
            matched against the full name.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        dtype: dtype the adapters are created in (the trainer casts them to its compute dtype).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Union[Sequence[str], str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"LoraConfig.target_modules {self.target_modules!r} is not a valid regular "
                                 f"expression: {exc}") from None
        else:
            targets = list(self.target_modules)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError("LoraConfig.target_modules must be a regular expression or a non-empty list of "
                                 f"module names, got {self.target_modules!r}")
            self.target_modules = targets
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"LoraConfig.dtype must be float32, bfloat16 or float16, got {self.dtype}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def matches(self, name: str) -> bool:
        """Whether the module named ``name`` is a target (peft's rule)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)


class LoraLinear(nn.Module):
    """An ``nn.Linear`` (``base_layer``, frozen) plus a trainable low-rank update."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # on the CPU even over a meta base: adapters are small and need real initial values
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device="cpu", dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device="cpu", dtype=dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """peft's default initialization: the adapter starts as a zero update."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> nn.Parameter:
        """The base layer's weight (code that inspects ``proj.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.base_layer.bias

    def delta_weight(self, lora_A: Optional[torch.Tensor] = None,
                     lora_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scaling * B @ A`` in fp32 (optionally from given adapter values, e.g. fp32 masters)."""
        a = (self.lora_A.weight if lora_A is None else lora_A).detach().float()
        b = (self.lora_B.weight if lora_B is None else lora_B).detach().float()
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        return (result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freezes ``model`` and wraps every targeted ``nn.Linear`` in a :class:`LoraLinear`, in place.

    Works on models on the CPU or the meta device (adapters are made on the CPU). Returns
    ``model``; its only trainable parameters are then the adapters. Raises ValueError when a
    target matches no module, matches a module that is not an ``nn.Linear``, or the model
    already has LoRA adapters.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"apply_lora needs an engine.peft.LoraConfig, got {type(config).__name__}")
    existing = [n for n, m in model.named_modules()
                if isinstance(m, LoraLinear) or type(m).__module__.startswith("peft.")]
    if existing:
        raise ValueError(f"the model already has LoRA adapters (e.g. {existing[0]}); apply LoRA once")
    targets: list[tuple[str, nn.Linear]] = []
    wrong: list[str] = []
    for name, module in model.named_modules():
        if not name or not config.matches(name):
            continue
        if isinstance(module, nn.Linear):
            targets.append((name, module))
        else:
            wrong.append(f"{name} ({type(module).__name__})")
    if wrong:
        raise ValueError(f"LoRA target_modules {config.target_modules!r} match modules that are not nn.Linear: "
                         f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA target_modules {config.target_modules!r} match no nn.Linear in "
                         f"{type(model).__name__}; its linear layers are named: {', '.join(linear) or '(none)'}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoraLinear(linear, config.r, config.alpha, config.dropout, config.use_rslora, config.dtype)
        setattr(parent, attr, wrapped)
    model.lora_config = config  # what save_adapter writes to adapter_config.json
    return model
