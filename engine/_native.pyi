# The native core (csrc/, pybind11). Its Python wrappers (engine.memory.pool, engine.storage.aio,
# engine.optim.kernels) carry the types; to the type checker the extension's names are Any.
from typing import Any

def __getattr__(name: str) -> Any: ...
