#!/usr/bin/env bash
# Downloads, on a machine with access to the package index, the wheels benchmarks/gpu_check.py
# installs on a GPU machine without network (Python 3.12, x86_64): put them in benchmarks/wheels/
# and carry that directory along. torch is never among them (the GPU machine's own is used).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download --only-binary=:all: --python-version "${PYVER:-3.12}" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d wheels \
    crc32c psutil tqdm hypothesis sortedcontainers attrs
ls -l wheels
