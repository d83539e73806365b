"""``python -m engine``: the engine's command line.

Commands:
    selfcheck   allocate from the pinned pool and round-trip data through the
                NVMe I/O engine, printing backend and bandwidth (the default).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .errors import EngineError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="MemAscend SSD-offload training engine")
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser("selfcheck", help="round-trip data through the pinned pool and the I/O engine")
    check.add_argument("--path", default=None, help="directory for the temporary test file (default: the system temp dir)")
    check.add_argument("--size", default="1GiB", help="bytes to write and read back (default 1GiB)")
    check.add_argument("--chunk", default="64MiB", help="request size (default 64MiB)")
    check.add_argument("--backend", default="auto", choices=["auto", "uring", "threads"])
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in (None, "selfcheck"):
            if args.command is None:
                args = parser.parse_args(["selfcheck"])
            from .selfcheck import main as selfcheck_main
            return selfcheck_main(args)
    except (ValueError, OSError, EngineError) as exc:
        # Bad input and environment problems get one clear line, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
