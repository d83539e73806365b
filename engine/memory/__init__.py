"""Host memory: the pinned pool and the profiler (the planner is engine.offload.planner)."""
from .pool import PinnedPool, PoolBlock
from .profiler import MemoryProfiler

__all__ = ["MemoryProfiler", "PinnedPool", "PoolBlock"]
