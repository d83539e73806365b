"""Exceptions raised by the engine. Each names what failed and where."""
from __future__ import annotations

import os
from typing import Optional

from .units import format_bytes


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class PoolExhaustedError(EngineError, MemoryError):
    """A PinnedPool has no free block large enough for a request."""

    def __init__(self, requested: int, free_bytes: int, largest_free: int, capacity: int):
        self.requested = requested
        self.free_bytes = free_bytes
        self.largest_free = largest_free
        self.capacity = capacity
        super().__init__(
            f"PinnedPool exhausted: requested {requested} bytes, {free_bytes} bytes free "
            f"(largest free block {largest_free} bytes) of {capacity} bytes capacity"
        )


class PinnedMemoryError(EngineError, OSError):
    """Page-locking the pool failed and the caller required it (``require_locked=True``)."""


class InitializationError(EngineError, ValueError):
    """A meta-device model cannot be given a value (a parameter or buffer); names it and the fix."""


class AsyncIOError(EngineError, OSError):
    """An I/O request failed; names the file, the offset and the byte count."""

    def __init__(self, errno: int, message: str, path: str, offset: int, nbytes: int, op: str):
        super().__init__(errno, message)
        self.filename = path
        self.offset = offset
        self.nbytes = nbytes
        self.op = op

    def __str__(self) -> str:  # OSError's default would print the errno twice
        return self.strerror or ""


class StoreCapacityError(EngineError, OSError):
    """The NVMe paths cannot hold what the store was asked to hold; says needed vs available."""

    def __init__(self, needed: int, available: int, where: str):
        self.needed = needed
        self.available = available
        super().__init__(28, f"not enough disk space on {where}: {format_bytes(needed)} needed, "
                             f"{format_bytes(available)} available")

    def __str__(self) -> str:
        return self.strerror or ""


class IntegrityError(EngineError):
    """Data read back from a swap file does not match the checksum written with it."""

    def __init__(self, key: object, path: str, offset: int, nbytes: int, expected: int, actual: int):
        self.key, self.path, self.offset, self.nbytes = key, path, offset, nbytes
        super().__init__(f"CRC32C mismatch reading {key!r} from {path!r} at offset {offset} ({nbytes} bytes): "
                         f"written 0x{expected:08x}, read 0x{actual:08x} - the swap file is corrupt")


class TrainerClosedError(EngineError, RuntimeError):
    """A trainer (or the model whose weights it held) was used after ``close()``."""


class StreamingError(EngineError, RuntimeError):
    """A streamed weight was needed, or written, where the streamer cannot serve it; names the parameter and the fix."""


class StreamerDetachedError(StreamingError, TrainerClosedError):
    """A streamed weight was used after its streamer was detached without restoring it
    (``trainer.close()``): its data is only in the store. A :class:`TrainerClosedError` too, so
    code catching that sees a direct use of a weight and a forward through the model alike."""


class ModelAttachedError(EngineError, RuntimeError):
    """A model is already attached to a live trainer; a second one cannot stream it too."""


class ConfigError(EngineError, ValueError):
    """An invalid configuration; the message names the field and what is allowed.
    ``field``: the engine field at fault (``optimizer.lr``), when there is one."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


class PlanError(EngineError, MemoryError):
    """The configured budget (host memory or disk) cannot hold the run."""


class StagingExhaustedError(EngineError, MemoryError):
    """No staging slot can hold a tensor the forward/backward needs now."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and tensor."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint or export file failed (e.g. ENOSPC): an ``OSError`` with the errno, whose
    message and ``filename`` name the file."""

    def __init__(self, path: str, exc: OSError, message: Optional[str] = None):
        OSError.__init__(self, exc.errno, message or f"{path}: writing failed: {exc.strerror or exc}")
        self.filename = path

    def __str__(self) -> str:  # OSError's default would print the errno twice
        return self.strerror or ""


class LatestNotUpdatedError(CheckpointWriteError):
    """A save committed its checkpoint (complete, loadable by its tag) but could not update ``latest``,
    which still names the previous checkpoint. ``committed`` is the checkpoint's directory."""

    def __init__(self, path: str, exc: OSError, committed: str, previous: Optional[str]):
        self.committed = committed
        tag = os.path.basename(committed)
        super().__init__(path, exc, f"checkpoint {tag!r} was committed at {committed}, but updating {path} failed "
                                    f"({exc.strerror or exc}); 'latest' still names {previous!r}. Load it with "
                                    f"tag={tag!r}, or free space and save again")


class LatestNotDurableError(CheckpointWriteError):
    """A save committed its checkpoint and moved ``latest`` to it, but the fsync of the checkpoint
    root failed afterwards: the move may not survive a power cut (``latest`` could come back naming
    ``previous``). ``committed`` is the checkpoint's directory."""

    def __init__(self, root: str, exc: OSError, committed: str, previous: Optional[str]):
        self.committed = committed
        tag = os.path.basename(committed)
        super().__init__(root, exc, f"checkpoint {tag!r} was committed at {committed} and 'latest' names it, but "
                                    f"the fsync of {root} failed ({exc.strerror or exc}): the update of 'latest' "
                                    f"may not survive a power cut (it named {previous!r} before). Check the disk, "
                                    "then save again")


class DistributedError(EngineError, RuntimeError):
    """A collective or the process group failed (a peer died, a timeout, a bad torchrun environment);
    names the collective, the rank and what it was doing."""


class AgreedFailure(DistributedError):
    """A collective step failed on at least one rank and every rank knows it: all of them raise this at
    the same point (the failed rank's own error is its ``__cause__``), so none goes on alone into a
    collective the others will not call."""


class BenchError(EngineError, RuntimeError):
    """A benchmark configuration failed; the message holds the end of its stderr."""


class CLIError(EngineError):
    """Bad command-line input or a feature this build lacks; printed as one line."""


class DataError(EngineError, ValueError):
    """Training data that cannot be read as documents: the message names the file, the row
    or field, and the fix."""
