"""Private output files: plain names only, 0600 files / 0700 directories, O_EXCL | O_NOFOLLOW,
fsync, then rename into place.

The one atomic private writer of the engine: checkpoints (:mod:`.atomic`), Hugging Face exports
(:mod:`.hf`, :mod:`.hf_writer`) and adapters (:mod:`engine.peft`) all write through it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import sys
from typing import BinaryIO, Optional, Union

from .._log import logger
from .format import CheckpointError, named_write_error, write_all

TMP_PREFIX = ".tmp-"
# A plain name inside a checkpoint or export directory (no separator, no leading dot).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


def check_name(name: str, what: str = "file name") -> str:
    """Refuses anything but a plain name inside the checkpoint directory (no separators, no
    ``..``, no leading dot)."""
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
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
        """Where a library writes ``name`` by path before :meth:`commit` (and the name errors give)."""
        return os.path.join(self.tmp, name)

    def names(self) -> list[str]:
        """The entries of the output directory (listed through its descriptor)."""
        return os.listdir(self._dir_fd)

    def remove(self, name: str) -> bool:
        """Removes the regular file ``name`` from the output directory (relative to its descriptor,
        never through a link); False when there is none."""
        try:
            if not stat.S_ISREG(os.stat(check_name(name), dir_fd=self._dir_fd, follow_symlinks=False).st_mode):
                return False
            os.unlink(name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return False
        return True

    @property
    def tmp_fd(self) -> int:
        """The temporary directory's descriptor: the engine's own writers open files relative to it."""
        return self._tmp_fd

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
