"""Swap directories of processes that died without removing them (SIGKILL, OOM kill, power cut):
named after their owner, reclaimed by the next store opened on the path and by
``python -m engine clean``; a live owner's directory, and anything not unmistakably a swap
directory, is never touched."""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys

import torch
from helpers import child_env

from engine.cli import main
from engine.storage import TensorStore, cleanup

OWNER = """
import sys, torch
from engine.storage import TensorStore
store = TensorStore(sys.argv[1])
store.put("w", torch.ones(1000))
print(store.directories[0], flush=True)
sys.stdin.readline()  # alive until the parent says or kills it
"""


def spawn_owner(path) -> tuple[subprocess.Popen, str]:
    """A child process with a store open on ``path``; returns it and its swap directory."""
    child = subprocess.Popen([sys.executable, "-c", OWNER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env())
    directory = child.stdout.readline().strip()
    assert directory and os.path.isdir(directory), child.stderr.read()[-3000:]
    return child, directory


def finish(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait(60)
    child.stdin.close()
    child.stdout.close()
    child.stderr.close()


def dead_name(boot: str | None = None, pidns: int | None = None) -> str:
    """A swap directory name whose owner cannot be running: this pid with a start time in the future."""
    me = cleanup.this_process()
    return (f"{cleanup.PREFIX}{boot or me.boot}-{pidns if pidns is not None else me.pidns}-{me.pid}-"
            f"{me.start + 10**9}-0123456789abcdef")


def fake_swap_dir(root, name: str, files=("swap.bin",)) -> str:
    path = os.path.join(root, name)
    os.mkdir(path, 0o700)
    for f in files:
        with open(os.path.join(path, f), "wb") as fh:
            fh.write(b"\0" * 8192)
    return path


def test_name_records_the_owner_and_is_unpredictable(tmp_path):
    with TensorStore(str(tmp_path)) as a, TensorStore(str(tmp_path)) as b:
        names = [os.path.basename(d) for d in a.directories + b.directories]
    assert names[0] != names[1]
    for name in names:
        assert cleanup.parse_owner(name) == cleanup.this_process(), name
        assert len(name.rsplit("-", 1)[1]) == 16  # 64 random bits


def test_private_even_under_umask_000(tmp_path):
    old = os.umask(0)
    try:
        with TensorStore(str(tmp_path)) as store:
            store.put("x", torch.ones(10))
            (directory,) = store.directories
            assert os.stat(directory).st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


def test_a_sigkilled_owners_directory_is_reclaimed_by_the_next_store(tmp_path, caplog):
    child, directory = spawn_owner(tmp_path)
    child.send_signal(signal.SIGKILL)
    finish(child)
    assert os.path.isdir(directory)  # what a SIGKILL leaves behind
    size = sum(os.stat(os.path.join(directory, f)).st_blocks * 512 for f in os.listdir(directory))
    with caplog.at_level(logging.WARNING, logger="engine"), TensorStore(str(tmp_path)) as store:
        assert not os.path.exists(directory)
        assert os.listdir(tmp_path) == [os.path.basename(store.directories[0])]
    assert "reclaimed" in caplog.text and os.path.basename(directory) in caplog.text
    from engine.units import format_bytes
    assert format_bytes(size) in caplog.text  # says how much disk came back


def test_a_live_owners_directory_is_never_removed_then_clean_removes_it_once_dead(tmp_path, capsys):
    child, directory = spawn_owner(tmp_path)
    try:
        with TensorStore(str(tmp_path)) as s1, TensorStore(str(tmp_path)) as s2:  # two more live stores
            assert os.path.isdir(directory) and os.path.isdir(s1.directories[0])
            s2.put("y", torch.ones(10))
            assert main(["clean", str(tmp_path)]) == 0
            out = capsys.readouterr().out
            assert f"kept {directory}: its owner, pid {child.pid}, is running" in out
            assert f"kept {s1.directories[0]}: this process's own" in out
            assert os.path.isdir(directory) and all(os.path.isdir(d) for d in s1.directories + s2.directories)
        child.send_signal(signal.SIGKILL)
        child.wait(60)  # reaped: the pid is gone (a zombie counts as gone too)
        assert main(["clean", "--dry-run", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"would remove {directory} (" in out and "would remove 1 swap directory" in out
        assert os.path.isdir(directory)
        assert main(["clean", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"removed {directory} (" in out and "removed 1 swap directory" in out
        assert os.listdir(tmp_path) == []
    finally:
        finish(child)


def test_only_unmistakable_swap_directories_are_removed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "target"
    target.mkdir()
    (target / "swap.bin").write_bytes(b"x")
    root = tmp_path / "nvme"
    root.mkdir()
    gone = fake_swap_dir(root, dead_name())                                          # removed
    extra = fake_swap_dir(root, dead_name()[:-1] + "1", ("swap.bin", "notes.txt"))   # kept: a user file
    linked = fake_swap_dir(root, dead_name()[:-1] + "2", ())                         # kept: a symlink inside
    os.symlink(victim, os.path.join(linked, "swap.bin"))
    nested = fake_swap_dir(root, dead_name()[:-1] + "3", ())                         # kept: a subdirectory
    os.mkdir(os.path.join(nested, "tensor-00000001.bin"))
    os.symlink(target, root / (dead_name()[:-1] + "4"))                              # kept: a symlink
    old_style = fake_swap_dir(root, "memascend-swap-k2j4h5l1")                      # kept: no owner recorded
    other_user = fake_swap_dir(root, dead_name()[:-1] + "5")                        # kept: not ours
    os.chown(other_user, os.geteuid() + 1000, -1)
    result = cleanup.sweep(str(root))
    assert [p for p, _ in result.removed] == [gone] and result.removed[0][1] >= 8192
    kept = dict(result.kept)
    assert "notes.txt" in kept[extra] and "swap.bin" in kept[linked] and "tensor-00000001.bin" in kept[nested]
    assert kept[str(root / (dead_name()[:-1] + "4"))] == "not a directory"
    assert kept[old_style] == "not named by this engine's owner scheme"
    assert kept[other_user].startswith("owned by uid")
    assert victim.read_bytes() == b"precious" and (target / "swap.bin").exists()
    assert all(os.path.exists(p) for p in kept)


def test_owners_in_other_pid_namespaces_and_boots(tmp_path, monkeypatch):
    me = cleanup.this_process()
    # Another pid namespace on this kernel (a container sharing the path): its owner lock decides.
    held = fake_swap_dir(tmp_path, dead_name(pidns=me.pidns + 1))
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = cleanup.sweep(str(tmp_path))
        assert result.removed == [] and "locked" in dict(result.kept)[held]
    finally:
        os.close(fd)
    assert [p for p, _ in cleanup.sweep(str(tmp_path)).removed] == [held]
    # Another boot: gone on a local file system; on a shared one another machine may own it.
    other_boot = "f" * 16 if me.boot != "f" * 16 else "e" * 16
    shared = fake_swap_dir(tmp_path, dead_name(boot=other_boot))
    monkeypatch.setattr(cleanup, "_file_system_type", lambda dev: "nfs4")
    result = cleanup.sweep(str(tmp_path))
    assert result.removed == [] and "another boot or machine" in dict(result.kept)[shared]
    monkeypatch.setattr(cleanup, "_file_system_type", lambda dev: "ext4")
    assert [p for p, _ in cleanup.sweep(str(tmp_path)).removed] == [shared]


def test_clean_bad_path_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "file"):
        assert main(["clean", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]


def test_without_nvme_path_swap_goes_to_one_private_root_per_user_and_is_reclaimed(tmp_path, monkeypatch):
    """No nvme_path: one fixed <tmp>/memascend-<uid> root (a fresh random parent per run would hide
    a killed run's swap directory from every later sweep)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import engine

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    root = cleanup.default_swap_root()
    assert root == os.path.join(str(tmp_path), f"memascend-{os.geteuid()}")
    assert os.stat(root).st_mode & 0o777 == 0o700
    stale = fake_swap_dir(root, dead_name())  # what a SIGKILLed earlier run left
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with engine.initialize(model, engine.Config(resident_threshold_bytes=1024)) as trainer:
        assert not os.path.exists(stale)
        (directory,) = trainer.runtime.store.directories
        assert os.path.dirname(directory) == root
    assert os.listdir(root) == []


def test_a_planted_default_swap_root_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, tmp_path / f"memascend-{os.geteuid()}")
    try:
        cleanup.default_swap_root()
    except PermissionError as exc:
        assert "not a directory owned by this user" in str(exc)
    else:
        raise AssertionError("a symlink at the default swap root was followed")


def sandboxed(monkeypatch, tmp_path) -> None:
    """/proc without a boot id or pid namespace file (gVisor, some sandboxes)."""
    monkeypatch.setattr(cleanup, "_BOOT_ID", str(tmp_path / "no-boot_id"))
    monkeypatch.setattr(cleanup, "_PID_NS", str(tmp_path / "no-ns-pid"))


def test_a_store_opens_where_proc_cannot_identify_the_owner(tmp_path, monkeypatch, caplog):
    sandboxed(monkeypatch, tmp_path)
    root = tmp_path / "nvme"
    root.mkdir()
    with caplog.at_level(logging.WARNING, logger="engine"):
        with TensorStore(str(root)) as a, TensorStore(str(root)) as b:
            a.put("w", torch.arange(10.0))
            assert torch.equal(a.get("w"), torch.arange(10.0))
            owner = cleanup.parse_owner(os.path.basename(b.directories[0]))
            assert owner.boot == cleanup.UNKNOWN_BOOT and owner.pidns == 0 and not owner.identified
            assert owner.pid == os.getpid()
    assert os.listdir(root) == []
    warnings = [r.getMessage() for r in caplog.records if "unknown owner" in r.getMessage()]
    assert len(warnings) == 2 and "no-boot_id" in warnings[0] and "no-ns-pid" in warnings[1]  # each said once


def test_unidentified_owners_are_reclaimed_by_their_lock_alone(tmp_path, monkeypatch):
    """An owner recorded without a boot id / pid namespace: its pid is meaningless (here a running
    one, which the pid check would take for the owner forever), so the lock decides - on a local
    file system only."""
    sandboxed(monkeypatch, tmp_path)
    root = tmp_path / "nvme"
    root.mkdir()
    parent = os.getppid()
    start = cleanup._start_time(parent)
    stale = fake_swap_dir(root, f"{cleanup.PREFIX}{cleanup.UNKNOWN_BOOT}-0-{parent}-{start}-0123456789abcdef")
    fd = os.open(stale, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its owner is alive
    try:
        result = cleanup.sweep(str(root))
        assert result.removed == [] and "locked" in dict(result.kept)[stale]
    finally:
        os.close(fd)  # its owner died: the kernel released the lock
    monkeypatch.setattr(cleanup, "_file_system_type", lambda dev: "nfs4")
    result = cleanup.sweep(str(root))
    assert result.removed == [] and "could not be identified" in dict(result.kept)[stale]
    monkeypatch.setattr(cleanup, "_file_system_type", lambda dev: "ext4")
    assert [p for p, _ in cleanup.sweep(str(root)).removed] == [stale]


def test_one_mountinfo_reader_for_the_file_system_type_and_mount_point(tmp_path):
    mount = cleanup.find_mount(os.stat(tmp_path).st_dev)
    assert mount is not None and os.path.isdir(mount[0])
    assert cleanup._file_system_type(os.stat(tmp_path).st_dev) == mount[1]
    assert cleanup.find_mount(os.makedev(4095, 1048575)) is None
    assert cleanup.logger is __import__("engine._log", fromlist=["logger"]).logger
