"""Gradient offload: each gradient goes to its NVMe slot as soon as autograd produces it.

``streamed`` (ours): the gradient is copied into a pinned staging block, added to the
slot's running fp32 sum when this is not the first micro-batch of the accumulation
window (read-modify-write through the store), and written back asynchronously; the
staging block returns to the pool when the write completes. On the last micro-batch
the fused native kernel adds the gradient's sum of squares to the global norm and
flags inf/NaN in one pass with no temporaries. Host memory: the staging in flight,
bounded by ``staging_bytes`` - never proportional to the model.

``flat`` (the ZeRO-Infinity-like ablation): one host buffer holding every gradient
(``overflow_check = naive`` adds ``isinf(g).any()`` / ``isnan(g).any()`` temporaries); on a
copying device each gradient is copied into it synchronously, its statistics taken on the host.

On a copying compute device (``device.copies``: CUDA, or the CPU "separate" mode) a gradient
of a one-micro-batch window gets its statistics on the device before the copy
(:func:`~engine.offload.device_copy.device_grad_norm`, resolved in :meth:`finish` without a
per-gradient synchronization; a device norm of inf is recounted on the host from the stored
gradient, so an fp32 overflow of finite values is not taken for an inf); an accumulated one
goes through the fused kernel on the host as on the CPU. CUDA (streamed mode): the copy into
pinned staging runs on a dedicated D2H stream ordered after the gradient's producer, and the
block's store write starts once the copy's event completed; compute waits for a copy only
when staging is full (or the next micro-batch reads the same slot back). "separate": a
synchronous copy. Counted in :attr:`device_stats` (``d2h_bytes``, ``d2h_wait_s``).

Several ranks with replicated state (``Config.state_partitioning="replicated"``; the default,
partitioned state, uses :class:`~engine.offload.sharded_gradients.ShardedGradients` instead): the
window's gradient is averaged across
ranks once, at the accumulation boundary - on the accumulated value of the window's last
micro-batch, in the staging block, before it is written (one all-reduce per gradient per window
instead of one per micro-batch, and no extra store read or write). A later contribution to the
same gradient in that micro-batch (reentrant checkpointing) is averaged on its own before it is
added, so the sum stays the average of every rank's sum. Gradients not averaged by then (no
contribution in the last micro-batch, or none at all: zeros) are averaged in :meth:`finish`, in
parameter order. The order of the collectives is autograd's, so every rank's last micro-batch
must produce gradients for the same parameters in the same order (a static graph, as DDP without
``find_unused_parameters``); a mismatch ends as a collective timeout with a
:class:`~engine.errors.DistributedError`. The averaged gradients are identical on every rank, so
every rank computes the same norm, overflow flag and update (replicated state). The ``flat``
ablation is refused under several ranks (:func:`engine.offload.assembly.check_supported`).
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Optional, Sequence

import torch

from ..devices import ComputeDeviceSpec
from ..distributed import DistributedSpec, all_reduce_mean_, check_same_sequence
from ..dtypes import FP32_BYTES
from ..errors import PoolExhaustedError
from ..memory.pool import PinnedPool, PoolBlock, round_up_io
from ..optim import kernels
from ..storage.store import TensorStore
from ..validate import GradBuffer, OverflowCheck, check_choice
from .device_copy import D2HCopies, device_grad_norm
from .keys import StoreKey
from .placement import GradFill
from .stepper import ParamSpec, Piece

# Pinned staging the streamed gradient path keeps in flight before it waits for writes: enough
# for the NVMe queue to stay busy, small beside the model (the planner reserves it, see grad_staging_bytes).
GRAD_STAGING_BYTES = 64 << 20
# Accumulating a CUDA gradient into its stored sum: elements brought over per host temporary (16 MiB in fp32).
_ADD_CHUNK = 1 << 22


def grad_staging_bytes(largest_numel: int) -> int:
    """Pinned bytes the streamed gradient path needs: the in-flight budget, or one fp32 copy of the
    largest gradient when that is larger (it must fit in one block)."""
    return max(GRAD_STAGING_BYTES, round_up_io(largest_numel * FP32_BYTES))


def grad_stats(g: torch.Tensor, overflow_check: OverflowCheck) -> tuple[float, bool]:
    """(sum of squares, any inf/NaN) of a gradient: the fused native pass, or the baseline's
    full-size boolean temporaries then a separate norm pass (``overflow_check="naive"``)."""
    if g.numel() == 0:
        return 0.0, False
    if overflow_check == "fused":
        sumsq, bad = kernels.grad_stats(g.contiguous())
    else:
        bad = bool(torch.isinf(g).any()) or bool(torch.isnan(g).any())
        sumsq = float(g.double().pow(2).sum()) if not bad else math.inf
    return sumsq, bool(bad)


def release_block(block: PoolBlock) -> None:
    """Frees ``block`` on an error path. The error's traceback may still hold a view of it (a frame's
    local); then the block goes back to the pool with that last view, and this error is not hidden
    behind a BufferError."""
    try:
        block.free()
    except BufferError:
        pass


class GradientOffload:
    """Collects gradients for the optimizer stepper: the NVMe placement's
    :class:`~engine.offload.placement.GradientSink`.

    Args:
        store: gradients live in ``StoreKey.grad(name)`` (fp32) in the ``streamed`` mode.
        pool: staging blocks for the ``streamed`` mode.
        params: the trainable parameters.
        grad_buffer: ``"streamed"`` or ``"flat"``.
        overflow_check: ``"fused"`` (one native pass) or ``"naive"`` (torch isinf/isnan temporaries).
        staging_bytes: at most this much pinned staging is in flight before waiting for writes.
        flat_dtype: element type of the flat buffer (the compute dtype, as in ZeRO-Infinity).
        device: the compute device gradients arrive on (None: the CPU, no copies counted).
        distributed: several ranks: gradients are averaged across them (module docstring).
    """

    def __init__(self, store: TensorStore, pool: PinnedPool, params: Sequence[ParamSpec], *,
                 grad_buffer: GradBuffer = "streamed", overflow_check: OverflowCheck = "fused",
                 staging_bytes: int = GRAD_STAGING_BYTES,
                 flat_dtype: torch.dtype = torch.float32, device: Optional[ComputeDeviceSpec] = None,
                 distributed: Optional[DistributedSpec] = None):
        check_choice("grad_buffer", grad_buffer, GradBuffer)  # also built without a Config (tests)
        check_choice("overflow_check", overflow_check, OverflowCheck)
        self.store, self.pool = store, pool
        self.params = {p.name: p for p in params}
        self.grad_buffer, self.overflow_check = grad_buffer, overflow_check
        self.staging_bytes = staging_bytes
        # (write request, or None while its D2H copy runs; block; gradient name; the copy's event)
        self._pending: deque[list[Any]] = deque()
        self._pending_bytes = 0
        self.copies = device is not None and device.copies
        self.device_stats: dict = dict(d2h_bytes=0, d2h_wait_s=0.0)
        self._d2h = D2HCopies(device.device, self.device_stats) if device is not None and device.kind == "cuda" \
            else None
        self._device_norms: dict[str, torch.Tensor] = {}  # one-micro-batch windows: norms still on the device
        # Per parameter (sum of squares, non-finite) of its accumulated gradient in the last
        # micro-batch: a tied weight may receive several contributions, the last one counts.
        self._stats: dict[str, tuple[float, bool]] = {}
        self.received: set[str] = set()
        self._dist = distributed if distributed is not None and distributed.is_distributed else None
        if self._dist is not None and grad_buffer == "flat":
            raise NotImplementedError("grad_buffer='flat' (the ablation) is not supported with several ranks")
        self._averaged: set[str] = set()  # gradients averaged across ranks in this window
        self._order: list[str] = []  # ... in the order they were averaged
        if grad_buffer == "flat":
            offsets, pos = {}, 0
            for p in params:
                offsets[p.name] = pos
                pos += p.numel
            self._offsets = offsets
            self._flat = torch.zeros(pos, dtype=flat_dtype)  # ablation: a host buffer of every gradient
        else:
            for p in params:
                store.allocate(StoreKey.grad(p.name), p.shape, torch.float32)

    # ------------------------------------------------------------------ accumulation
    def begin_window(self) -> None:
        """Starts a new accumulation window (after an optimizer step or at the beginning)."""
        self._stats.clear()
        self._device_norms.clear()
        self.received.clear()
        self._averaged.clear()
        self._order.clear()

    def _mean(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged across ranks in place (several ranks only)."""
        assert self._dist is not None
        self._order.append(name)  # checked against the other ranks' order at finish()
        return all_reduce_mean_(tensor, self._dist, f"gradient of {name!r}")

    def add(self, name: str, grad: torch.Tensor, first: bool, last: bool) -> None:
        """Takes the gradient of ``name`` from one micro-batch.

        ``first``: first micro-batch of the window (informational: the slot is overwritten by a
        gradient's first contribution in the window, whichever micro-batch brings it - one absent
        from the first micro-batch must not be added to the previous window's value).
        ``last``: last micro-batch (the accumulated gradient enters the norm/overflow statistics).
        """
        spec = self.params.get(name)
        if spec is None:
            raise KeyError(f"{name!r} is not a trainable parameter of this offload")
        if grad.numel() != spec.numel:
            raise ValueError(f"gradient of {name!r} has {grad.numel()} elements, expected {spec.numel}")
        grad = grad.detach().reshape(-1)
        if self.copies and self.grad_buffer == "streamed":
            self._add_copied(name, spec.numel, grad, first, last)
            self.received.add(name)
            return
        if self.grad_buffer == "flat":
            self._add_flat(name, spec.numel, grad, name not in self.received, last)
            self.received.add(name)
            return
        if grad.device.type != "cpu":
            nbytes, start = grad.numel() * grad.element_size(), time.perf_counter()
            grad = grad.to("cpu", non_blocking=False)
            self.device_stats["d2h_bytes"] += nbytes
            self.device_stats["d2h_wait_s"] += time.perf_counter() - start
        average = last and self._dist is not None
        if average and name in self._averaged:  # a later contribution of the last micro-batch: its own average
            grad = self._mean(name, grad.float().clone())
        block = self._staging(round_up_io(spec.numel * FP32_BYTES))
        try:
            acc = block.tensor(spec.numel, torch.float32)
            if name not in self.received:  # its first contribution in this window
                acc.copy_(grad)
            else:
                self.store.read_into(StoreKey.grad(name), block).wait()
                acc.add_(grad)
            if average and name not in self._averaged:
                self._mean(name, acc)  # the window's sum, in staging, before it is written
                self._averaged.add(name)
            if last:
                self._account(name, acc)
            del acc
        except BaseException:
            release_block(block)  # a failed read or collective leaves no block behind
            raise
        self._pending.append([self.store.write_from(StoreKey.grad(name), block), block, name, None])
        self._pending_bytes += block.size
        self.received.add(name)

    def _add_flat(self, name: str, numel: int, grad: torch.Tensor, overwrite: bool, last: bool) -> None:
        """``flat`` mode (the ablation): the gradient into its range of the host buffer, synchronously,
        as ZeRO-Infinity's host gradient buffer (no overlap with compute). A CUDA gradient is copied
        straight into the buffer (a synchronous D2H on the producer's stream), or added to it in
        ``_ADD_CHUNK`` pieces: no full-size host temporary either way."""
        view = self._flat[self._offsets[name]: self._offsets[name] + numel]
        start = time.perf_counter()
        on_host = grad.device.type == "cpu"
        if on_host or overwrite:
            view.copy_(grad) if overwrite else view.add_(grad)
        else:
            for s in range(0, numel, _ADD_CHUNK):
                piece = grad[s:s + _ADD_CHUNK]
                view[s:s + piece.numel()].add_(piece.to("cpu"))  # synchronous: read now
        if not on_host or self.copies:  # "separate": the copy into the buffer is the D2H
            self.device_stats["d2h_bytes"] += numel * grad.element_size()
        if not on_host:
            self.device_stats["d2h_wait_s"] += time.perf_counter() - start
        if last:
            self._account(name, view)

    def _add_copied(self, name: str, numel: int, grad: torch.Tensor, first: bool, last: bool) -> None:
        """Streamed mode on a copying device: ``grad`` is a compute tensor (CUDA or "separate")."""
        self._start_copied_writes()
        key = StoreKey.grad(name)
        overwrite = name not in self.received  # its first contribution in this window
        average = last and self._dist is not None
        if average and (overwrite or name in self._averaged):
            # the whole window's gradient, or a later contribution of its last micro-batch: averaged on the device
            # in fp32 (a bf16 gradient is averaged as the host path sums it), then the norm of the average
            grad = self._mean(name, grad.float().contiguous() if overwrite else grad.float().clone())
            self._averaged.add(name)
        if overwrite and last:  # a one-micro-batch window: statistics on the device, before the copy
            self._device_norms[name] = device_grad_norm(grad)
        block = self._staging(round_up_io(numel * FP32_BYTES))
        try:
            acc = block.tensor(numel, torch.float32)
            if overwrite:
                event = self._copy(grad, acc)  # nothing after this raises: the block is in flight
            else:
                self._device_norms.pop(name, None)  # a later contribution (tied weight): the host sum counts
                self._flush_copy(name)  # the slot's earlier value must be written before it is read back
                self.store.read_into(key, block).wait()
                self._add_host(grad, acc)
                event = None
                if average and name not in self._averaged:
                    self._mean(name, acc)  # the window's sum, on the host (NCCL: through the device)
                    self._averaged.add(name)
                if last:
                    self._account(name, acc)
            del acc
        except BaseException:
            release_block(block)  # back to the pool: a failed copy or read leaves no block behind
            raise
        if event is None:
            self._pending.append([self.store.write_from(key, block), block, name, None])
        else:
            self._pending.append([None, block, name, event])  # the write starts when the copy is done
        self._pending_bytes += block.size

    def _copy(self, grad: torch.Tensor, out: torch.Tensor) -> Any:
        """``out`` (pinned fp32) receives ``grad``: asynchronously on CUDA (its event), else now (None)."""
        if self._d2h is not None and grad.is_cuda:
            return self._d2h.launch(grad, out)
        start = time.perf_counter()
        out.copy_(grad)
        self.device_stats["d2h_bytes"] += out.numel() * out.element_size()
        self.device_stats["d2h_wait_s"] += time.perf_counter() - start
        return None

    def _add_host(self, grad: torch.Tensor, acc: torch.Tensor) -> None:
        """``acc += grad`` on the host (accumulation). A CUDA gradient comes over in chunks of
        ``_ADD_CHUNK`` elements into ordinary host memory: the pool keeps no room for a second
        gradient-sized block (the gradient staging holds one largest gradient)."""
        start = time.perf_counter()
        flat = grad.reshape(-1)
        if self._d2h is None or not grad.is_cuda:
            acc.add_(flat)  # "separate": the add into staging is the copy
        else:
            for s in range(0, flat.numel(), _ADD_CHUNK):
                piece = flat[s:s + _ADD_CHUNK]
                acc[s:s + piece.numel()].add_(piece.to("cpu", torch.float32))  # synchronous: read now
        self.device_stats["d2h_bytes"] += flat.numel() * FP32_BYTES  # counted as fp32, what crosses
        self.device_stats["d2h_wait_s"] += time.perf_counter() - start

    def _start_copied_writes(self) -> None:
        """Starts the store writes of blocks whose D2H copy has finished (never waits)."""
        for entry in self._pending:
            if entry[0] is None and self._d2h is not None and self._d2h.finished(entry[3]):
                self._start_write(entry)

    def _start_write(self, entry: list) -> None:
        if entry[3] is not None and self._d2h is not None:
            self._d2h.wait(entry[3])
        entry[0] = self.store.write_from(StoreKey.grad(entry[2]), entry[1])
        entry[3] = None

    def _flush_copy(self, name: str) -> None:
        for entry in self._pending:
            if entry[0] is None and entry[2] == name:
                self._start_write(entry)

    def _account(self, name: str, g: torch.Tensor) -> None:
        self._stats[name] = grad_stats(g, self.overflow_check)

    def _staging(self, nbytes: int) -> PoolBlock:
        while self._pending and self._pending_bytes + nbytes > self.staging_bytes:
            self._retire_oldest()
        while True:
            try:
                return self.pool.alloc(nbytes)
            except PoolExhaustedError:
                if not self._pending:
                    raise
                self._retire_oldest()

    def _retire_oldest(self) -> None:
        entry = self._pending.popleft()
        block = entry[1]
        self._pending_bytes -= block.size
        try:
            if entry[0] is None:
                self._start_write(entry)  # compute waits for a D2H copy: staging is full
            entry[0].wait()
        finally:  # a failed write is complete too: its staging goes back either way
            block.free()

    def finish(self) -> tuple[float, bool]:
        """Waits for every gradient write; returns (global L2 norm, any inf/NaN) of the window."""
        while self._pending:
            self._retire_oldest()
        if self._dist is not None:
            # Hooks averaged in backward order: a rank whose graph differed would have paired other
            # gradients (silently, when their shapes match); refuse the step before it is applied.
            check_same_sequence(self._dist, self._order, "gradients averaged in the window's last micro-batch "
                                "(every rank must produce the same gradients in the same order)")
            self._average_rest()
        # Statistics are taken on a gradient's last-micro-batch contribution; one that had
        # contributions earlier in the window but none in its last micro-batch (a conditional branch,
        # an MoE expert) is counted from its accumulated value now, so its norm and inf/NaN count.
        unaccounted = [n for n in self.received if n not in self._stats and n not in self._device_norms]
        for name in unaccounted:
            if self.grad_buffer == "flat":
                start = self._offsets[name]
                self._account(name, self._flat[start: start + self.params[name].numel])
            else:
                self._recount_from_store(name)
        missing = [n for n in self.params if n not in self.received]
        if missing:
            # A parameter that took no part in the loss has a zero gradient (torch would skip it).
            for name in missing:
                self.add(name, torch.zeros(self.params[name].numel), first=True, last=False)
            while self._pending:
                self._retire_oldest()
        self._resolve_device_norms()
        nonfinite = any(bad for _, bad in self._stats.values())
        sumsq = math.fsum(s for s, _ in self._stats.values())
        return (math.inf if nonfinite else math.sqrt(sumsq)), nonfinite

    def _average_rest(self) -> None:
        """Several ranks: the gradients not averaged in the last micro-batch, in parameter order (the
        same on every rank): read back, averaged, counted and written again. One with no gradient at
        all is zero here - averaged too, since another rank may have one."""
        for name, spec in self.params.items():
            if name in self._averaged:
                continue
            block = self._staging(round_up_io(spec.numel * FP32_BYTES))
            try:
                acc = block.tensor(spec.numel, torch.float32)
                if name in self.received:
                    self.store.read_into(StoreKey.grad(name), block).wait()
                else:
                    acc.zero_()
                self._mean(name, acc)
                self._account(name, acc)
                del acc
                self.store.write_from(StoreKey.grad(name), block).wait()
            except BaseException:
                release_block(block)
                raise
            block.free()
            self._averaged.add(name)
            self.received.add(name)

    def _resolve_device_norms(self) -> None:
        """The one-micro-batch windows' device norms, brought to the host at once (one synchronization).

        A device norm of inf is ambiguous: an inf element, or finite elements whose fp32 sum of
        squares overflowed (a norm above ~1.8e19) - where the host's fp64 kernel would give a finite
        norm and the step would be clipped. Only then (no NaN and no other non-finite gradient in
        the window, which would skip the step anyway) is such a gradient read back from the store
        and counted on the host as on the CPU path, stopping at the first that is truly non-finite.
        """
        if not self._device_norms:
            return
        names = list(self._device_norms)
        norms = torch.stack([self._device_norms[n] for n in names]).cpu().double()
        overflowed = []
        for name, norm in zip(names, norms.tolist()):
            self._stats[name] = (norm * norm, not math.isfinite(norm))
            if math.isinf(norm):
                overflowed.append(name)
        self._device_norms.clear()
        if not overflowed or any(bad for n, (_, bad) in self._stats.items() if n not in overflowed):
            return
        for name in overflowed:
            self._recount_from_store(name)
            if self._stats[name][1]:
                return  # a real inf: the step is skipped, the others need no recount

    def _recount_from_store(self, name: str) -> None:
        """The host statistics of ``name``'s stored gradient (its writes have completed)."""
        numel = self.params[name].numel
        block = self._staging(round_up_io(numel * FP32_BYTES))
        try:
            self.store.read_into(StoreKey.grad(name), block).wait()
            self._account(name, block.tensor(numel, torch.float32))
        finally:
            block.free()

    def grad_source(self) -> Optional[GradFill]:
        """For the stepper: fills a piece's fp32 gradient from the flat buffer (``flat`` mode), else None."""
        if self.grad_buffer != "flat":
            return None

        def fill(piece: Piece, out: torch.Tensor) -> None:
            start = self._offsets[piece.name] + piece.start
            out.copy_(self._flat[start: start + piece.numel])
        return fill

    @property
    def host_buffer_bytes(self) -> int:
        """Host memory held for gradients beyond the staging in flight (the flat buffer)."""
        return self._flat.numel() * self._flat.itemsize if self.grad_buffer == "flat" else 0

    def close(self) -> None:
        """Waits for every write in flight and frees its staging, then raises the first write error."""
        error: Optional[BaseException] = None
        while self._pending:
            try:
                self._retire_oldest()
            except Exception as exc:  # keep draining: every block must go back before the pool closes
                error = error or exc
        if error is not None:
            raise error
