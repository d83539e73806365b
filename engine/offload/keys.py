"""Names of the tensors the offload runtime keeps in the TensorStore.

A :class:`StoreKey` is ``(kind, name)``: the kind of state and the parameter's name. It is a
``NamedTuple``, so it equals and hashes like the bare tuple ``("param", name)`` the store has
always been given (the store itself takes any hashable and knows nothing of parameters).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

StateKind = Literal["param", "master", "exp_avg", "exp_avg_sq", "grad"]
# The moments of Adam, in the order checkpoints and the stepper list them.
MOMENTS: tuple[StateKind, ...] = ("exp_avg", "exp_avg_sq")


class StoreKey(NamedTuple):
    """``param``: the compute weights (the fp32 master itself when compute is fp32); ``master``:
    the fp32 master of a bf16/fp16 parameter; ``exp_avg``/``exp_avg_sq``: Adam's moments;
    ``grad``: the fp32 gradient (streamed gradient path)."""

    kind: StateKind
    name: str

    @classmethod
    def param(cls, name: str) -> "StoreKey":
        return cls("param", name)

    @classmethod
    def master(cls, name: str) -> "StoreKey":
        return cls("master", name)

    @classmethod
    def grad(cls, name: str) -> "StoreKey":
        return cls("grad", name)

    @classmethod
    def moment(cls, kind: StateKind, name: str) -> "StoreKey":
        if kind not in MOMENTS:
            raise ValueError(f"not an Adam moment: {kind!r} (expected one of {MOMENTS})")
        return cls(kind, name)

    def __repr__(self) -> str:  # as the bare tuple: error messages name keys as they always did
        return repr(tuple(self))

    def __str__(self) -> str:  # the checkpoint's tensor name: "master/model.layers.0.mlp.up_proj.weight"
        return f"{self.kind}/{self.name}"
