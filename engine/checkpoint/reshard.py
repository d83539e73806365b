"""Loading a checkpoint's tensors into this rank's state, whatever world size saved it.

Each (checkpoint tensor, target) pair is loaded one of two ways:

direct
    the file holds exactly what the target takes: a whole tensor into a whole target, or - the
    same partition as when saved (same world size and alignment) - this rank's own piece into its
    store key. Streamed by :func:`~.transfer.load_safetensors` in file order, every byte CRC-checked
    inline: a same-size resume reads only this rank's files (and the replicated ones).
pieced
    anything else (N -> M ranks, whole <-> partitioned): the elements the target holds are read
    from whichever files hold them (ranges from the manifest, :mod:`.layout`), one store segment
    at a time into a pinned block, converted when dtypes differ, and written to the store; a
    whole in-DRAM target (a module-resident weight, a DRAM master) is read whole.

Pieced reads check no checksum themselves: every file is also read whole and verified by some
rank (:func:`~.layout.files_to_verify`), and the load is agreed on by every rank
(:func:`~engine.checkpoint.state.load_checkpoint`), so a corrupt file fails every rank.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..dtypes import itemsize
from ..memory.pool import PoolBlock, round_up_io
from ..storage.store import TensorStore
from .format import CheckpointError, SafetensorsFile, open_regular, pread_into
from .layout import Layout, SavedTensor, files_to_verify
from .transfer import StoreTarget, TensorTarget, load_safetensors


def direct_file(saved: SavedTensor, target: object, store: Optional[TensorStore], here: Layout, there: Layout,
                rank: int) -> Optional[str]:
    """The file ``target`` loads ``saved`` from as it is stored there, or None (pieced)."""
    if not saved.partitioned:
        if isinstance(target, TensorTarget):
            return saved.pieces[0].file
        if isinstance(target, StoreTarget) and store is not None and target.start == 0 \
                and tuple(store.meta(target.key).shape) == saved.shape:
            return saved.pieces[0].file
        return None
    if isinstance(target, StoreTarget) and store is not None and here == there:
        piece = next((p for p in saved.pieces if p.rank == rank), None)
        meta = store.meta(target.key)
        if piece is not None and piece.start == target.start and tuple(meta.shape) == (piece.numel,):
            return piece.file
    return None


class PieceReader:
    """Reads element ranges of checkpoint tensors from the files holding them (descriptors cached)."""

    def __init__(self, headers: dict[str, SafetensorsFile]):
        self.headers = headers
        self.fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def read(self, saved: SavedTensor, start: int, stop: int, out: memoryview) -> None:
        """Elements ``[start, stop)`` of ``saved`` (flattened, in its saved dtype) into ``out``'s bytes."""
        size = itemsize(saved.dtype)
        covered = start
        for piece in saved.overlapping(start, stop):
            a, b = max(start, piece.start), min(stop, piece.stop)
            if a != covered:
                break
            parsed = self.headers[piece.file]
            info = parsed.tensors[saved.name]
            if piece.file not in self.fds:
                self.fds[piece.file] = open_regular(parsed.path)
            pread_into(self.fds[piece.file], out[(a - start) * size:(b - start) * size],
                       parsed.offset(info) + (a - piece.start) * size, parsed.path, saved.name)
            covered = b
        if covered != stop:
            raise CheckpointError(f"tensor {saved.name!r}: elements [{covered}, {stop}) are in none of the "
                                  "checkpoint's files")


def load_pieced(reader: PieceReader, saved: SavedTensor, target: object, store: Optional[TensorStore],
                block: PoolBlock) -> None:
    """Loads the elements ``target`` holds of ``saved`` (see the module docstring)."""
    if isinstance(target, TensorTarget):
        whole = torch.empty(saved.numel, dtype=saved.dtype)
        reader.read(saved, 0, saved.numel, memoryview(whole.view(torch.uint8).numpy()))
        target.accept(whole.view(saved.shape))
        return
    assert isinstance(target, StoreTarget) and store is not None
    meta = store.meta(target.key)
    numel = 1
    for s in meta.shape:
        numel *= s
    if target.start < 0 or target.start + numel > saved.numel:
        raise CheckpointError(f"tensor {saved.name!r}: this rank holds elements [{target.start}, "
                              f"{target.start + numel}) but the checkpoint's tensor has {saved.numel}")
    src_size, dst_size = itemsize(saved.dtype), itemsize(meta.dtype)
    step = store.segment_elements  # partial store writes cover whole segments
    if min(step, numel) * dst_size > block.size:
        raise CheckpointError(f"tensor {saved.name!r}: a {block.size}-byte staging block cannot hold one store "
                              "segment; this is an engine bug, please report it")
    for offset in range(0, numel, step):
        n = min(step, numel - offset)
        first = target.start + offset
        if meta.dtype == saved.dtype:
            view = memoryview(block.tensor(round_up_io(n * dst_size), torch.uint8).numpy())[:n * src_size]
            reader.read(saved, first, first + n, view)
            del view
        else:  # an explicit conversion: the source chunk is read aside and cast into the block
            raw = torch.empty(n, dtype=saved.dtype)
            reader.read(saved, first, first + n, memoryview(raw.view(torch.uint8).numpy()))
            block.tensor(n, meta.dtype).copy_(raw)
            del raw
        store.write_from(target.key, block.tensor(round_up_io(n * dst_size), torch.uint8),
                         offset * dst_size, n * dst_size).wait()


def load_tensors(manifest: dict, headers: dict[str, SafetensorsFile], saved: dict[str, SavedTensor],
                 plan: dict[str, list], store: Optional[TensorStore], blocks: list[PoolBlock], *,
                 here: Layout, there: Layout, rank: int, world_size: int) -> None:
    """Loads every ``plan`` entry (checkpoint tensor name -> its targets) on this rank, after
    reading whole (and verifying) the files :func:`~.layout.files_to_verify` gives it."""
    direct: dict[str, dict[str, list]] = {}
    pieced: list[tuple[SavedTensor, object]] = []
    for name, targets in plan.items():
        for target in targets:
            fname = direct_file(saved[name], target, store, here, there, rank)
            if fname is None:
                pieced.append((saved[name], target))
            else:
                direct.setdefault(fname, {}).setdefault(name, []).append(target)
    for fname in files_to_verify(manifest, rank, world_size, set(direct)):
        header = headers[fname]
        crcs = {t.name: p.crc32c for t in saved.values() for p in t.pieces if p.file == fname}
        load_safetensors(header, direct.get(fname, {}), store, blocks, crcs, manifest["files"][fname]["crc32c"])
    reader = PieceReader(headers)
    try:
        for tensor, target in pieced:
            load_pieced(reader, tensor, target, store, blocks[0])
    finally:
        reader.close()
