"""``python -m engine plan MODEL``: the memory planner's table for a model and a budget.

MODEL is a preset (``llama-7b``, ``llama-13b``, ``llama-70b``, ``1b``, ``350m``, ``125m``,
``tiny``) or a Hugging Face ``config.json`` (or a directory with one). The model is built
on the meta device: nothing is allocated, nothing is written. Exit status 0 when the
plan fits the budget (and the disk), 1 when it does not.

``--device cuda --gpu-memory 24GiB`` adds the GPU's figures (resident parameters, the
streamed-weight window, gradient staging, activations) for a card of that size, whether or
not this machine has one; ``--device cuda`` alone plans for this machine's card and its free memory.

``--world-size N`` plans one of N ranks before launching them with torchrun (default: one process,
or under torchrun this rank): with partitioned state each rank's disk holds 1/N of every store
tensor. The disk check then counts every rank of this machine (``--nproc-per-node``, default N)
whose swap paths share a file system.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

import torch

from ..config import Config
from ..distributed import DistributedSpec, env_rank_path, rank_paths
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
    p.add_argument("--world-size", type=int, metavar="N", help="plan one of N ranks (torchrun; default: "
                   "one process, or under torchrun its WORLD_SIZE)")
    p.add_argument("--nproc-per-node", type=int, metavar="N", help="with --world-size: ranks on this machine, "
                   "for the disk check (default: the world size)")
    p.add_argument("--batch", type=int, default=0, help="with --seq-len: include the activations of this batch")
    p.add_argument("--seq-len", type=int, default=0, help="sequence length for the activation estimate")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.world_size is not None and args.world_size < 1:
        raise CLIError(f"--world-size must be >= 1, got {args.world_size}")
    if args.nproc_per_node is not None and not (args.world_size and 1 <= args.nproc_per_node <= args.world_size):
        raise CLIError("--nproc-per-node goes with --world-size, between 1 and the world size")
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
            for formatted in _each_rank(path, args):  # {rank}: this rank's, or each local rank's (--world-size)
                if not os.path.isdir(formatted):
                    raise CLIError(f"--nvme-path {path!r} does not exist or is not a directory"
                                   + (f" ({formatted})" if formatted != path else ""))
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
        result = plan_memory(model, cfg, example_inputs=example, gpu_memory=args.gpu_memory, world_size=args.world_size)
    except PlanError as exc:
        # Show the smallest plan anyway, marked as not fitting.
        result = plan_memory(model, cfg, example_inputs=example, gpu_memory=args.gpu_memory, enforce_budgets=False,
                             world_size=args.world_size)
        fits, reason = False, str(exc)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), dtype {cfg.dtype}")
    table = result.table()
    print(table)
    if cfg.nvme_paths:
        fits_row = next(line for line in table.splitlines() if line.startswith("fits "))
        width = len(fits_row) - len(fits_row.split()[-1]) - 2  # the table's key column
        try:
            check_disk(result, [env_rank_path(p) for p in cfg.nvme_paths], ranks=_local_rank_paths(args, cfg))
            print(f"{'fits on disk'.ljust(width)}  yes")
        except PlanError as exc:
            print(f"{'fits on disk'.ljust(width)}  NO")
            reason = f"{reason}; {exc}" if not fits else str(exc)
            fits = False
    if not fits:
        print(f"does not fit: {reason}", file=sys.stderr)
        return 1
    return 0


def _local_rank_paths(args: argparse.Namespace, cfg: Config) -> Optional[list[list[str]]]:
    """Planning N ranks before the launch: every local rank's swap paths (``{rank}`` / ``{local_rank}``
    formatted as torchrun on the first machine would), so ranks sharing a file system are counted
    together. None otherwise (this process's paths alone)."""
    if not args.world_size or args.world_size == 1:
        return None
    return [rank_paths(cfg.nvme_paths, spec) for spec in _local_specs(args)]


def _local_specs(args: argparse.Namespace) -> list[DistributedSpec]:
    per_node = args.nproc_per_node or args.world_size
    return [DistributedSpec(rank=r, world_size=args.world_size, local_rank=r) for r in range(per_node)]


def _each_rank(path: str, args: argparse.Namespace) -> list[str]:
    if not args.world_size or args.world_size == 1:
        return [env_rank_path(path)]
    try:
        return list(dict.fromkeys(rank_paths([path], spec)[0] for spec in _local_specs(args)))
    except (KeyError, IndexError, ValueError):
        return [path]  # a malformed placeholder: Config's own check names it
