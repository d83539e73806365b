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
import json
import os
import re
import secrets
import shutil
import sys
import stat
import time
from contextlib import contextmanager
from typing import BinaryIO, Iterator, Optional, Union

from .._log import logger
from .format import (CheckpointError, LatestNotDurableError, LatestNotUpdatedError, named_write_error, open_regular,
                     write_all)

LATEST = "latest"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LOCK = ".save-lock"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
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


def check_name(name: str, what: str = "file name") -> str:
    """Refuses anything but a plain name inside the checkpoint directory (no separators, no
    ``..``, no leading dot)."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise CheckpointError(f"refusing {what} {name!r}: it must be a plain name inside the checkpoint directory")
    return name


def inside(directory: str, name: str, what: str = "file") -> str:
    """``directory/name`` after checking it resolves (symlinks followed) inside ``directory``."""
    check_name(name, what)
    path = os.path.join(directory, name)
    real_dir = os.path.realpath(directory)
    if os.path.dirname(os.path.realpath(path)) != real_dir:
        raise CheckpointError(f"refusing {what} {name!r}: it resolves to {os.path.realpath(path)!r}, outside the "
                              f"checkpoint directory {real_dir!r}")
    return path


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise named_write_error(path, exc) from exc
    finally:
        os.close(fd)


def make_private_dir(path: str) -> None:
    """Creates ``path`` and each missing parent 0700 (``os.makedirs`` would give the parents the
    umask's mode). An existing directory keeps its mode: the user chose it."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        make_private_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:  # a concurrent creator; a file there is refused by the isdir below
        pass
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: exists and is not a directory; cannot write into it")


def open_private(name: str, dir_fd: Optional[int] = None) -> int:
    """A new file for writing, 0600: O_EXCL (never an existing file), O_NOFOLLOW (never through a
    planted link). ``name`` is relative to ``dir_fd`` when given."""
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)


def remove_quietly(path: str, why: str) -> None:
    """Unlinks ``path`` while another error is being raised: a failure is logged, never raised
    (it would hide that error)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("checkpoint: could not remove %s after %s: %s", path, why, exc)


def write_file(directory: str, name: str, data: bytes) -> None:
    """Writes a new private file and fsyncs it. If writing fails (e.g. ENOSPC) the partial file
    is removed and the error names it."""
    path = os.path.join(directory, name)
    fd = open_private(path)
    try:
        write_all(fd, memoryview(data))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        fd = -1
        remove_quietly(path, "a failed write")
        raise named_write_error(path, exc) from exc
    finally:
        if fd >= 0:
            os.close(fd)


def open_dir(name: str, dir_fd: Optional[int] = None, follow: bool = False) -> int:
    """A descriptor of directory ``name`` (relative to ``dir_fd`` when given) for ``*_dir_fd``
    operations, so no component of its path is resolved again; a link at ``name`` is refused
    (ELOOP) unless ``follow``."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    return os.open(name, flags, dir_fd=dir_fd)


def json_bytes(data: object) -> bytes:
    """A small JSON output file as Hugging Face tools write them (indented, sorted keys, a final newline)."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


class PrivateOutput:
    """Output files for ``directory`` (created 0700 if missing; an existing one keeps its mode),
    like every other output of the engine.

    Each file is written in a private temporary directory inside it (0700, an unpredictable
    name, files opened O_EXCL | O_NOFOLLOW), then made 0600, fsync'ed and renamed into place -
    a link planted at a final name is replaced, not followed. Every operation after ``directory``
    is opened is relative to a directory descriptor, so a directory swapped in meanwhile is never
    written through. The temporary directory is removed on exit, also after an error (files
    committed before it stay: each is complete).
    """

    def __init__(self, directory: Union[str, "os.PathLike[str]"]):
        self.directory = os.fspath(directory)
        self.tmp = ""  # its path, for a library that writes by path (peft's save_pretrained)
        self.written: list[str] = []
        self._dir_fd = self._tmp_fd = -1
        self._tmp_name = ""

    def __enter__(self) -> "PrivateOutput":
        make_private_dir(self.directory)
        self._dir_fd = open_dir(self.directory, follow=True)  # the user's path, resolved this once
        try:
            self._tmp_name = f"{TMP_PREFIX}export-{os.getpid()}-{secrets.token_hex(8)}"
            os.mkdir(self._tmp_name, 0o700, dir_fd=self._dir_fd)
            self._tmp_fd = open_dir(self._tmp_name, self._dir_fd)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self.tmp = os.path.join(self.directory, self._tmp_name)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._tmp_name:
                shutil.rmtree(self._tmp_name, ignore_errors=True, dir_fd=self._dir_fd)
            if exc[0] is None:
                self._fsync_dir(self._dir_fd, self.directory)
        finally:
            for fd in (self._tmp_fd, self._dir_fd):
                if fd >= 0:
                    os.close(fd)
            self._dir_fd = self._tmp_fd = -1

    def path(self, name: str) -> str:
        """Where a library writes ``name`` by path before :meth:`commit`."""
        return os.path.join(self.tmp, name)

    def open(self, name: str) -> BinaryIO:
        """A new private temporary file ``name`` for writing; :meth:`commit` it when complete."""
        return os.fdopen(open_private(check_name(name), self._tmp_fd), "wb")

    def write(self, name: str, data: bytes) -> str:
        """Writes ``name`` whole and commits it (one fsync: commit's)."""
        try:
            with self.open(name) as f:
                write_all(f.fileno(), memoryview(data))
        except OSError as exc:
            raise named_write_error(self.path(name), exc) from exc
        return self.commit(name)

    def commit(self, name: str) -> str:
        """Makes the finished temporary file ``name`` private, fsyncs it and renames it into place."""
        return self._commit(name, self._tmp_fd, self._dir_fd, name)

    def commit_all(self) -> list[str]:
        """Commits every file a library wrote into :attr:`tmp` (peft writes a non-default adapter
        into a subdirectory: created 0700; a link planted there is refused)."""
        self._commit_tree(self._tmp_fd, self._dir_fd, "")
        return self.written

    def _commit(self, name: str, src_fd: int, dst_fd: int, rel: str) -> str:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
        except OSError as exc:
            raise CheckpointError(f"{self.path(rel)}: cannot open the export's file ({exc.strerror}); "
                                  "refusing to export it") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointError(f"{self.path(rel)}: not a regular file, refusing to export it")
            os.fchmod(fd, 0o600)  # a library writes with the umask
            os.fsync(fd)
        except OSError as exc:
            raise named_write_error(self.path(rel), exc) from exc
        finally:
            os.close(fd)
        os.replace(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        final = os.path.join(self.directory, rel)
        self.written.append(final)
        return final

    def _commit_tree(self, src_fd: int, dst_fd: int, prefix: str) -> None:
        with os.scandir(src_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = os.path.join(prefix, entry.name)
            if entry.is_dir(follow_symlinks=False):
                sub_src = open_dir(entry.name, src_fd)
                try:
                    sub_dst = self._subdir(entry.name, dst_fd, rel)
                    try:
                        self._commit_tree(sub_src, sub_dst, rel)
                        self._fsync_dir(sub_dst, os.path.join(self.directory, rel))
                    finally:
                        os.close(sub_dst)
                finally:
                    os.close(sub_src)
            elif entry.is_file(follow_symlinks=False):
                self._commit(entry.name, src_fd, dst_fd, rel)
            else:
                raise CheckpointError(f"{self.path(rel)}: the export wrote something that is not a plain file or "
                                      "directory, refusing to export it")

    def _subdir(self, name: str, dst_fd: int, rel: str) -> int:
        """The output subdirectory ``name`` of ``dst_fd`` (created 0700), never through a link."""
        try:
            os.mkdir(name, 0o700, dir_fd=dst_fd)
        except FileExistsError:
            pass
        try:
            return open_dir(name, dst_fd)
        except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file
            raise CheckpointError(f"{os.path.join(self.directory, rel)}: is a symbolic link or not a directory "
                                  f"({exc.strerror}), refusing to write through it (remove it)") from None

    @staticmethod
    def _fsync_dir(fd: int, path: str) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            raise named_write_error(path, exc) from exc


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
                      if _NAME.match(name) and os.path.isfile(os.path.join(self.root, name, MANIFEST)))

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
