"""Pipelined optimizer step over states that live in the TensorStore.

Trainable parameters are cut into *pieces* at the store's segment boundaries (a
segment holds the same number of elements for every dtype, so a piece's fp32
master, gradient, Adam moments and low-precision weights are whole segments of
their tensors) and pieces are packed into *sub-groups* of at most
``sub_group_elements`` elements. Three buffer sets from the PinnedPool make a
three-stage pipeline: while the native AdamW kernel updates sub-group *j* (unscale,
clip, weight decay, update, and the new bf16/fp16 weights written in the same
pass), sub-group *j+1* is being read and *j-1* written back.

Store keys (:class:`~engine.offload.keys.StoreKey`): ``StoreKey.param(name)`` holds the
compute weights; with bf16/fp16 compute the fp32 master lives in ``StoreKey.master(name)``,
with fp32 compute the weights *are* the master (no second copy). ``StoreKey.moment("exp_avg",
name)`` and ``StoreKey.moment("exp_avg_sq", name)`` hold the moments (fp32, or bf16 to halve
optimizer I/O); ``StoreKey.grad(name)`` the fp32 gradient accumulated by
:class:`~engine.offload.gradients.GradientOffload`. :class:`OptimizerStepper` is the NVMe
placement's :class:`~engine.offload.placement.OptimizerBackend`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..dtypes import itemsize
from ..memory.pool import PinnedPool, PoolBlock, round_up_io
from ..optim import kernels
from ..storage.store import StoreRequest, TensorStore
from .keys import StoreKey

STREAMS = ("master", "grad", "exp_avg", "exp_avg_sq", "out")


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + numel)`` of parameter ``name`` (a run of whole segments)."""

    name: str
    start: int
    numel: int
    group: int  # index into the optimizer's param groups


@dataclass
class ParamSpec:
    """A trainable parameter as the stepper sees it."""

    name: str
    shape: tuple[int, ...]
    group: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plan_sub_groups(params: Sequence[ParamSpec], segment_elements: int, sub_group_elements: int) -> list[list[Piece]]:
    """Cuts parameters into segment-aligned pieces and packs them, in order, into sub-groups of at
    most ``sub_group_elements`` elements (at least one segment)."""
    limit = max(sub_group_elements, segment_elements) // segment_elements * segment_elements
    groups: list[list[Piece]] = [[]]
    room = limit
    for p in params:
        start = 0
        while start < p.numel:
            remaining = p.numel - start
            if room < min(segment_elements, remaining):
                groups.append([])
                room = limit
            # The rest of the tensor if it fits, else as many whole segments as fit.
            take = remaining if remaining <= room else room // segment_elements * segment_elements
            groups[-1].append(Piece(p.name, start, take, p.group))
            start += take
            room -= take
    return [g for g in groups if g]


class _BufferSet:
    """Pinned staging for one sub-group: one block per stream, pieces at 4 KiB-aligned offsets."""

    def __init__(self, pool: PinnedPool, nbytes: dict[str, int]):
        self.blocks: dict[str, PoolBlock] = {s: pool.alloc(n) for s, n in nbytes.items() if n}
        self.pending: list[StoreRequest] = []

    def wait(self) -> None:
        requests, self.pending = self.pending, []
        error = None
        for r in requests:
            try:
                r.wait()
            except Exception as exc:  # wait for every request before raising: buffers get reused
                error = error or exc
        if error is not None:
            raise error

    def view(self, stream: str, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.blocks[stream].tensor(numel, dtype, offset=offset)

    def free(self) -> None:
        for b in self.blocks.values():
            b.free()
        self.blocks = {}


@dataclass
class StepStats:
    read_wait_s: float = 0.0
    compute_s: float = 0.0
    write_wait_s: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0


class OptimizerStepper:
    """Adam/AdamW over parameters whose states live in a :class:`TensorStore`.

    Args:
        store: the tensor store (states are created there by :meth:`initialize_states`).
        pool: pinned pool for the three buffer sets.
        params: trainable parameters, in update order.
        compute_dtype: dtype of ``StoreKey.param(name)``: fp32 (it is the master) or bf16/fp16.
        state_dtype: dtype of the Adam moments (fp32 or bf16).
        sub_group_elements: sub-group size; the pool needs 3 x this x bytes per element of all streams.
        group_hparams: returns the current (lr, weight_decay) of a param group (read each step,
            so LR schedulers work).
    """

    def __init__(self, store: TensorStore, pool: PinnedPool, params: Sequence[ParamSpec], *,
                 compute_dtype: torch.dtype = torch.float32, state_dtype: torch.dtype = torch.float32,
                 sub_group_elements: int = 1 << 22, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 adamw_mode: bool = True, group_hparams: Callable[[int], tuple[float, float]] = lambda g: (1e-3, 0.0)):
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"optimizer state dtype must be float32 or bfloat16, got {state_dtype}")
        self.store = store
        self.params = {p.name: p for p in params}
        self.compute_dtype = compute_dtype
        self.state_dtype = state_dtype
        self.mixed = compute_dtype != torch.float32
        self.betas, self.eps, self.adamw_mode = betas, eps, adamw_mode
        self.group_hparams = group_hparams
        self.sub_groups = plan_sub_groups(list(params), store.segment_elements, sub_group_elements)
        self.dtypes = {"master": torch.float32, "grad": torch.float32, "exp_avg": state_dtype,
                       "exp_avg_sq": state_dtype, "out": compute_dtype if self.mixed else None}
        sizes = {s: max((self._layout(g)[s][-1] for g in self.sub_groups), default=0) for s in STREAMS}
        self.buffer_set_bytes = sum(sizes.values())
        self._sets = [_BufferSet(pool, sizes) for _ in range(3)]
        self.stats = StepStats()

    @staticmethod
    def buffer_bytes(params: Sequence[ParamSpec], segment_elements: int, sub_group_elements: int,
                     compute_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
        """Pool bytes the stepper will take (3 buffer sets), from shapes alone: for the planner."""
        probe = OptimizerStepper.__new__(OptimizerStepper)
        probe.mixed = compute_dtype != torch.float32
        probe.dtypes = {"master": torch.float32, "grad": torch.float32, "exp_avg": state_dtype,
                        "exp_avg_sq": state_dtype, "out": compute_dtype if probe.mixed else None}
        groups = plan_sub_groups(list(params), segment_elements, sub_group_elements)
        return 3 * sum(max((probe._layout(g)[s][-1] for g in groups), default=0) for s in STREAMS)

    def _layout(self, group: list[Piece]) -> dict[str, list[int]]:
        """Per stream, the byte offset of each piece in a buffer set, then the total."""
        out = {}
        for stream in STREAMS:
            dtype = self.dtypes[stream]
            offsets, pos = [], 0
            for piece in group:
                offsets.append(pos)
                if dtype is not None:
                    pos += round_up_io(piece.numel * itemsize(dtype))
            out[stream] = offsets + [pos]
        return out

    def _key(self, stream: str, name: str) -> StoreKey:
        if stream == "master":  # with fp32 compute the weights are the master: no second copy
            return StoreKey.master(name) if self.mixed else StoreKey.param(name)
        if stream == "out":
            return StoreKey.param(name)
        if stream == "grad":
            return StoreKey.grad(name)
        return StoreKey.moment(stream, name)

    # ------------------------------------------------------------------ states
    def initialize_states(self) -> None:
        """Creates zeroed moments (and, with low-precision compute and no ``StoreKey.master(name)`` yet,
        the fp32 master from the stored weights) in the store, one sub-group at a time through the pool."""
        staging = self._sets[0]
        seed_master = {n for n in self.params if self.mixed and StoreKey.master(n) not in self.store}
        for spec in self.params.values():
            if spec.numel == 0:  # a shard this rank owns none of (partitioned): empty entries, no pieces
                for stream in ("exp_avg", "exp_avg_sq"):
                    self.store.allocate(self._key(stream, spec.name), spec.shape, self.state_dtype)
                if spec.name in seed_master:
                    self.store.allocate(StoreKey.master(spec.name), spec.shape, torch.float32)
        for group in self.sub_groups:
            layout = self._layout(group)
            for i, piece in enumerate(group):
                for stream in ("exp_avg", "exp_avg_sq"):
                    key = self._key(stream, piece.name)
                    self.store.allocate(key, self.params[piece.name].shape, self.state_dtype)
                    view = staging.view(stream, layout[stream][i], piece.numel, self.state_dtype)
                    view.zero_()
                    staging.pending.append(self._write(key, staging.blocks[stream], layout[stream][i], piece,
                                                       self.state_dtype))
                if piece.name in seed_master:
                    # No master given: the stored low-precision weights seed it.
                    key = StoreKey.master(piece.name)
                    self.store.allocate(key, self.params[piece.name].shape, torch.float32)
                    low = staging.view("out", layout["out"][i], piece.numel, self.compute_dtype)
                    self._read(StoreKey.param(piece.name), staging.blocks["out"], layout["out"][i], piece,
                               self.compute_dtype).wait()
                    staging.view("master", layout["master"][i], piece.numel, torch.float32).copy_(low)
                    staging.pending.append(self._write(key, staging.blocks["master"], layout["master"][i], piece,
                                                       torch.float32))
                    del low
            staging.wait()

    def _transfer(self, op: str, key, block: PoolBlock, offset: int, piece: Piece, dtype: torch.dtype) -> StoreRequest:
        """Reads or writes ``piece`` of ``key`` between the store and ``block`` at byte ``offset``."""
        size = itemsize(dtype)
        nbytes = piece.numel * size
        view = block.tensor(round_up_io(nbytes), torch.uint8, offset=offset)
        if op == "read":
            self.stats.bytes_read += nbytes
            return self.store.read_into(key, view, piece.start * size, nbytes)
        self.stats.bytes_written += nbytes
        return self.store.write_from(key, view, piece.start * size, nbytes)

    def _read(self, key, block: PoolBlock, offset: int, piece: Piece, dtype: torch.dtype) -> StoreRequest:
        return self._transfer("read", key, block, offset, piece, dtype)

    def _write(self, key, block: PoolBlock, offset: int, piece: Piece, dtype: torch.dtype) -> StoreRequest:
        return self._transfer("write", key, block, offset, piece, dtype)

    # ------------------------------------------------------------------ the step
    def step(self, step: int, grad_scale: float = 1.0,
             grad_source: Optional[Callable[[Piece, torch.Tensor], None]] = None) -> None:
        """Applies optimizer step number ``step`` (1-based) to every parameter.

        ``grad_scale`` multiplies every gradient first (clip coefficient / loss scale).
        ``grad_source(piece, out)``, when given, fills the piece's fp32 gradient instead of
        reading ``StoreKey.grad(name)`` from the store (the ``flat`` gradient-buffer ablation).
        """
        groups = self.sub_groups
        if not groups:
            return
        sets = self._sets
        self._issue_reads(groups[0], sets[0], grad_source)
        for j, group in enumerate(groups):
            current = sets[j % 3]
            if j + 1 < len(groups):
                upcoming = sets[(j + 1) % 3]
                start = time.perf_counter()
                upcoming.wait()  # its write-back from sub-group j-2
                self.stats.write_wait_s += time.perf_counter() - start
                self._issue_reads(groups[j + 1], upcoming, grad_source)
            start = time.perf_counter()
            current.wait()
            self.stats.read_wait_s += time.perf_counter() - start
            start = time.perf_counter()
            self._update(group, current, step, grad_scale)
            self.stats.compute_s += time.perf_counter() - start
            self._issue_writes(group, current)
        start = time.perf_counter()
        for s in sets:
            s.wait()
        self.stats.write_wait_s += time.perf_counter() - start

    def _issue_reads(self, group: list[Piece], bufs: _BufferSet, grad_source) -> None:
        layout = self._layout(group)
        for i, piece in enumerate(group):
            for stream in ("master", "grad", "exp_avg", "exp_avg_sq"):
                if stream == "grad" and grad_source is not None:
                    grad_source(piece, bufs.view("grad", layout["grad"][i], piece.numel, torch.float32))
                    continue
                bufs.pending.append(self._read(self._key(stream, piece.name), bufs.blocks[stream],
                                               layout[stream][i], piece, self.dtypes[stream]))

    def _update(self, group: list[Piece], bufs: _BufferSet, step: int, grad_scale: float) -> None:
        layout = self._layout(group)
        beta1, beta2 = self.betas
        for i, piece in enumerate(group):
            lr, weight_decay = self.group_hparams(piece.group)
            views = {s: bufs.view(s, layout[s][i], piece.numel, self.dtypes[s])
                     for s in ("master", "grad", "exp_avg", "exp_avg_sq")}
            out = bufs.view("out", layout["out"][i], piece.numel, self.compute_dtype) if self.mixed else None
            kernels.adam_step(views["master"], views["grad"], views["exp_avg"], views["exp_avg_sq"], step=step,
                              lr=lr, beta1=beta1, beta2=beta2, eps=self.eps, weight_decay=weight_decay,
                              adamw_mode=self.adamw_mode, grad_scale=grad_scale, out=out)
            del views, out

    def _issue_writes(self, group: list[Piece], bufs: _BufferSet) -> None:
        layout = self._layout(group)
        streams = ("master", "exp_avg", "exp_avg_sq") + (("out",) if self.mixed else ())
        for i, piece in enumerate(group):
            for stream in streams:
                bufs.pending.append(self._write(self._key(stream, piece.name), bufs.blocks[stream],
                                                layout[stream][i], piece, self.dtypes[stream]))

    def close(self) -> None:
        """Waits for outstanding I/O and returns every buffer set to the pool, then raises the first error."""
        error: Optional[BaseException] = None
        for s in self._sets:
            for release in (s.wait, s.free):
                try:
                    release()
                except Exception as exc:  # the other sets still have to be released
                    error = error or exc
        if error is not None:
            raise error
