"""A streamer with a pool and a store of its own: the streamer used without a runtime
(tests, benchmarks, a script streaming one model through inference or its own training loop)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..memory.pool import PinnedPool
from ..storage import TensorStore
from ..validate import BufferPool, PinnedAlloc
from .buffers import plan_staging
from .grad_hooks import GradCallback
from .params import DEFAULT_RESIDENT_THRESHOLD
from .streamer import ParameterStreamer


def open_streamer(model: nn.Module, paths, *, store: str = "direct", prefetch_depth: int = 1,
                  resident_threshold_bytes: int = DEFAULT_RESIDENT_THRESHOLD, buffer_pool: BufferPool = "adaptive",
                  buffer_count: Optional[int] = None, pinned_alloc: PinnedAlloc = "exact",
                  device: Union[str, torch.device] = "cpu", on_grad: Optional[GradCallback] = None,
                  checksum: bool = True, backend: str = "auto", **store_kwargs) -> ParameterStreamer:
    """Builds the PinnedPool (sized by the plan), a TensorStore on ``paths`` and an attached streamer.

    ``store`` is the store-layout ablation switch (``"direct"`` | ``"files"``), passed through to
    :class:`~engine.storage.TensorStore`; the pool is registered with the store's io_uring.
    ``streamer.close()`` closes all three.
    """
    plan = plan_staging(model, prefetch_depth=prefetch_depth, resident_threshold_bytes=resident_threshold_bytes,
                        buffer_pool=buffer_pool, buffer_count=buffer_count)
    pool = PinnedPool(max(plan.total_bytes, 4096)) if pinned_alloc == "exact" else None
    try:
        tstore = TensorStore(paths, layout=store, pool=pool, checksum=checksum, backend=backend, **store_kwargs)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    streamer = ParameterStreamer(model, tstore, pool, prefetch_depth=prefetch_depth,
                                 resident_threshold_bytes=resident_threshold_bytes, buffer_pool=buffer_pool,
                                 buffer_count=buffer_count, pinned_alloc=pinned_alloc, device=device,
                                 owns_store=True, owns_pool=True, on_grad=on_grad)
    try:
        streamer.attach()
    except BaseException:
        tstore.close()
        if pool is not None:
            pool.close()
        raise
    return streamer
