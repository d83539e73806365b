#!/usr/bin/env bash
# The GPU check (issue 14) on a GPU machine: builds the engine, runs the CUDA tests and the
# bf16 benchmarks (with 2+ GPUs also a 1 vs 2 GPU torchrun run, partitioned state), prints one
# table. Arguments go to benchmarks/gpu_check.py (--help lists them; --skip-distributed).
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py "$@"
