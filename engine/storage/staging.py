"""Pinned staging blocks for chunked copies into and out of the TensorStore.

Shared by the trainer (importing fp32 masters) and the checkpoint code (store <-> file):
host memory for a copy is a few blocks of one store segment, whatever the tensor size.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Hashable, Iterator, Optional

import torch

from .._log import logger
from ..errors import PoolExhaustedError
from ..memory.pool import PinnedPool, PoolBlock, round_up_io
from ..units import format_bytes
from .store import TensorStore

STAGING_BLOCKS = 2


@contextmanager
def staging_blocks(pool: Optional[PinnedPool], nbytes: int, count: int = STAGING_BLOCKS) -> Iterator[list[PoolBlock]]:
    """``count`` pinned blocks of ``nbytes`` from ``pool`` (between steps the trainer's pool has
    its gradient staging free). If the pool has no room, a private pool of exactly that size is
    made for the copy and the fact is logged."""
    blocks: list[PoolBlock] = []
    private: Optional[PinnedPool] = None
    try:
        try:
            if pool is None:
                raise PoolExhaustedError(nbytes, 0, 0, 0)
            for _ in range(count):
                blocks.append(pool.alloc(nbytes))
        except PoolExhaustedError:
            if not blocks:
                logger.info("chunked store I/O: the trainer's pool has no free %s block; using a private %s pool",
                            format_bytes(nbytes), format_bytes(count * nbytes))
                private = PinnedPool(count * nbytes)
                blocks = [private.alloc(nbytes) for _ in range(count)]
        yield blocks
    finally:
        blocks.clear()  # a block returns to its pool with its last reference
        if private is not None:
            private.close()


def put_chunked(store: TensorStore, key: Hashable, tensor: torch.Tensor, pool: Optional[PinnedPool]) -> None:
    """``store.put`` without its full-size staging copy: the tensor goes to the store one segment
    at a time through two pool blocks (for importing tensors as large as DRAM allows)."""
    tensor = tensor.detach().contiguous()
    store.allocate(key, tensor.shape, tensor.dtype)
    numel, size = tensor.numel(), tensor.element_size()
    if numel == 0:
        store.write_from(key, torch.empty(0, dtype=torch.uint8), 0, 0).wait()
        return
    flat = tensor.reshape(-1)
    seg = store.segment_elements
    with staging_blocks(pool, round_up_io(min(seg, numel) * size)) as blocks:
        free, inflight = list(blocks), deque()
        try:
            for start in range(0, numel, seg):
                n = min(seg, numel - start)
                if not free:
                    request, block = inflight.popleft()
                    request.wait()
                    free.append(block)
                block = free.pop()
                block.tensor(n, tensor.dtype).copy_(flat[start:start + n])
                inflight.append((store.write_from(key, block.tensor(round_up_io(n * size), torch.uint8),
                                                  start * size, n * size), block))
            while inflight:
                inflight.popleft()[0].wait()
        finally:
            for request, _block in inflight:
                try:
                    request.wait()
                except Exception:  # the first error is already propagating
                    pass
            inflight.clear()
            free.clear()
