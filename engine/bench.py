"""Side-by-side training benchmark: this engine vs plain PyTorch in memory vs this engine
with every ablation switch off (``config.with_baseline()``, ZeRO-Infinity-like) vs
DeepSpeed ZeRO-3 with parameters and optimizer states on NVMe (when installed).

Every configuration runs in a fresh subprocess (``python -m engine.bench --worker``) so
that peak RSS (``VmHWM``) is its own; the :class:`MemoryProfiler` samples system-wide used
memory. All modes start from the same weights (a per-tensor seeded initializer) and see
the same batches, so their losses are comparable. Step time is the median of the steps
after the first (which records the execution order / builds DeepSpeed's ops).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, get_args

from . import procinfo
from .api import initialize
from .config import BASELINE, AdamWConfig, Config
from .errors import BenchError  # noqa: F401 - re-exported
from .memory.profiler import MemoryProfiler, phase
from .presets import PRESETS, llama_config

MODES = ("engine", "torch", "baseline", "deepspeed")
# Also: "no-<switch>" (the engine with one MemAscend technique off, e.g. "no-buffer_pool") and
# "deepspeed-default" (ZeRO-3 on NVMe with DeepSpeed's default offload settings).
ABLATIONS = tuple(f"no-{switch}" for switch in BASELINE)
ALL_MODES = MODES + ABLATIONS + ("deepspeed-default",)
# The config dtype names the comparison runs in: fp16 is left out (plain PyTorch would need a loss scaler).
BenchDtype = Literal["fp32", "bf16"]
DTYPES: tuple[str, ...] = get_args(BenchDtype)


@dataclass
class BenchSpec:
    """One configuration: a model preset trained ``steps`` steps in one mode."""

    model: str = "tiny"
    mode: str = "engine"
    steps: int = 3
    batch: int = 2
    seq: int = 256
    dtype: BenchDtype = "fp32"
    path: Optional[str] = None
    checkpointing: bool = False
    lr: float = 1e-5
    seed: int = 0
    timeline_dir: Optional[str] = None  # write <model>-<mode>-<dtype>.png/.json (the profiler's timeline) here

    def validate(self) -> "BenchSpec":
        if self.model not in PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; known: {', '.join(PRESETS)}")
        if self.mode not in ALL_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(ALL_MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.steps < 1 or self.batch < 1 or self.seq < 2:
            raise ValueError("steps and batch must be >= 1 and seq >= 2")
        if self.path is not None and not os.path.isdir(self.path):
            raise ValueError(f"NVMe path {self.path!r} does not exist or is not a directory")
        return self


def deepspeed_missing() -> Optional[str]:
    """Why DeepSpeed cannot be benchmarked here, or None when it can."""
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (pip install deepspeed); skipping the DeepSpeed ZeRO-3 comparison"
    return None


# ---------------------------------------------------------------------- the worker
def init_value(name: str, shape: tuple[int, ...], seed: int = 0):
    """The same starting weight for every mode: ones for norms, N(0, 0.02) seeded by name."""
    import torch

    if "norm" in name:
        return torch.ones(shape)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(shape, generator=gen) * 0.02


def _batches(spec: BenchSpec, vocab: int) -> list:
    import torch

    gen = torch.Generator().manual_seed(spec.seed + 1)
    return [torch.randint(0, vocab, (spec.batch, spec.seq), generator=gen) for _ in range(spec.steps)]


def run_mode(spec: BenchSpec) -> dict:
    """Runs ``spec`` in this process and returns its measurements (call it in a fresh process)."""
    import torch


    spec.validate()
    torch.manual_seed(spec.seed)
    config = llama_config(spec.model, max_positions=spec.seq)
    data = _batches(spec, config.vocab_size)
    prof = MemoryProfiler(label=f"{spec.model}/{spec.mode}").start()
    times, losses, extra = [], [], {}
    runner = _run_torch if spec.mode == "torch" else _run_deepspeed if spec.mode.startswith("deepspeed") \
        else _run_engine
    try:
        params = runner(spec, config, data, times, losses, extra, prof)
    finally:
        prof.stop()
    if spec.timeline_dir:
        prof.save(spec.timeline_dir, f"{spec.model}-{spec.mode}-{spec.dtype}")
    report = prof.report(include_series=False)
    # Bytes moved: the store's counters for the engine, the process's storage I/O otherwise.
    extra.setdefault("bytes_read", report["totals"]["read"] or 0)
    extra.setdefault("bytes_written", report["totals"]["written"] or 0)
    return dict(model=spec.model, mode=spec.mode, dtype=spec.dtype, params=params, peak_rss=procinfo.peak_rss_bytes(),
                peak_system=report["peak_system_used_over_baseline"], peak_system_abs=report["peaks"]["system_used"],
                step_s=statistics.median(times[1:]) if len(times) > 1 else times[0], times=times, losses=losses,
                **extra)


def _timed_steps(data, step_fn, times, losses, extra, prof) -> None:
    moved = []
    for x in data:
        start = time.perf_counter()
        losses.append(float(step_fn(x)))
        times.append(time.perf_counter() - start)
        prof.sample()
        moved.append((prof.latest("read") or 0) + (prof.latest("written") or 0))
    # Steady state: what the steps after the first moved (initialization and first-step set-up excluded).
    extra["moved_per_step"] = (moved[-1] - moved[0]) / (len(moved) - 1) if len(moved) > 1 else moved[0]


def _run_torch(spec, config, data, times, losses, extra, prof) -> int:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_value(name, tuple(p.shape), spec.seed))
    if spec.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.dtype == "bf16")

    def step(x):  # phases marked as the engine's trainer marks them, for comparable timelines
        with phase("forward"), autocast:
            loss = model(input_ids=x, labels=x).loss
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            opt.step()
            opt.zero_grad()
        return loss.detach()

    _timed_steps(data, step, times, losses, extra, prof)
    return sum(p.numel() for p in model.parameters())


def _run_engine(spec, config, data, times, losses, extra, prof) -> int:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if spec.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    conf = Config(nvme_path=spec.path, dtype=spec.dtype, optimizer=AdamWConfig(lr=spec.lr))
    if spec.mode == "baseline":
        conf = conf.with_baseline()
    elif spec.mode.startswith("no-"):
        conf = conf.with_baseline(spec.mode[3:])

    def init(name, shape):
        return None if name.endswith("inv_freq") else init_value(name, shape, spec.seed)

    with initialize(model, conf, initializer=init) as trainer:
        prof.attach(trainer=trainer)

        def step(x):
            loss = trainer(input_ids=x, labels=x).loss
            trainer.backward(loss)
            trainer.step()
            return loss.detach()

        _timed_steps(data, step, times, losses, extra, prof)
        report = trainer.memory_report()
        prof.detach()  # before the pool and store close
    extra.update(bytes_read=report["bytes_read"], bytes_written=report["bytes_written"],
                 pool_bytes=report["pool"]["capacity"], predicted_peak=report["plan"]["predicted_peak_bytes"],
                 io_wait_s=report["io_wait_s"], backend=report["backend"])
    return sum(p.numel() for p in model.parameters())


def deepspeed_config(spec: BenchSpec, nvme: str) -> dict:
    """ZeRO-3, parameters and optimizer states on NVMe, configured so that parameters really
    stay there (no CPU cache of them: ``max_in_cpu`` 0, no reuse); mode ``deepspeed-default``
    leaves every offload setting at DeepSpeed's default."""
    if spec.mode == "deepspeed-default":
        return {
            "train_micro_batch_size_per_gpu": spec.batch, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": spec.lr, "weight_decay": 0.0}},
            "bf16": {"enabled": spec.dtype == "bf16"},
            "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": nvme},
                                  "offload_optimizer": {"device": "nvme", "nvme_path": nvme}},
            "steps_per_print": 10**9, "wall_clock_breakdown": False,
        }
    return {
        "train_micro_batch_size_per_gpu": spec.batch, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": spec.lr, "weight_decay": 0.0}},
        "bf16": {"enabled": spec.dtype == "bf16"},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": nvme, "pin_memory": True, "max_in_cpu": 0,
                              "buffer_count": 5},
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "pin_memory": True, "buffer_count": 4},
            "sub_group_size": int(2.5e7), "stage3_max_reuse_distance": 0, "stage3_max_live_parameters": int(5e7),
            "reduce_bucket_size": int(2.5e7), "stage3_prefetch_bucket_size": int(5e7),
            "stage3_param_persistence_threshold": 0,
        },
        "aio": {"block_size": 1048576, "queue_depth": 16, "single_submit": False, "overlap_events": True},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }


def _run_deepspeed(spec, config, data, times, losses, extra, prof) -> int:
    import shutil

    import torch

    missing = deepspeed_missing()
    if missing:
        raise BenchError(missing)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                           WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    import deepspeed
    from transformers import LlamaForCausalLM

    nvme = tempfile.mkdtemp(prefix="memascend-ds-", dir=spec.path)
    try:
        ds_config = deepspeed_config(spec, nvme)
        deepspeed.init_distributed(dist_backend="gloo")
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="nvme"):
            model = LlamaForCausalLM(config)
        # Same starting weights as the other modes, one gathered parameter at a time.
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                with torch.no_grad():
                    p.copy_(init_value(name, tuple(p.shape), spec.seed))
        if spec.checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

        def step(x):
            with phase("forward"):
                loss = engine(input_ids=x, labels=x).loss
            with phase("backward"):
                engine.backward(loss)
            with phase("optimizer"):
                engine.step()
            return loss.detach()

        _timed_steps(data, step, times, losses, extra, prof)
        params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        extra.update(deepspeed=deepspeed.__version__)
        return params
    finally:
        shutil.rmtree(nvme, ignore_errors=True)


# ---------------------------------------------------------------------- the driver
def run_isolated(spec: BenchSpec, timeout: float = 3600.0) -> dict:
    """Runs ``spec`` in a fresh Python process; raises :class:`BenchError` if it fails."""
    spec.validate()
    env = dict(os.environ)
    if spec.mode.startswith("deepspeed"):
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "engine.bench", "--worker", json.dumps(dataclasses.asdict(spec))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{spec.model}/{spec.mode} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise BenchError(f"{spec.model}/{spec.mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(models: Sequence[str], modes: Sequence[str] = MODES, *, steps: int = 3, batch: int = 2, seq: int = 256,
            dtype: str = "fp32", path: Optional[str] = None, checkpointing: bool = False, lr: float = 1e-5,
            timeline_dir: Optional[str] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Runs every model x mode side by side; DeepSpeed is skipped (with a message) when absent,
    and a failing configuration is reported and skipped, not fatal."""
    modes = list(modes)
    if any(m.startswith("deepspeed") for m in modes) and deepspeed_missing():
        log(deepspeed_missing())
        modes = [m for m in modes if not m.startswith("deepspeed")]
    specs = [BenchSpec(model=m, mode=mode, steps=steps, batch=batch, seq=seq, dtype=dtype, path=path,
                       checkpointing=checkpointing, lr=lr, timeline_dir=timeline_dir).validate()
             for m in models for mode in modes]
    results = []
    for spec in specs:
        try:
            r = run_isolated(spec)
        except BenchError as exc:
            log(str(exc))
            continue
        results.append(r)
        log(f"{r['model']:10s} {r['mode']:9s} peak RSS {r['peak_rss'] / 2**30:6.2f} GiB  "
            f"peak system +{r['peak_system'] / 2**30:6.2f} GiB  step {r['step_s']:7.2f} s")
    return results


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: peak RSS / system memory, step time, bytes moved, and ratios vs
    torch and vs DeepSpeed (when measured), and the largest loss difference vs torch."""
    by = {(r["model"], r["mode"]): r for r in results}
    headers = ["model", "mode", "params", "peak RSS GiB", "peak sys GiB", "step s", "moved GiB/step",
               "RSS/torch", "RSS/DS", "step/DS", "max loss diff vs torch"]
    rows = []
    for r in results:
        t, ds = by.get((r["model"], "torch")), by.get((r["model"], "deepspeed"))
        moved = r.get("moved_per_step", 0)
        diff = max((abs(a - b) for a, b in zip(r["losses"], t["losses"])), default=0.0) if t else None
        rows.append([r["model"], r["mode"], f"{r['params'] / 1e6:.1f}M", f"{r['peak_rss'] / 2**30:.2f}",
                     f"{r['peak_system'] / 2**30:.2f}", f"{r['step_s']:.2f}",
                     f"{moved / 2**30:.2f}" if moved else "",
                     f"{r['peak_rss'] / t['peak_rss']:.2f}" if t else "",
                     f"{r['peak_rss'] / ds['peak_rss']:.2f}" if ds else "",
                     f"{r['step_s'] / ds['step_s']:.2f}" if ds else "",
                     "" if diff is None or r["mode"] == "torch" else f"{diff:.2e}"])
    return headers, rows


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for i, row in enumerate(cells):
        padded = [c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("| " + " | ".join(padded) + " |" if markdown else "  ".join(padded))
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|" if markdown
                         else "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench")
    parser.add_argument("--worker", required=True, help="a BenchSpec as JSON")
    args = parser.parse_args(argv)
    spec = BenchSpec(**json.loads(args.worker))
    print(json.dumps(run_mode(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
