"""Host memory: the pinned pool (and, in later layers, the planner and profiler)."""
from .pool import PinnedPool, PoolBlock

__all__ = ["PinnedPool", "PoolBlock"]
