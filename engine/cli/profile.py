"""``python -m engine profile [options] -- CMD ...``: run any command under the memory profiler.

The command's process (and, with its descendants, the RSS of the whole tree) is sampled
every ``--interval`` seconds; at exit the peaks are printed and a JSON report and a PNG
timeline are written. The exit status is the command's.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys

from ..errors import CLIError
from ..memory.profiler import MemoryProfiler
from ..units import format_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="run a command under the memory profiler (JSON + PNG timeline)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=0.02, metavar="S", help="sampling period (default 0.02 s)")
    p.add_argument("--output-dir", default="memascend-output", metavar="DIR",
                   help="where profile.json and profile.png go (default ./memascend-output)")
    p.add_argument("--name", default="profile", help="file name stem for the report and timeline")
    p.add_argument("--no-children", action="store_true", help="sample the command's own process only")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise CLIError("no command given: python -m engine profile -- CMD [ARGS...]")
    if args.interval <= 0:
        raise CLIError(f"--interval must be positive, got {args.interval}")
    label = shlex.join(cmd)
    try:
        child = subprocess.Popen(cmd)
    except OSError as exc:
        raise CLIError(f"cannot run {cmd[0]!r}: {exc.strerror}") from None
    prof = MemoryProfiler(args.interval, pid=child.pid, include_children=not args.no_children, label=label).start()
    # Ctrl-C goes to the whole process group; let the child decide, then report what was measured.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # wait4 gives the kernel's own peak RSS of the child (ru_maxrss), even after it exited.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    finally:
        signal.signal(signal.SIGINT, previous)
        prof.stop()
    prof.extra.update(command=cmd, exit_status=child.returncode, ru_maxrss=usage.ru_maxrss * 1024)
    json_path, png_path = prof.save(args.output_dir, args.name)
    peaks = prof.peaks()
    report = prof.report(include_series=False)
    print(f"profile of: {label} (exit status {child.returncode}, {report['duration_s']:.2f} s, "
          f"{report['samples']} samples)", file=sys.stderr)
    print(f"  peak RSS:             {format_bytes(peaks['rss'] or 0)} (sampled"
          f"{', with child processes' if not args.no_children else ''}); the command's own high-water mark "
          f"{format_bytes(usage.ru_maxrss * 1024)} (ru_maxrss)", file=sys.stderr)
    print(f"  peak system used:     {format_bytes(peaks['system_used'] or 0)} "
          f"(+{format_bytes(report['peak_system_used_over_baseline'] or 0)} over the start)", file=sys.stderr)
    print(f"  peak locked:          {format_bytes(peaks['locked'] or 0)}", file=sys.stderr)
    print(f"  read / written:       {format_bytes(report['totals']['read'] or 0)} / "
          f"{format_bytes(report['totals']['written'] or 0)}", file=sys.stderr)
    print(f"  report: {json_path}\n  timeline: {png_path}", file=sys.stderr)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode
