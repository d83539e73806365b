"""The engine's logger, and a warning that is said once per process."""
from __future__ import annotations

import logging
import threading

logger = logging.getLogger("engine")

_said: set[str] = set()
_said_lock = threading.Lock()


def warn_once(key: str, message: str) -> None:
    """Logs ``message`` as a warning the first time ``key`` is seen in this process."""
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    logger.warning(message)
