#!/usr/bin/env bash
# Installs everything the engine needs on a fresh machine: liburing (io_uring
# backend), fio (benchmark baseline), then the package itself in editable mode,
# within the tested set of constraints.txt (torch==2.13.0, the Hugging Face libraries
# within their tested minor releases).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if ! pkg-config --exists liburing 2>/dev/null || ! command -v fio >/dev/null 2>&1 || ! command -v capsh >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pkg-config liburing-dev fio libcap2-bin >/dev/null
    fi
elif ! pkg-config --exists liburing 2>/dev/null; then
    echo "install.sh: liburing-dev is missing (and this is not root with apt-get): building the thread-pool I/O backend only" >&2
fi

python -m pip install -q -c constraints.txt -e ".[test]"
