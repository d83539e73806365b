"""NVMe storage: the asynchronous I/O engine (and, in later layers, the TensorStore)."""
from .aio import AsyncFile, AsyncIO, IORequest

__all__ = ["AsyncFile", "AsyncIO", "IORequest"]
