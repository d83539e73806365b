"""The process group the engine trains in: the one already initialized, or one made from torchrun's environment.

* A default group that is already initialized (the user's ``init_process_group``, accelerate,
  DeepSpeed's ``init_distributed``) is used as it is, with its backend and its own timeout.
* Otherwise, when torchrun's environment says ``WORLD_SIZE`` > 1 (with ``RANK``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``), :func:`init_from_env` calls ``init_process_group``: NCCL when
  the compute device is CUDA (the rank's device is ``cuda:LOCAL_RANK``, made current), else gloo,
  with ``timeout=config.collective_timeout_s`` - the bound on how long a rank waits for a dead peer.
* A single process (no group, no ``WORLD_SIZE`` > 1): nothing is initialized, nothing changes.

Who destroys a group the engine created: nobody in the engine. It belongs to the process, not to
one trainer (a second trainer, an evaluation loop or the user's own collectives may use it), so
``Trainer.close()`` leaves it; call ``torch.distributed.destroy_process_group()`` at the end of
the script if you want it gone before exit (as in any torchrun script).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .._log import logger
from ..config import Config
from ..devices import ComputeDeviceSpec
from ..errors import DistributedError

_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedSpec:
    """Where this process stands among the ranks (a single process: rank 0 of 1, no backend)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: str = "cpu"  # where NCCL collectives take their tensors (cuda:LOCAL_RANK); gloo: the CPU
    created: bool = False  # this engine called init_process_group
    timeout_s: Optional[float] = None  # the group's collective timeout when the engine created it

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes checkpoints, exports and reports."""
        return self.rank == 0


SINGLE = DistributedSpec()


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def env_local_rank() -> Optional[int]:
    """This process's LOCAL_RANK when it runs among several ranks (torchrun's env or an initialized
    group), else None - the compute device "cuda" / "auto" becomes cuda:LOCAL_RANK then."""
    several = (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) \
        or (_env_int("WORLD_SIZE") or 1) > 1
    if not several:
        return None
    local = _env_int("LOCAL_RANK")
    if local is None and dist.is_initialized():
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local = dist.get_rank() % count if count else 0
    return local if local is not None else 0


def init_from_env(config: Config, device: ComputeDeviceSpec) -> DistributedSpec:
    """The group this process trains in (see the module docstring); :data:`SINGLE` for one process."""
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world == 1:
            return SINGLE
        rank = dist.get_rank()
        backend = str(dist.get_backend())
        local = env_local_rank() or 0
        if backend == "nccl":
            if device.kind != "cuda":  # NCCL reduces device tensors only
                raise DistributedError(f"the process group's backend is NCCL but the engine computes on "
                                       f"{device.kind!r}: use a gloo group for CPU ranks, or device 'cuda'/'auto'")
            torch.cuda.set_device(device.device)  # the user's group: inputs sent to "cuda" land on this rank's GPU
        where = str(device.device) if backend == "nccl" else "cpu"
        return DistributedSpec(rank, world, local, backend, where)
    world = _env_int("WORLD_SIZE") or 1
    if world <= 1:
        return SINGLE
    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [v for v in _TORCHRUN_VARS if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with "
                               "`torchrun --nproc-per-node N script.py`, or call torch.distributed.init_process_group "
                               "before engine.initialize")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    assert rank is not None and local is not None
    backend = "nccl" if device.kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device.device)
    timeout = float(config.collective_timeout_s)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:  # the store's rendezvous: a wrong address, a port in use, a peer that never came
        raise DistributedError(f"init_process_group({backend!r}) failed on rank {rank} of {world} "
                               f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                               f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}") from exc
    logger.info("process group: rank %d of %d (local rank %d), backend %s, timeout %g s",
                rank, world, local, backend, timeout)
    where = str(device.device) if backend == "nccl" else "cpu"
    return DistributedSpec(rank, world, local, backend, where, created=True, timeout_s=timeout)
