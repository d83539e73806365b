"""The README's main command: python -m engine (self-check of pool + I/O engine)."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO

from engine.selfcheck import run_selfcheck


def test_selfcheck_round_trips_and_cleans_up(tmp_path):
    result = run_selfcheck(str(tmp_path), size="48MiB", chunk="4MiB", progress=False)
    assert result.total_bytes == 48 << 20
    assert result.backend in ("uring", "threads")
    assert result.write_gib_s > 0 and result.read_gib_s > 0
    assert result.pool_reserved_over_requested == 1.0
    assert os.listdir(tmp_path) == []  # the private directory is gone


def test_cli_default_command_runs_the_selfcheck(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "engine", "selfcheck", "--path", str(tmp_path), "--size", "16MiB",
                          "--chunk", "1MiB", "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "I/O backend:" in out.stdout and "byte for byte" in out.stdout
    assert os.listdir(tmp_path) == []
    bad = subprocess.run([sys.executable, "-m", "engine", "selfcheck", "--path", str(tmp_path), "--size", "1MiB",
                          "--chunk", "3000"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr and "multiple of 4096" in bad.stderr
    assert "Traceback" not in bad.stderr
