"""``python -m engine clean PATH...``: removes the swap directories that processes killed
before they could remove them (SIGKILL, OOM kill, power cut) left under each PATH.

A directory is removed only when its owner is provably gone and it holds nothing but swap
files; every other ``memascend-swap-*`` entry is listed with the reason it is kept (see
:mod:`engine.storage.cleanup`). ``--dry-run`` only says what would be removed. Exit status 0.
"""
from __future__ import annotations

import argparse
import os

from ..errors import CLIError
from ..storage import cleanup
from ..units import format_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("clean", help="remove swap directories left by killed processes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="an NVMe path (the directory given as nvme_path)")
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for path in args.paths:  # all checked before anything is removed
        if not os.path.isdir(path):
            raise CLIError(f"PATH {path!r} does not exist or is not a directory")
    verb = "would remove" if args.dry_run else "removed"
    total = count = 0
    for path in args.paths:
        result = cleanup.sweep(path, dry_run=args.dry_run)
        for directory, nbytes in result.removed:
            print(f"{verb} {directory} ({format_bytes(nbytes)})")
        for directory, why in result.kept:
            print(f"kept {directory}: {why}")
        total += result.reclaimed_bytes
        count += len(result.removed)
    print(f"{verb} {count} swap director{'y' if count == 1 else 'ies'}, {format_bytes(total)}")
    return 0
