#!/usr/bin/env bash
# The lint and type check (run by .ci/run and the README's test command): ruff over the code,
# mypy over the public API (pyproject.toml lists the files), and the import layering of engine/.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check --no-cache engine tests benchmarks scripts
mypy
python scripts/check_layers.py
