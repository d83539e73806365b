"""Fixtures shared by the test files (plain helper functions are in helpers.py)."""
from __future__ import annotations

import pytest

from engine.storage import TensorStore


@pytest.fixture
def store(tmp_path):
    """A TensorStore in the test's temporary directory, growing its swap file 8 MiB at a time."""
    with TensorStore(tmp_path, grow_step="8MiB") as s:
        yield s
