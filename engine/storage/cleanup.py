"""Removes the engine's private swap directories at exit: normal exit, an uncaught
exception (atexit) and SIGTERM / SIGINT-without-a-Python-handler (a signal handler
that cleans up, then lets the previous disposition act)."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import threading

_dirs: set[str] = set()
_lock = threading.Lock()
_installed = False


def register(path: str) -> None:
    """Removes ``path`` (recursively) when the process ends, unless unregistered first."""
    global _installed
    with _lock:
        _dirs.add(path)
        if not _installed:
            _installed = True
            atexit.register(remove_all)
            _install_signal_handlers()


def unregister(path: str) -> None:
    with _lock:
        _dirs.discard(path)


def remove_all() -> None:
    with _lock:
        dirs = list(_dirs)
        _dirs.clear()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still applies
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous = signal.getsignal(sig)
        if previous is signal.default_int_handler or previous is signal.SIG_IGN or previous is None:
            # KeyboardInterrupt unwinds normally (context managers, atexit); ignored stays ignored.
            continue
        signal.signal(sig, _make_handler(previous))


def _make_handler(previous):
    def handler(signum, frame):
        remove_all()
        if callable(previous):
            previous(signum, frame)
        else:  # SIG_DFL: die of the same signal, as the process would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
    return handler
