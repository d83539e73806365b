"""Fixtures shared by the test files (plain helper functions are in helpers.py)."""
from __future__ import annotations

import os

import pytest

from engine.devices import AUTO_ENV
from engine.storage import TensorStore

# The suite compares against torch on the CPU: "auto" means the CPU here even on a GPU machine
# (child processes inherit it). Tests of the GPU path ask for device="cuda" explicitly.
os.environ.setdefault(AUTO_ENV, "cpu")


@pytest.fixture
def store(tmp_path):
    """A TensorStore in the test's temporary directory, growing its swap file 8 MiB at a time."""
    with TensorStore(tmp_path, grow_step="8MiB") as s:
        yield s
