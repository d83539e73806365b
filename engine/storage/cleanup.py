"""The engine's private swap directories: created with their owner in the name, removed at
exit, and reclaimed after their owner died without removing them.

Removal at exit covers a normal exit, an uncaught exception (atexit) and SIGTERM /
SIGINT-without-a-Python-handler (a signal handler that cleans up, then lets the previous
disposition act). A SIGKILL, an OOM kill or a power cut leaves the directory behind, so
each one is named ``memascend-swap-<boot>-<pidns>-<pid>-<start>-<random>``: the boot id,
the pid namespace, the pid and its start time (``/proc/PID/stat`` field 22) identify the
owning process exactly (a reused pid has another start time), and the random part keeps
the name unpredictable. The owner also holds an ``flock`` on the directory for its
lifetime. :func:`sweep` (run whenever a store opens on a path, and by ``python -m engine
clean``) removes a directory only when its owner is provably gone:

* same boot and pid namespace: the pid is not running, or runs with another start time;
* same boot, another pid namespace (a container sharing the path): nobody holds its lock;
* another boot, on a local file system: its owner died with that boot. On a network or
  cluster file system another machine may own it: left alone.
* an owner that could not be identified (where /proc has no boot id or pid namespace, as
  under gVisor: recorded as ``0000000000000000`` and ``0``, said once): its pid means nothing,
  but a dead owner released its lock, so on a local file system "not locked" means gone; on
  a shared one it is left alone.

and only when it is unmistakably ours: the exact name pattern, a real directory (never a
symlink), owned by this user, holding only swap files (regular files named as the store
names them). Anything else is kept and said why.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Optional, TypeVar

from .._log import logger, warn_once
from ..units import format_bytes

PREFIX = "memascend-swap-"
UNKNOWN_BOOT = "0" * 16  # recorded where the boot id cannot be read (gVisor, some sandboxes)
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_PID_NS = "/proc/self/ns/pid"
_NAME = re.compile(r"memascend-swap-(?P<boot>[0-9a-f]{16})-(?P<pidns>\d+)-(?P<pid>\d+)-(?P<start>\d+)"
                   r"-[0-9a-f]{16}\Z")
_SWAP_FILE = re.compile(r"(swap\.bin|tensor-\d{8}\.bin)\Z")  # what TensorStore puts in its directory
# File systems that only this machine mounts: an owner from another boot cannot be alive.
_LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "bcachefs", "jfs", "nilfs2",
                       "overlay", "reiserfs", "zfs"})

_T = TypeVar("_T")
_dirs: set[str] = set()
_lock_fds: dict[str, int] = {}  # directory -> the fd holding its owner lock
_lock = threading.Lock()
_installed = False


def register(path: str, lock_fd: Optional[int] = None) -> None:
    """Removes ``path`` (recursively) when the process ends, unless unregistered first.
    ``lock_fd`` (the owner lock of a swap directory) is closed on :func:`unregister`."""
    global _installed
    with _lock:
        _dirs.add(path)
        if lock_fd is not None:
            _lock_fds[path] = lock_fd
        if not _installed:
            _installed = True
            atexit.register(remove_all)
            _install_signal_handlers()


def unregister(path: str) -> None:
    """Forgets ``path`` (its owner removed it) and releases its owner lock."""
    with _lock:
        _dirs.discard(path)
        fd = _lock_fds.pop(path, None)
    if fd is not None:
        os.close(fd)


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


# ---------------------------------------------------------------------------------------- owners
@dataclass(frozen=True)
class Owner:
    """The process that created a swap directory."""

    boot: str   # first 16 hex digits of /proc/sys/kernel/random/boot_id
    pidns: int  # inode of /proc/PID/ns/pid
    pid: int
    start: int  # clock ticks after boot, /proc/PID/stat field 22

    @property
    def identified(self) -> bool:
        """False when the boot, pid namespace or start time could not be read: its pid says nothing."""
        return self.boot != UNKNOWN_BOOT and self.pidns != 0 and self.start != 0


def this_process() -> Owner:
    """The current process as an owner (computed each time: a forked child is another owner).
    What /proc cannot tell is recorded as unknown (said once), never an error: a store must open
    in a sandbox without a boot id or pid namespace file."""
    pid = os.getpid()
    try:
        start = _start_time(pid)
    except OSError:
        start = None
    start = start or _unknown(f"/proc/{pid}/stat", 0)
    return Owner(_boot_id(), _pid_namespace(), pid, start)


def _boot_id() -> str:
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip().replace("-", "")[:16]
    except OSError:
        return _unknown(_BOOT_ID, UNKNOWN_BOOT)


def _pid_namespace() -> int:
    try:
        return os.stat(_PID_NS).st_ino
    except OSError:
        return _unknown(_PID_NS, 0)


def _unknown(what: str, value: _T) -> _T:
    warn_once(f"swap-owner:{what}", f"cannot read {what}: swap directories are named with an unknown owner; one "
              "left by a killed run is reclaimed only on a local file system, once its owner's lock is free")
    return value


def _start_time(pid: int) -> Optional[int]:
    """Start time of a running process, None if there is none (a zombie has exited: none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may contain spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22; fields[0] is field 3


def parse_owner(name: str) -> Optional[Owner]:
    """The owner recorded in a swap directory's name, None if it is not such a name."""
    m = _NAME.match(name)
    if m is None:
        return None
    return Owner(m["boot"], int(m["pidns"]), int(m["pid"]), int(m["start"]))


def make_swap_dir(root: str) -> tuple[str, int]:
    """Creates a private (0700) swap directory under ``root`` named after this process and
    locked by it; returns its path and the fd holding the lock (pass it to :func:`register`)."""
    owner = this_process()
    for _ in range(100):
        name = f"{PREFIX}{owner.boot}-{owner.pidns}-{owner.pid}-{owner.start}-{secrets.token_hex(8)}"
        path = os.path.join(root, name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)  # whatever the umask
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except (FileNotFoundError, BlockingIOError):
            pass  # a sweeper in another pid namespace took it before it was locked: a new name
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise FileExistsError(f"could not create a private swap directory under {root!r} in 100 attempts")


def default_swap_root() -> str:
    """The swap root used when no NVMe path is configured: ``<tmp>/memascend-<uid>``, one fixed
    private (0700) directory per user, so a killed run's swap directory in it is reclaimed by
    the next run (a fresh random parent per run would hide it from every later sweep). A
    pre-planted symlink or a directory owned by someone else is refused, never used."""
    root = os.path.join(tempfile.gettempdir(), f"memascend-{os.geteuid()}")
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(errno.EACCES, f"{root!r} is not a directory owned by this user (uid {os.geteuid()}): "
                              "refusing to put swap files there; set nvme_path", root)
    if st.st_mode & 0o777 != 0o700:
        os.chmod(root, 0o700, follow_symlinks=False)
    return root


# ---------------------------------------------------------------------------------------- sweep
@dataclass
class SweepResult:
    """What :func:`sweep` removed (or would remove) and what it kept, with the reason."""

    removed: list[tuple[str, int]] = field(default_factory=list)  # (path, bytes on disk)
    kept: list[tuple[str, str]] = field(default_factory=list)     # (path, why)

    @property
    def reclaimed_bytes(self) -> int:
        return sum(n for _, n in self.removed)


def sweep(root: str, dry_run: bool = False) -> SweepResult:
    """Removes the swap directories under ``root`` whose owner is gone (see the module doc);
    ``dry_run``: only says what it would remove."""
    result = SweepResult()
    me = this_process()
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        local = _file_system_type(os.fstat(root_fd).st_dev) in _LOCAL_FS
        for name in sorted(os.listdir(root_fd)):
            if not name.startswith(PREFIX):
                continue
            path = os.path.join(root, name)
            try:
                outcome = _reclaim(root_fd, name, me, local, dry_run)
            except FileNotFoundError:
                continue  # another sweep removed it meanwhile
            except OSError as exc:
                outcome = f"not removed: {exc.strerror or exc}"
            if isinstance(outcome, int):
                result.removed.append((path, outcome))
            else:
                result.kept.append((path, outcome))
    finally:
        os.close(root_fd)
    return result


def reclaim(root: str) -> SweepResult:
    """:func:`sweep` when a store opens on ``root``: logs what it reclaimed; a sweep that fails
    is logged and does not stop the store."""
    try:
        result = sweep(root)
    except OSError as exc:
        logger.warning("could not look for swap directories of dead processes under %s: %s", root, exc)
        return SweepResult()
    if result.removed:
        logger.warning("reclaimed %s under %s from %d swap director%s of processes that are gone: %s",
                       format_bytes(result.reclaimed_bytes), root, len(result.removed),
                       "y" if len(result.removed) == 1 else "ies",
                       ", ".join(os.path.basename(p) for p, _ in result.removed))
    return result


def _reclaim(root_fd: int, name: str, me: Owner, local: bool, dry_run: bool):
    """Removes one directory when it is ours and its owner is gone: returns its bytes on disk,
    or the reason it is kept."""
    owner = parse_owner(name)
    if owner is None:
        return "not named by this engine's owner scheme"
    st = os.lstat(name, dir_fd=root_fd)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    verdict = _owner_gone(owner, me, local)
    if verdict is not True:
        return verdict
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        if os.fstat(fd).st_ino != st.st_ino:
            return "replaced while it was examined"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "locked: its owner (or another sweep) holds it"
        entries = os.listdir(fd)
        nbytes = 0
        for entry in entries:
            est = os.lstat(entry, dir_fd=fd)
            if not _SWAP_FILE.match(entry) or not stat.S_ISREG(est.st_mode):
                return f"holds {entry!r}, which is not a swap file"
            nbytes += est.st_blocks * 512
        if not dry_run:
            for entry in entries:
                os.unlink(entry, dir_fd=fd)
            os.rmdir(name, dir_fd=root_fd)
        return nbytes
    finally:
        os.close(fd)


def _owner_gone(owner: Owner, me: Owner, local: bool):
    """True when the owner cannot be running; otherwise why it may be."""
    if owner == me:
        return "this process's own"
    if not owner.identified:
        # Its pid is meaningless, but a dead owner released its flock: on a local file system
        # nobody else can hold it, so "not locked" (checked next) means gone.
        return True if local else ("its owner could not be identified (no boot id or pid namespace), "
                                   "on a shared file system: it may be running elsewhere")
    if owner.boot == me.boot and owner.pidns == me.pidns:
        if _start_time(owner.pid) == owner.start:
            return f"its owner, pid {owner.pid}, is running"
        return True
    if owner.boot == me.boot:
        return True  # another pid namespace on this kernel: the owner lock decides
    if local:
        return True  # another boot (or this process cannot read its own): the owner lock decides
    return "made on another boot or machine, on a shared file system: its owner may be running there"


def _file_system_type(dev: int) -> str:
    """The type of the mounted file system with device number ``dev`` ('' if not found)."""
    mount = find_mount(dev)
    return mount[1] if mount is not None else ""


def find_mount(dev: int) -> Optional[tuple[str, str]]:
    """(mount point, file system type) of the first mount of device number ``dev`` in
    /proc/self/mountinfo; None when it is not mounted."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[2] == want:
                return fields[4], right.split()[0]
    return None
