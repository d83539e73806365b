"""``python -m engine`` (and the ``memascend`` console script): the engine's command line.

Commands:
    train       fine-tune with parameters and optimizer states on NVMe; with no
                arguments, a small Llama-style model on the corpus shipped with the package
    plan        the memory planner's table for a model and a budget, nothing allocated
    bench       this engine vs plain PyTorch vs the ablation baseline (vs DeepSpeed when installed)
    profile     run any command under the memory profiler (JSON + PNG timeline)
    selfcheck   round-trip data through the pinned pool and the NVMe I/O engine
    clean       remove the swap directories of killed processes from NVMe paths

Bad input (a missing file, an invalid config, a budget that cannot fit, an unknown
preset) is reported as one line on stderr with exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence, get_args

from ..config import AioBackend
from ..errors import CLIError, EngineError  # noqa: F401 - CLIError re-exported
from ..selfcheck import main as selfcheck_main
from . import bench, clean, plan, profile, train


def _add_selfcheck(sub) -> None:
    check = sub.add_parser("selfcheck", help="round-trip data through the pinned pool and the I/O engine")
    check.add_argument("--path", default=None,
                       help="directory for the temporary test file (default: the system temp dir)")
    check.add_argument("--size", default="1GiB", help="bytes to write and read back (default 1GiB)")
    check.add_argument("--chunk", default="64MiB", help="request size (default 64MiB)")
    check.add_argument("--backend", default="auto", choices=list(get_args(AioBackend)))
    check.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = invoked if invoked and not invoked.endswith(".py") else "python -m engine"  # or the console script
    parser = argparse.ArgumentParser(prog=prog, description="MemAscend SSD-offload training engine",
                                     epilog="`python -m engine COMMAND --help` describes each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    plan.add_parser(sub)
    bench.add_parser(sub)
    profile.add_parser(sub)
    _add_selfcheck(sub)
    clean.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "selfcheck":
            return selfcheck_main(args)
        return args.run(args)
    except (ValueError, OSError, EngineError, MemoryError, NotImplementedError, ImportError) as exc:
        # Bad input and environment problems get one clear line, not a traceback.
        message = str(exc).strip()
        if isinstance(exc, OSError) and exc.strerror:  # no "[Errno 2]" noise
            message = exc.strerror if not exc.filename or str(exc.filename) in exc.strerror \
                else f"{exc.strerror}: {exc.filename}"
        print(f"error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
