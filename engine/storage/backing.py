"""One NVMe path of a TensorStore: its private swap directory and, in the ``direct`` layout,
its swap file (or raw block device) with the extent allocator that places tensors in it.

:func:`open_backing` reclaims dead processes' swap directories on the path, makes this
process's private one (0700, see :mod:`engine.storage.cleanup`) and, for the direct layout,
opens the preallocated swap file, grown with ``posix_fallocate`` as the allocator asks; a raw
block device is used only when allowed and when nothing holds or mounts it.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Optional

from ..errors import StoreCapacityError
from ..memory.pool import IO_ALIGNMENT
from ..validate import StoreLayout
from . import cleanup
from .aio import AsyncFile, AsyncIO
from .extents import ExtentAllocator


class Backing:
    """One NVMe path: its private directory and, in the direct layout, its swap file/device."""

    def __init__(self, root: str, directory: Optional[str], file: Optional[AsyncFile],
                 allocator: Optional[ExtentAllocator], is_device: bool):
        self.root = root
        self.directory = directory
        self.file = file
        self.allocator = allocator
        self.is_device = is_device
        self.files_used = 0  # files layout: bytes of the tensors on this path

    @property
    def used_bytes(self) -> int:
        """Bytes allocated on this path."""
        return self.allocator.used_bytes if self.allocator is not None else self.files_used

    def growth_step(self, grow_step: int) -> int:
        """Growth beyond what was reserved: ``grow_step``, but at most the file's current size
        (geometric growth: a small store stays small) and an eighth of the free space left (a
        small file system is not asked for more than the tensors need)."""
        return min(grow_step, max(self.allocator.capacity, IO_ALIGNMENT), available_bytes(self.root) // 8)

    def grow_to(self, new_size: int) -> None:
        """Extends the swap file to ``new_size`` bytes; :class:`StoreCapacityError` if the file system lacks room."""
        current = self.allocator.capacity if self.allocator else 0
        available = available_bytes(self.root)
        if new_size - current > available:
            raise StoreCapacityError(new_size - current, available, self.root)
        fd = os.open(self.file.path, os.O_WRONLY)
        try:
            os.posix_fallocate(fd, 0, new_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreCapacityError(new_size - current, available_bytes(self.root), self.root) from None
            raise
        finally:
            os.close(fd)


def open_backing(root: str, io: AsyncIO, *, layout: StoreLayout, grow_step: int, allow_raw_device: bool) -> Backing:
    """The backing store of path ``root`` (a directory, or a block device when allowed)."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"NVMe path {root!r} does not exist", root) from None
    if stat.S_ISBLK(st.st_mode):
        return _open_device(root, st, io, layout=layout, allow_raw_device=allow_raw_device)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, f"NVMe path {root!r} is not a directory or block device", root)
    cleanup.reclaim(root)  # swap directories of processes that died without removing them
    try:
        directory, lock_fd = cleanup.make_swap_dir(root)  # 0700, named and locked by this process
    except PermissionError:
        raise PermissionError(errno.EACCES, f"NVMe path {root!r} is not writable", root) from None
    cleanup.register(directory, lock_fd)
    if layout == "files":
        return Backing(root, directory, None, None, False)
    file = io.open(os.path.join(directory, "swap.bin"), "rw", create=True)
    backing = Backing(root, directory, file, None, False)
    backing.allocator = ExtentAllocator(0, IO_ALIGNMENT, grow=backing.grow_to,
                                        grow_step=lambda: backing.growth_step(grow_step))
    return backing


def _open_device(root: str, st: os.stat_result, io: AsyncIO, *, layout: StoreLayout,
                 allow_raw_device: bool) -> Backing:
    if not allow_raw_device:
        raise ValueError(f"NVMe path {root!r} is a block device; pass allow_raw_device=True to use it raw "
                         "(everything on it will be overwritten)")
    if layout != "direct":
        raise ValueError("a raw block device needs the 'direct' layout")
    _refuse_mounted_device(root, st)
    file = io.open(root, "rw")
    fd = os.open(root, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return Backing(root, None, file, ExtentAllocator(size, IO_ALIGNMENT), True)


def check_room(backings: list[Backing], shares: list[int]) -> None:
    """Raises :class:`StoreCapacityError` for the first file system (or device) that cannot
    hold the shares of its paths (paths on one file system share its free space)."""
    groups: dict[int, list[tuple[Backing, int]]] = {}
    for b, share in zip(backings, shares):
        if b.is_device:  # fixed size: only its free extents count
            if share > b.allocator.free_bytes:
                raise StoreCapacityError(share, b.allocator.free_bytes, b.root)
            continue
        groups.setdefault(os.stat(b.root).st_dev, []).append((b, share))
    for members in groups.values():
        needed = sum(b.allocator.growth_for(share) if b.allocator is not None else share for b, share in members)
        available = available_bytes(members[0][0].root)
        if needed > available:
            raise StoreCapacityError(needed, available, ", ".join(b.root for b, _ in members))


def available_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still allocate on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _refuse_mounted_device(path: str, st: os.stat_result) -> None:
    """Raises if the block device (or a partition of it) is mounted or held by another user."""
    mount = cleanup.find_mount(st.st_rdev)
    if mount is not None:
        raise ValueError(f"block device {path!r} is mounted at {mount[0]!r}; refusing to use it as raw storage")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL)  # the kernel refuses this while the device is mounted or held
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ValueError(f"block device {path!r} is in use (mounted, or a partition of it is); "
                             "refusing it") from None
        raise
    os.close(fd)
