"""Saving a checkpoint with several ranks: rank 0 alone (replicated state), or every rank its shards.

Replicated state (:func:`on_main_rank`): rank 0 writes the whole checkpoint, the others wait for
its result. Partitioned state (:func:`save_partitioned`, ``runtime.partition`` set): rank 0
locks the checkpoint root and makes the temporary directory; every rank writes its own pieces
of the store tensors into it (``state-rank-<r>-of-<N>-<i>-of-<k>.safetensors``: 1-D tensors of
the elements it owns, under the tensors' own names, streamed from its store); rank 0 also writes
the replicated tensors and RNG files. The ranks' file lists (sizes, CRC32Cs, pieces) are
gathered; rank 0 checks every file is there with its size, writes the manifest and commits
(rename, ``latest``). A failure on any rank removes the temporary directory and fails every rank;
the checkpoint appears complete or not at all. The checkpoint directory must be one file system
that every rank's machine shares (a local disk per machine cannot hold rank 0's directory).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import torch

from ..distributed import DistributedSpec, all_gather_bytes
from ..dtypes import TO_SAFETENSORS
from ..errors import AgreedFailure
from ..storage.staging import STAGING_BLOCKS, staging_blocks
from .atomic import MANIFEST, CheckpointRoot, pause_point, write_file
from .format import CheckpointError
from .manifest import FORMAT
from .slots import Slot
from .transfer import Entry, staging_bytes_for, write_safetensors

if TYPE_CHECKING:
    from ..offload.runtime import OffloadRuntime

_R = TypeVar("_R")


def _describe(error: Optional[BaseException]) -> Optional[str]:
    return f"{type(error).__name__}: {error}" if error is not None else None


def on_main_rank(runtime: "OffloadRuntime", what: str, write: Callable[[], _R]) -> _R:
    """``write()`` on rank 0 only (its result must be JSON: a path, a list of files); the other
    ranks wait for it and return the same result, or raise rank 0's error. One process: ``write()``.
    The others wait inside a collective: ``collective_timeout_s`` must exceed the longest write."""
    return on_main(runtime.distributed, what, write)


def on_main(spec: DistributedSpec, what: str, write: Callable[[], _R]) -> _R:
    """:func:`on_main_rank` given the ranks' :class:`~engine.distributed.DistributedSpec`."""
    if not spec.is_distributed:
        return write()
    result: Any = None
    error: Optional[BaseException] = None
    if spec.is_main:
        try:
            result = write()
        except BaseException as exc:  # told to the others first, raised below
            error = exc
    payload = json.dumps(dict(ok=error is None, result=result, error=_describe(error))).encode() \
        if spec.is_main else b""
    told = json.loads(all_gather_bytes(payload, spec, f"{what} (waiting for rank 0)")[0])
    if error is not None:
        raise error
    if not told["ok"]:
        raise CheckpointError(f"{what} failed on rank 0, which writes it: {told['error']}")
    return told["result"]


def export_collectively(spec: DistributedSpec, entries: list[Entry], write: Callable[[list[Entry]], list[str]],
                        what: str) -> list[str]:
    """A partitioned export, called by every rank with the same ``entries``, whose producers gather
    (collectives: ``runtime.weight``). Rank 0 runs ``write(entries)``, which calls each producer once,
    in order, and writes it; the other ranks call the same producers in the same order and drop each
    value, so one tensor at a time is whole in a rank's memory.

    Failures keep the ranks in step: a producer whose read failed on any rank raises
    :class:`~engine.errors.AgreedFailure` on every rank at that same tensor, so all stop there (rank 0's
    writer leaves nothing committed). A failure of rank 0's own writing (its disk) happens on rank 0
    alone: it then still calls the producers it did not reach, since the others wait in them. Every
    rank finally learns rank 0's outcome and raises with it. Returns rank 0's files on rank 0, ``[]``
    on the others."""
    called: set[int] = set()
    stopped: list[AgreedFailure] = []  # every rank stopped at the same producer

    def counted(i: int, produce: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            called.add(i)
            try:
                return produce()
            except AgreedFailure as exc:
                stopped.append(exc)
                raise
        return call

    # An empty tensor is never produced (the writer skips it): no gather, on any rank.
    wrapped = [e if not callable(e.source) else Entry(e.name, e.dtype, e.shape, torch.empty(e.shape, dtype=e.dtype))
               if e.nbytes == 0 else Entry(e.name, e.dtype, e.shape, counted(i, e.source))
               for i, e in enumerate(entries)]

    def drain() -> None:
        for i, entry in enumerate(wrapped):
            if stopped:
                return
            if i not in called and callable(entry.source):
                try:
                    del_value = entry.source()  # type: ignore[operator]
                except AgreedFailure:
                    return  # every rank stopped here
                del del_value

    if not spec.is_main:
        drain()

    def main_write() -> list[str]:
        try:
            files = write(wrapped)
        except BaseException:
            if not stopped:  # rank 0's own failure: the others still wait in the producers it skipped
                try:
                    drain()
                except Exception:  # the first error is the one to report
                    pass
            raise
        drain()  # (nothing left: the writer calls every producer, in order)
        return files

    try:
        files = on_main(spec, what, main_write)
    except CheckpointError:
        if stopped:  # rank 0 failed at the same tensor: this rank's own (agreed) error says more
            raise stopped[0] from None
        raise
    if stopped:
        raise stopped[0]
    return files if spec.is_main else []


def rank_file(rank: int, world_size: int, index: int, count: int) -> str:
    return f"state-rank-{rank:05d}-of-{world_size:05d}-{index + 1:05d}-of-{count:05d}.safetensors"


def write_own(runtime: "OffloadRuntime", tmp: str, shards: list[list[Slot]]) -> tuple[dict, dict]:
    """This rank's pieces of the store tensors into ``tmp``: (files, pieces) for the manifest."""
    spec = runtime.distributed
    store = runtime.store
    files: dict[str, dict] = {}
    pieces: dict[str, dict] = {}
    shards = [group for group in shards if group]
    largest = max((s.nbytes for group in shards for s in group), default=1)
    with staging_blocks(runtime.pool, staging_bytes_for(store, largest), 2 * STAGING_BLOCKS) as blocks:
        for index, group in enumerate(shards):
            fname = rank_file(spec.rank, spec.world_size, index, len(shards))
            entries = [Entry(s.name, s.dtype, s.stored_shape, s.source) for s in group]  # type: ignore[arg-type]
            result = write_safetensors(os.path.join(tmp, fname), entries, store, blocks,
                                       metadata={"format": "pt", "producer": FORMAT, "rank": str(spec.rank)},
                                       io=runtime.io)
            files[fname] = dict(bytes=result["bytes"], crc32c=result["crc32c"], rank=spec.rank)
            for s in group:
                assert s.range is not None
                pieces[s.name] = dict(file=fname, start=s.range[0], stop=s.range[1],
                                      crc32c=result["tensors"][s.name], rank=spec.rank)
            pause_point("shard-written")
    return files, pieces


def save_partitioned(runtime: "OffloadRuntime", root: CheckpointRoot, tag: str, slots: list[Slot],
                     own_shards: list[list[Slot]], write_replicated: Callable[[str], tuple[dict, dict]],
                     manifest_of: Callable[[dict, dict], dict], after_commit: Callable[[str], None]) -> str:
    """The partitioned save (module docstring). ``slots``: every saved slot (the same list on every
    rank); ``own_shards``: this rank's non-empty pieces, grouped into files; ``write_replicated(tmp)``
    (rank 0) writes the whole tensors and RNG files and returns their (files, tensors);
    ``manifest_of(files, tensors)`` the manifest; ``after_commit(final)`` retention."""
    spec = runtime.distributed
    with ExitStack() as held:
        def begin() -> str:
            held.enter_context(root.saving())  # held until every rank has written and rank 0 committed
            return root.begin(tag)
        tmp = on_main_rank(runtime, "save_checkpoint (the temporary directory)", begin)

        error: Optional[BaseException] = None
        report: dict = {}
        replicated: tuple[dict, dict] = ({}, {})
        try:
            if not os.path.isdir(tmp):
                raise CheckpointError(f"{tmp}: rank 0's temporary checkpoint directory is not visible on rank "
                                      f"{spec.rank}: with partitioned state every rank writes its shards into the "
                                      "checkpoint directory, which must be a file system all ranks' machines share")
            files, pieces = write_own(runtime, tmp, own_shards)
            if spec.is_main:
                replicated = write_replicated(tmp)
            report = dict(files=files, pieces=pieces)
        except Exception as exc:  # told to every rank below, then raised
            error = exc
        reports = [json.loads(b) for b in all_gather_bytes(
            json.dumps(dict(report=report, error=_describe(error))).encode(), spec,
            "save_checkpoint (the files each rank wrote)")]
        failed = [(r, rep["error"]) for r, rep in enumerate(reports) if rep["error"]]
        if failed:
            if spec.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None:
                raise error
            raise CheckpointError("save_checkpoint failed on " + "; ".join(f"rank {r}: {m}" for r, m in failed)
                                  + "; no checkpoint was written")

        def commit() -> str:
            try:
                files, tensors = dict(replicated[0]), dict(replicated[1])
                for rank, rep in enumerate(reports):
                    for fname, info in rep["report"]["files"].items():
                        _check_written(tmp, fname, info, rank)
                        files[fname] = info
                for s in slots:
                    if s.range is None:
                        continue
                    shards = [rep["report"]["pieces"][s.name] for rep in reports if s.name in rep["report"]["pieces"]]
                    tensors[s.name] = dict(dtype=TO_SAFETENSORS[s.dtype], shape=list(s.shape), partitioned=True,
                                           shards=shards)
                write_file(tmp, MANIFEST, json.dumps(manifest_of(files, tensors), indent=1).encode())
                pause_point("manifest-written")
                final = root.commit(tmp, tag)
            except BaseException:
                if os.path.isdir(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            after_commit(final)
            return final
        return on_main_rank(runtime, "save_checkpoint", commit)


def _check_written(tmp: str, fname: str, info: dict, rank: int) -> None:
    """A file rank ``rank`` says it wrote is in rank 0's temporary directory, with its size."""
    path = os.path.join(tmp, fname)
    try:
        size = os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: rank {rank} wrote this file, but rank 0 does not see it: the checkpoint "
                              "directory must be a file system all ranks' machines share") from None
    if size != info["bytes"]:
        raise CheckpointError(f"{path}: rank {rank} wrote {info['bytes']} bytes, rank 0 sees {size}")
