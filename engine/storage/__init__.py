"""NVMe storage: the asynchronous I/O engine (and, in later layers, the TensorStore)."""
from .aio import AsyncFile, AsyncIO, IORequest
from .store import Segment, StoreRequest, TensorMeta, TensorStore

__all__ = ["AsyncFile", "AsyncIO", "IORequest", "Segment", "StoreRequest", "TensorMeta", "TensorStore"]
