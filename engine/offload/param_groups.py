"""Optimizer param groups: which trainable parameters get which learning rate and weight decay.

Users give groups the way they give them to ``torch.optim.AdamW`` - a list of dicts with
``params`` (parameters or their names) and optionally ``lr`` / ``weight_decay`` - most often to
exempt biases and norm weights from weight decay (the Hugging Face Trainer always does). Every
group's ``lr`` and ``weight_decay`` are read at each step, so LR schedulers act on each group;
``betas`` and ``eps`` are one value for the whole run (the fused kernels take them once), so a
group that sets them differently is refused rather than silently given the config's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError

# What a group may set besides its parameters.
GROUP_OPTIONS = ("lr", "weight_decay")
GroupList = Sequence[Mapping[str, Any]]
# A list of groups, or a function of the model returning one (engine.from_pretrained builds the model inside).
ParamGroupsLike = Union[GroupList, Callable[[nn.Module], GroupList], None]


@dataclass(frozen=True)
class ResolvedGroups:
    """``index[name]``: the group of each trainable parameter; ``options[g]``: group g's lr / weight decay."""

    index: dict[str, int]
    options: list[dict[str, float]]

    def members(self, names: Sequence[str]) -> list[list[str]]:
        """``names`` split by group, in group order (a group may be empty)."""
        out: list[list[str]] = [[] for _ in self.options]
        for name in names:
            out[self.index[name]].append(name)
        return out


def resolve(groups: Optional[GroupList], named: Sequence[tuple[str, nn.Parameter]], *, lr: float,
            weight_decay: float) -> ResolvedGroups:
    """Checks ``groups`` against the trainable ``named`` parameters and fills in the defaults.

    Without groups every parameter is in group 0 with the config's ``lr`` and ``weight_decay``.
    With groups, trainable parameters no group names go to one more group with those defaults
    (last), so ``[{"params": no_decay, "weight_decay": 0.0}]`` is enough to exempt a few."""
    names = [n for n, _ in named]
    if groups is None:
        return ResolvedGroups({n: 0 for n in names}, [dict(lr=lr, weight_decay=weight_decay)])
    if isinstance(groups, Mapping) or not isinstance(groups, Sequence):
        raise ConfigError(f"param_groups must be a list of dicts (as torch.optim takes), got {type(groups).__name__}",
                          "param_groups")
    by_tensor = {id(p): n for n, p in named}
    trainable = set(names)
    index: dict[str, int] = {}
    options: list[dict[str, float]] = []
    for g, group in enumerate(groups):
        where = f"param_groups[{g}]"
        if not isinstance(group, Mapping) or "params" not in group:
            raise ConfigError(f"{where} must be a dict with a 'params' entry", where)
        unknown = sorted(set(group) - {"params", *GROUP_OPTIONS})
        if unknown:
            raise ConfigError(f"{where} sets {', '.join(map(repr, unknown))}: a group may set only "
                              f"{', '.join(GROUP_OPTIONS)} (betas and eps are the config's for every parameter: "
                              "the fused optimizer kernels take one value)", where)
        members = _names(group["params"], by_tensor, where)
        for name in members:
            if name not in trainable:
                raise ConfigError(f"{where} names {name!r}, which is not a trainable parameter of the model "
                                  "(requires_grad=False, not the model's, or a tied alias: name a tied weight as "
                                  "model.named_parameters() lists it)", where)
            if name in index:
                raise ConfigError(f"{where} names {name!r}, which param_groups[{index[name]}] names too", where)
            index[name] = g
        options.append(dict(lr=_number(group, "lr", lr, where), weight_decay=_number(group, "weight_decay",
                                                                                     weight_decay, where)))
    rest = [n for n in names if n not in index]
    if rest:
        for name in rest:
            index[name] = len(options)
        options.append(dict(lr=lr, weight_decay=weight_decay))
    return ResolvedGroups(index, options)


def _names(params: Any, by_tensor: dict[int, str], where: str) -> list[str]:
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    out = []
    for item in params:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, torch.Tensor):
            name = by_tensor.get(id(item))
            if name is None:
                raise ConfigError(f"{where} holds a tensor of shape {tuple(item.shape)} that is not one of the "
                                  "model's trainable parameters", where)
            out.append(name)
        else:
            raise ConfigError(f"{where}['params'] must hold parameters or parameter names, got "
                              f"{type(item).__name__}", where)
    return out


def _number(group: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value: Union[float, int, torch.Tensor] = group.get(key, default)
    if isinstance(value, torch.Tensor) and value.numel() == 1:  # torch.optim takes a tensor lr too
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}[{key!r}] must be a number >= 0, got {value!r}", f"{where}.{key}")
    return float(value)
