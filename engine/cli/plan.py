"""``python -m engine plan MODEL``: the memory planner's table for a model and a budget.

MODEL is a preset (``llama-7b``, ``llama-13b``, ``llama-70b``, ``1b``, ``350m``, ``125m``,
``tiny``) or a Hugging Face ``config.json`` (or a directory with one). The model is built
on the meta device: nothing is allocated, nothing is written. Exit status 0 when the
plan fits the budget (and the disk), 1 when it does not.

``--device cuda --gpu-memory 24GiB`` adds the GPU's figures (resident parameters, the
streamed-weight window, gradient staging, activations) for a card of that size, whether or
not this machine has one; ``--device cuda`` alone plans for this machine's card and its free memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from ..config import Config
from ..distributed import env_rank_path
from ..errors import CLIError, PlanError
from ..offload.planner import check_disk
from ..offload.planner import plan as plan_memory
from ..presets import PRESETS, build_model


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="pool size, disk and predicted peak memory for a model, without allocating",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a config.json / model directory")
    p.add_argument("--memory-budget", "--budget", dest="memory_budget", metavar="BYTES",
                   help="host memory budget, e.g. 16GiB")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="compute dtype (default: the config's, fp32)")
    p.add_argument("--device", metavar="DEVICE", help="compute device: auto, cpu, cuda, cuda:N "
                   "(default: the config's, auto)")
    p.add_argument("--gpu-memory", metavar="BYTES", help="GPU memory budget, e.g. 24GiB: plan for a card of "
                   "this size (default: the config's gpu_memory, else the free memory of the --device card)")
    p.add_argument("--nvme-path", action="append", metavar="DIR", help="swap directories (disk is checked there)")
    p.add_argument("--config", metavar="FILE", help="engine config (YAML/JSON) or a DeepSpeed JSON")
    p.add_argument("--batch", type=int, default=0, help="with --seq-len: include the activations of this batch")
    p.add_argument("--seq-len", type=int, default=0, help="sequence length for the activation estimate")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = Config.load(args.config) if args.config else Config()
    overrides = {}
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.memory_budget:
        overrides["host_memory_budget"] = args.memory_budget
    if args.device:
        overrides["device"] = args.device
    if args.nvme_path:
        for path in args.nvme_path:
            if not os.path.isdir(env_rank_path(path)):  # {rank}: this rank's
                raise CLIError(f"--nvme-path {path!r} does not exist or is not a directory")
        overrides["nvme_path"] = args.nvme_path if len(args.nvme_path) > 1 else args.nvme_path[0]
    cfg = dataclasses.replace(cfg, **overrides)
    if (args.batch > 0) != (args.seq_len > 0) or args.batch < 0 or args.seq_len < 0:
        raise CLIError("--batch and --seq-len go together (both positive) to include activations")
    model = build_model(args.model, "meta", max_positions=max(args.seq_len, 4096))
    example = None
    if args.batch:
        ids = torch.zeros(args.batch, args.seq_len, dtype=torch.long, device="meta")
        example = dict(input_ids=ids, labels=ids)
    fits = True
    try:
        result = plan_memory(model, cfg, example_inputs=example, gpu_memory=args.gpu_memory)
    except PlanError as exc:
        # Show the smallest plan anyway, marked as not fitting.
        result = plan_memory(model, cfg, example_inputs=example, gpu_memory=args.gpu_memory, enforce_budgets=False)
        fits, reason = False, str(exc)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), dtype {cfg.dtype}")
    table = result.table()
    print(table)
    if cfg.nvme_paths:
        fits_row = next(line for line in table.splitlines() if line.startswith("fits "))
        width = len(fits_row) - len(fits_row.split()[-1]) - 2  # the table's key column
        try:
            check_disk(result, [env_rank_path(p) for p in cfg.nvme_paths])
            print(f"{'fits on disk'.ljust(width)}  yes")
        except PlanError as exc:
            print(f"{'fits on disk'.ljust(width)}  NO")
            reason = f"{reason}; {exc}" if not fits else str(exc)
            fits = False
    if not fits:
        print(f"does not fit: {reason}", file=sys.stderr)
        return 1
    return 0
