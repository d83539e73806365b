"""``python -m engine bench``: this engine vs plain PyTorch vs the ablation baseline (all
MemAscend techniques off) vs DeepSpeed ZeRO-3 offloading to NVMe (when installed), on
the same model, data and starting weights; each configuration in a fresh process.

Prints a table of peak RSS, peak system memory (over the start), step time, bytes moved
and ratios; the results (with per-step times and losses) go to --output as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..bench import ALL_MODES, DTYPES, MODES, compare, format_table, table_rows
from ..errors import CLIError
from ..presets import PRESETS


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side training benchmark: engine vs torch vs baseline vs DeepSpeed",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="125m", help=f"comma-separated presets ({', '.join(PRESETS)}; default 125m)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated, of {', '.join(ALL_MODES)} (default: {','.join(MODES)}; 'all': every one); "
                   "no-SWITCH is the engine with one technique off, "
                   "deepspeed-default DeepSpeed's default offload settings")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--nvme-path", metavar="DIR", help="directory for swap files (default: the system temp dir)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every mode")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON here")
    p.add_argument("--timelines", metavar="DIR", help="write each configuration's memory timeline (PNG + JSON) here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = list(ALL_MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in models:
        if m not in PRESETS:
            raise CLIError(f"unknown model preset {m!r}; known: {', '.join(PRESETS)}")
    for m in modes:
        if m not in ALL_MODES:
            raise CLIError(f"unknown mode {m!r}; known: {', '.join(ALL_MODES)}")
    if args.nvme_path and not os.path.isdir(args.nvme_path):
        raise CLIError(f"--nvme-path {args.nvme_path!r} does not exist or is not a directory")
    results = compare(models, modes, steps=args.steps, batch=args.batch, seq=args.seq_len, dtype=args.dtype,
                      path=args.nvme_path, checkpointing=args.checkpointing, lr=args.lr,
                      timeline_dir=os.path.abspath(args.timelines) if args.timelines else None,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    if not results:
        raise CLIError("every benchmark configuration failed (see above)")
    headers, rows = table_rows(results)
    print(f"\n{args.dtype} AdamW, batch {args.batch} x seq {args.seq_len}"
          f"{', activation checkpointing' if args.checkpointing else ''}; median step of {args.steps} "
          "(first excluded); peak sys = system-wide used memory over the start")
    print(format_table(headers, rows, markdown=args.markdown))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != "run"}, results=results), f, indent=1)
    return 0
