"""Helpers shared by the benchmark scripts: result files and table printing."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save_result(name: str, payload: dict) -> str:
    """Writes ``payload`` (plus host facts) to benchmarks/results/<name>-<time>.json; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = dict(payload, host=platform.node(), cpus=os.cpu_count(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    path = os.path.join(RESULTS_DIR, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
