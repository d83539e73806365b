"""Host memory: the pinned pool, the planner (:mod:`.planner`) and the profiler."""
from .pool import PinnedPool, PoolBlock
from .profiler import MemoryProfiler

__all__ = ["MemoryProfiler", "PinnedPool", "PoolBlock"]
