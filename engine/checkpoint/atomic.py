"""Crash-safe checkpoint directories: temporary name, fsync, rename, ``latest`` last, retention.

Layout of a checkpoint root::

    root/                     0700
      latest                  "<tag>\\n" - replaced atomically, after the checkpoint it names is complete
      <tag>/                  0700, one complete checkpoint: manifest.json + safetensors shards (0600)
      .tmp-<tag>-<pid>-<id>/  a save in progress (or killed): ignored, removed by the next save
      .trash-<tag>-<pid>-<id>/ a checkpoint being deleted (retention, or replaced by a save of the same tag)
      .save-lock              held (flock) by the one process saving here; removed when its save ends

A save writes everything under ``.tmp-*``, fsyncs every file and the directory,
renames it to ``<tag>`` (an atomic exchange when the tag already exists), fsyncs
the root, then replaces ``latest`` the same way. A process killed at any point
leaves ``latest`` naming a complete checkpoint. Deletion renames to ``.trash-*``
first, so a half-deleted directory is never mistaken for a checkpoint.
One process saves to a root at a time: :meth:`CheckpointRoot.saving` holds an exclusive
``flock`` on ``.save-lock`` for the whole save (retention included), and a second saver fails
at once naming the holder's pid rather than deleting the other's checkpoints through retention.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from .._log import logger
from .format import CheckpointError, LatestNotDurableError, LatestNotUpdatedError, open_regular

# Re-exported: the checkpoint root's callers (and tests) name them here.
from .private import (  # noqa: F401
    NAME,
    TMP_PREFIX,
    PrivateOutput,
    check_name,
    fsync_path,
    inside,
    json_bytes,
    make_private_dir,
    open_dir,
    open_private,
    remove_quietly,
    write_file,
)

LATEST = "latest"
MANIFEST = "manifest.json"
TRASH_PREFIX = ".trash-"
LOCK = ".save-lock"
PAUSE_ENV = "MEMASCEND_CHECKPOINT_PAUSE_AT"
MAX_LATEST_BYTES = 4096  # a tag and a newline


def pause_point(name: str) -> None:
    """Test hook for the crash tests: when ``$MEMASCEND_CHECKPOINT_PAUSE_AT`` names this point,
    print ``PAUSED <name>`` on stdout and wait to be killed. Costs one environment lookup."""
    if os.environ.get(PAUSE_ENV) == name:
        sys.stdout.write(f"PAUSED {name}\n")
        sys.stdout.flush()
        while True:
            time.sleep(3600)


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a!r} <-> {b!r} failed: {os.strerror(err)}")


class CheckpointRoot:
    """A directory of checkpoints with a ``latest`` pointer."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.fspath(root))

    # ---------------------------------------------------------------- reading
    def latest(self) -> Optional[str]:
        """The tag ``latest`` names, or None when there is no ``latest``."""
        path = os.path.join(self.root, LATEST)
        if not os.path.lexists(path):
            return None
        with os.fdopen(open_regular(path, f"the {LATEST!r} pointer"), "rb") as f:
            data = f.read(MAX_LATEST_BYTES + 1)
        try:
            tag = data.decode().strip() if len(data) <= MAX_LATEST_BYTES else None
        except UnicodeDecodeError:
            tag = None
        if tag is None:
            raise CheckpointError(f"{path}: not a checkpoint tag ({len(data)} bytes, expected one short line of text)")
        return check_name(tag, "checkpoint tag in 'latest'")

    def resolve(self, tag: Optional[str] = None) -> str:
        """The directory of checkpoint ``tag`` (default: the one ``latest`` names). ``root`` may
        also be a checkpoint directory itself (it holds a manifest)."""
        if tag is None and os.path.isfile(os.path.join(self.root, MANIFEST)):
            return self.root
        if tag is None:
            tag = self.latest()
            if tag is None:
                raise CheckpointError(f"{self.root}: no checkpoint here (no {LATEST!r} pointer and no {MANIFEST})")
        path = inside(self.root, tag, "checkpoint tag")
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise CheckpointError(f"{path}: checkpoint {tag!r} is missing or incomplete (no {MANIFEST})")
        return path

    def complete(self) -> list[str]:
        """Tags of the complete checkpoints here (a manifest inside, not temporary or trash)."""
        if not os.path.isdir(self.root):
            return []
        return sorted(name for name in os.listdir(self.root)
                      if NAME.match(name) and os.path.isfile(os.path.join(self.root, name, MANIFEST)))

    # ---------------------------------------------------------------- writing
    @contextmanager
    def saving(self) -> Iterator[None]:
        """Holds this root's save lock (creating the root 0700) for the duration of a save; a
        second saver, in this process or another, gets a :class:`CheckpointError` at once."""
        make_private_dir(self.root)
        fd = self._lock()
        try:
            yield
        finally:
            try:
                os.unlink(os.path.join(self.root, LOCK))  # while locked: see _lock
            except FileNotFoundError:
                pass
            os.close(fd)  # releases the flock

    def _lock(self) -> int:
        path = os.path.join(self.root, LOCK)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise CheckpointError(f"{path}: refusing the save lock: not a regular file; remove it")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise CheckpointError(f"{self.root}: another save to this checkpoint directory is in progress "
                                          f"(pid {holder}, lock {path}); two savers would delete each other's "
                                          "checkpoints through keep_last. Save to another directory, or wait for "
                                          "it to finish") from None
                # The holder unlinks the lock file before releasing it: if the file locked is no
                # longer the one at ``path``, a newer saver owns the lock and we try again.
                try:
                    current = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    current = None
                mine = os.fstat(fd)
                if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise

    def begin(self, tag: str) -> str:
        """Removes leftovers of killed saves and returns a new private temporary directory."""
        check_name(tag, "checkpoint tag")
        make_private_dir(self.root)
        self.clean_partials()
        path = os.path.join(self.root, f"{TMP_PREFIX}{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(path, 0o700)
        return path

    def clean_partials(self) -> list[str]:
        """Removes ``.tmp-*`` / ``.trash-*`` directories left by saves that were killed (those of a
        live process other than this one are left alone)."""
        removed = []
        for name in os.listdir(self.root):
            if not name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                continue
            pid = _pid_of(name)
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            path = os.path.join(self.root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(name)
        if removed:
            logger.info("checkpoint: removed %d partial save(s) in %s: %s", len(removed), self.root, ", ".join(removed))
        return removed

    def commit(self, tmp: str, tag: str) -> str:
        """Makes the finished ``tmp`` directory checkpoint ``tag`` and points ``latest`` at it."""
        fsync_path(tmp)
        final = os.path.join(self.root, tag)
        pause_point("before-rename")
        if os.path.lexists(final):
            # Replacing a tag: swap atomically, so ``tag`` is complete at every instant.
            if _renameat2_exchange(tmp, final):
                old = tmp
            else:
                old = tmp + ".old"
                os.rename(final, old)
                os.rename(tmp, final)
            trash = os.path.join(self.root, f"{TRASH_PREFIX}{tag}-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(old, trash)
            fsync_path(self.root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_path(self.root)
        pause_point("before-latest")
        try:
            previous = self.latest()
        except CheckpointError:
            previous = None  # unreadable: replaced below
        try:
            self._replace_latest(tag)
        except OSError as exc:
            raise LatestNotUpdatedError(os.path.join(self.root, LATEST), exc, final, previous) from exc
        try:  # 'latest' has moved: a failure now is not "still names the previous one"
            fsync_path(self.root)
        except OSError as exc:
            raise LatestNotDurableError(self.root, exc, final, previous) from exc
        pause_point("after-latest")
        return final

    def set_latest(self, tag: str) -> None:
        """Points ``latest`` at ``tag`` atomically and durably; on failure the temporary file is removed."""
        self._replace_latest(tag)
        fsync_path(self.root)

    def _replace_latest(self, tag: str) -> None:
        """Writes ``tag`` to a new temporary file and renames it over ``latest`` (no directory fsync)."""
        check_name(tag, "checkpoint tag")
        name = f"{TMP_PREFIX}{LATEST}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp = os.path.join(self.root, name)
        write_file(self.root, name, (tag + "\n").encode())
        try:
            os.rename(tmp, os.path.join(self.root, LATEST))
        except OSError:
            remove_quietly(tmp, f"a failed rename to {LATEST!r}")
            raise

    def retain(self, keep_last: int, order: dict[str, int]) -> list[str]:
        """Deletes all but the ``keep_last`` newest complete checkpoints (by ``order``, e.g. the save
        time in each manifest); never the one ``latest`` names. 0 keeps everything."""
        if keep_last <= 0:
            return []
        latest = self.latest()
        tags = sorted((t for t in self.complete() if t in order), key=lambda t: (order[t], t))
        doomed = [t for t in tags[:-keep_last] if t != latest]
        for tag in doomed:
            trash = os.path.join(self.root, f"{TRASH_PREFIX}{tag}-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(os.path.join(self.root, tag), trash)
            fsync_path(self.root)
            pause_point("retention")
            shutil.rmtree(trash, ignore_errors=True)
        if doomed:
            logger.info("checkpoint: removed old checkpoint(s) %s (keep_last=%d)", ", ".join(doomed), keep_last)
        return doomed


def _pid_of(name: str) -> Optional[int]:
    match = re.search(r"-(\d+)-[0-9a-f]{8}(\.old)?$", name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
