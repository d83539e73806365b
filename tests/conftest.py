"""Shared test helpers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_unprivileged(code: str, drop: str) -> subprocess.CompletedProcess:
    """Runs Python ``code`` in a child that lacks the capabilities in ``drop``
    (e.g. ``"cap_ipc_lock"``), so root-only bypasses do not hide the failure paths."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        capsh = shutil.which("capsh")
        if capsh is None:
            pytest.skip("running as root and capsh (libcap2-bin) is missing: cannot drop capabilities")
        script = f"{sys.executable} -c {_quote(textwrap.dedent(code))}"
        cmd = [capsh, f"--drop={drop}", "--", "-c", script]
    else:
        cmd = prefix + [sys.executable, "-c", textwrap.dedent(code)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"
