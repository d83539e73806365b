"""MemAscend-engine: SSD-offload training with small, predictable host memory.

The native core (``engine._native``) provides the page-locked :class:`PinnedPool`
and the :class:`AsyncIO` NVMe engine; the rest of the package builds on them.
"""
from __future__ import annotations

# Public submodules, re-exported as attributes: engine._native (the native core) and
# engine.peft (LoRA and Hugging Face peft models).
from . import _native as _native
from . import peft as peft
from .api import from_pretrained, initialize, plan
from .config import AdamWConfig, Config, ConfigError, OptimizerConfig
from .errors import AsyncIOError, EngineError, PinnedMemoryError, PoolExhaustedError
from .memory.pool import PinnedPool, PoolBlock
from .storage.aio import AsyncFile, AsyncIO, IORequest
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "AdamWConfig", "Config", "ConfigError", "OptimizerConfig", "from_pretrained", "initialize", "plan",
    "AsyncFile", "AsyncIO", "AsyncIOError", "EngineError", "IORequest", "PinnedMemoryError",
    "PinnedPool", "PoolBlock", "PoolExhaustedError", "Trainer", "__version__",
]
