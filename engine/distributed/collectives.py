"""The few collectives the runtime uses, each turning a failure into a :class:`DistributedError`.

A collective fails when a peer died (gloo: the connection resets) or stopped calling it (the
group's timeout passes, ``collective_timeout_s`` for a group the engine created). The error names
the collective, this rank, and what was being reduced, so the log of the surviving rank says
where training stopped. Everything here is synchronous and runs in the caller's order: every
rank must call the same collectives in the same order (the runtime does, given the same graph).
No pickle: byte strings travel as uint8 tensors.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import crc32c
import torch
import torch.distributed as dist

from ..errors import DistributedError
from .process_group import DistributedSpec

_T = TypeVar("_T")


def run_collective(spec: DistributedSpec, collective: str, what: str, call: Callable[[], _T]) -> _T:
    try:
        return call()
    except DistributedError:
        raise
    except Exception as exc:  # DistBackendError, RuntimeError (gloo: connection closed, timed out)
        timeout = f"{spec.timeout_s:g} s (collective_timeout_s)" if spec.timeout_s is not None \
            else "the process group's own timeout"
        raise DistributedError(
            f"{collective} failed on rank {spec.rank} of {spec.world_size} ({what}): {exc}. Another rank "
            f"probably died or stopped calling collectives (see its log); a rank waits at most {timeout}. "
            "Every rank must run the same steps: the same number of micro-batches, and gradients for the "
            "same parameters in the same order; with partitioned state also every forward, evaluation and "
            "export (each weight is gathered from every rank)") from exc


def all_reduce_mean_(tensor: torch.Tensor, spec: DistributedSpec, what: str) -> torch.Tensor:
    """Averages ``tensor`` over the ranks, in place (sum, then divide by the world size); returns it.

    The backend reduces a private copy (on the rank's device with NCCL), copied back after: a
    backend's work object may hold the tensor it reduced for a while after the call returned
    (seen with gloo), and ``tensor`` is often a view of a pinned pool block that must be freed."""
    if not spec.is_distributed:
        return tensor

    def call() -> torch.Tensor:
        work = tensor.to(spec.device, copy=True) if spec.backend == "nccl" else tensor.clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        work.div_(spec.world_size)
        tensor.copy_(work)
        return tensor
    return run_collective(spec, "all_reduce", what, call)


def barrier(spec: DistributedSpec, what: str) -> None:
    if spec.is_distributed:
        run_collective(spec, "barrier", what, lambda: dist.barrier())


def all_gather_bytes(data: bytes, spec: DistributedSpec, what: str) -> list[bytes]:
    """Every rank's ``data``, in rank order (lengths first, then the bytes padded to the longest)."""
    if not spec.is_distributed:
        return [data]
    device = torch.device(spec.device)

    def call() -> list[bytes]:
        n = spec.world_size
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = torch.empty(n, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(sizes, size)
        lengths = sizes.cpu().tolist()
        width = max(lengths) or 1
        mine = torch.zeros(width, dtype=torch.uint8)
        if data:
            mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = torch.empty(n * width, dtype=torch.uint8, device=device)
        dist.all_gather_into_tensor(out, mine.to(device))
        flat = out.cpu()
        return [bytes(flat[r * width: r * width + lengths[r]].numpy().tobytes()) for r in range(n)]
    return run_collective(spec, "all_gather", what, call)


def agree(spec: DistributedSpec, error: Optional[str], what: str) -> None:
    """Every rank says whether its part of ``what`` failed (``error``, a message, or None); when any
    did, every rank raises, the failed ranks named - no rank goes on alone into a collective the
    others will never call."""
    if not spec.is_distributed:
        return
    messages = all_gather_bytes((error or "").encode(), spec, what)
    failed = [(r, m.decode(errors="replace")) for r, m in enumerate(messages) if m]
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
        raise DistributedError(f"{what} failed on {len(failed)} of {spec.world_size} rank(s): {detail}")


def agreed_failure(spec: DistributedSpec, failure: Optional[BaseException], what: str) -> Optional[BaseException]:
    """The error to raise after every rank tried ``what``: this rank's own ``failure``, else another
    rank's (a :class:`DistributedError` naming it), else None. One process: ``failure``."""
    if not spec.is_distributed:
        return failure
    try:
        agree(spec, f"{type(failure).__name__}: {failure}" if failure is not None else None, what)
    except DistributedError as exc:
        return failure or exc
    return failure


def check_same_sequence(spec: DistributedSpec, items: list[str], what: str) -> None:
    """Every rank's ``items`` must be the same list in the same order (the gradients a window
    averaged, the initial weights' checksums); else every rank raises a DistributedError naming
    the first place where a rank differs from rank 0. One all-gather."""
    if not spec.is_distributed:
        return
    gathered = [b.decode().split("\n") if b else [] for b in
                all_gather_bytes("\n".join(items).encode(), spec, what)]
    reference = gathered[0]
    for rank, mine in enumerate(gathered[1:], 1):
        if mine == reference:
            continue
        at = next((i for i, (a, b) in enumerate(zip(reference, mine)) if a != b), min(len(reference), len(mine)))
        ref_item = reference[at] if at < len(reference) else "(nothing)"
        its_item = mine[at] if at < len(mine) else "(nothing)"
        raise DistributedError(f"{what}: rank {rank} differs from rank 0 at position {at} ({its_item} vs {ref_item}; "
                               f"{len(mine)} vs {len(reference)} items)")


def fingerprints(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """``name:crc32c`` of each tensor's bytes (a CUDA tensor is read to the host, one at a time)."""
    out = []
    for name, t in named:
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        out.append(f"{name}:{crc32c.crc32c(data):08x}")
    return out
