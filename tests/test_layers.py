"""The import layering of engine/ (scripts/check_layers.py): downward only, none inside functions, no cycles."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from helpers import REPO

_spec = importlib.util.spec_from_file_location("check_layers", Path(REPO) / "scripts" / "check_layers.py")
check_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layers)


def test_engine_imports_only_downward_at_module_level():
    assert check_layers.check(Path(REPO)) == []


def test_violations_are_found(tmp_path):
    shutil.copytree(Path(REPO) / "engine", tmp_path / "engine", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    storage = tmp_path / "engine" / "storage" / "staging.py"
    storage.write_text(storage.read_text() + "\nfrom ..offload.keys import StoreKey\n\n\ndef later():\n"
                       "    from ..checkpoint import atomic\n    return atomic\n")
    keys = tmp_path / "engine" / "offload" / "keys.py"
    keys.write_text(keys.read_text() + "\nfrom . import runtime\n")
    problems = check_layers.check(tmp_path)
    assert any("engine.storage.staging (storage) imports engine.offload.keys (offload runtime), a higher layer" in p
               for p in problems), problems
    assert any("staging.py" in p and "imports engine.checkpoint.atomic inside a function" in p for p in problems)
    assert any(p.startswith("import cycle:") and "engine.offload.keys" in p and "engine.offload.runtime" in p
               for p in problems), problems
