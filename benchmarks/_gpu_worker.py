"""One benchmark of ``benchmarks/gpu_check.py``, run in its own process (its peak RSS and GPU
peak are its own): a Llama preset (optionally with fewer layers) trained ``steps`` steps in
bf16, by this engine (``mode="engine"``) or by plain PyTorch in memory (``mode="torch"``).

Figures are of the steady state: the step time is the median of the steps after the first
(which records the execution order); the report's time split and bytes moved are the
difference between the memory reports after the first and after the last step, per step.
Fields the runtime does not report (an engine without the GPU data path) come back None.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Optional

import torch
from transformers import LlamaForCausalLM

import engine
from engine import procinfo
from engine.bench import init_value
from engine.presets import llama_config

PER_STEP = ("forward_s", "backward_s", "step_s", "optimizer_compute_s", "h2d_wait_s", "d2h_wait_s", "h2d_bytes",
            "d2h_bytes", "bytes_read", "bytes_written")
LR = 1e-5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_config(spec: dict[str, Any]):
    config = llama_config(spec["preset"], max_positions=spec["seq"])
    if spec.get("layers"):
        config.num_hidden_layers = spec["layers"]
    return config


def _batches(spec: dict[str, Any], vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen) for _ in range(spec["steps"])]


def _figures(report: dict) -> dict[str, Optional[float]]:
    flat = dict(report, stall_s=report.get("streamer", {}).get("stall_seconds"))
    return {k: flat.get(k) for k in PER_STEP + ("stall_s",)}


def _per_step(first: dict, last: dict, steps: int) -> dict[str, Optional[float]]:
    return {k: None if first[k] is None or last[k] is None else (last[k] - first[k]) / steps for k in first}


def _gpu_peak(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_engine(spec: dict[str, Any], out: dict[str, Any]) -> None:
    config = _model_config(spec)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.train()
    data = _batches(spec, config.vocab_size)
    conf = engine.Config(nvme_path=spec["path"], dtype="bf16", device=spec["device"],
                         optimizer=engine.AdamWConfig(lr=LR))
    try:  # the plan's predictions, activations estimated from the batch shape
        plan = engine.plan(model, conf, example_inputs=dict(input_ids=data[0], labels=data[0]))
        out.update(plan_host_peak=plan.predicted_peak_bytes, plan_gpu_peak=getattr(plan, "gpu_peak_bytes", None))
    except Exception as exc:  # reported beside the measurements, not fatal to them
        out["plan_error"] = f"{type(exc).__name__}: {exc}"

    def init(name: str, shape: tuple[int, ...]):
        return None if name.endswith("inv_freq") else init_value(name, shape)

    with engine.initialize(model, conf, initializer=init) as trainer:
        report = trainer.memory_report()
        device = getattr(getattr(trainer.runtime, "device", None), "device", torch.device("cpu"))
        out.update(device=report.get("device", f"{device} (not reported)"), backend=report["backend"])
        wanted = "separate" if spec["device"] == "separate" else spec["device"].split(":")[0]
        if not str(out["device"]).startswith(wanted):  # e.g. an engine without the GPU data path
            out["status"] = f"failed: asked for device {spec['device']!r}, the runtime computes on {out['device']}"
            return  # not measured: a 1B model trained on the wrong device would only spend the time budget
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, first = [], None
        for x in data:
            start = time.perf_counter()
            loss = trainer(input_ids=x, labels=x).loss
            trainer.backward(loss)
            trainer.step()
            out.setdefault("loss0", float(loss))  # float() waits for the GPU
            _sync(device)
            times.append(time.perf_counter() - start)
            if first is None:
                first = _figures(trainer.memory_report())
        report = trainer.memory_report()
    assert first is not None
    per = _per_step(first, _figures(report), len(times) - 1)
    waits = [per[k] for k in ("stall_s", "h2d_wait_s", "d2h_wait_s") if per[k] is not None]
    moved = (per["bytes_read"] or 0) + (per["bytes_written"] or 0)
    step_s = statistics.median(times[1:])
    out.update(params=sum(p.numel() for p in model.parameters()), times=times, step_s=step_s,
               gpu_peak=_gpu_peak(device), report_gpu_peak=report.get("gpu_peak_allocated_bytes"),
               nvme_gb_s=moved / step_s / 1e9, nvme_wait_s=per["stall_s"], h2d_wait_s=per["h2d_wait_s"],
               d2h_wait_s=per["d2h_wait_s"], optimizer_s=per["optimizer_compute_s"],
               compute_s=max(0.0, per["forward_s"] + per["backward_s"] - sum(waits)),  # type: ignore[operator]
               h2d_bytes=per["h2d_bytes"], d2h_bytes=per["d2h_bytes"], bytes_per_step=moved)


def run_torch(spec: dict[str, Any], out: dict[str, Any]) -> None:
    config = _model_config(spec)
    kind = "cpu" if spec["device"] in ("cpu", "separate") else "cuda"
    device = torch.device(spec["device"] if kind == "cuda" else "cpu")
    params = sum(p.numel() for p in _meta(config).parameters())
    if kind == "cuda":  # fp32 weights + grads + two Adam moments, plus a quarter for activations
        need, free = 16 * params * 1.25, torch.cuda.mem_get_info(device)[0]
        if need > free:
            out["status"] = f"skipped: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free on {device}"
            return
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_value(name, tuple(p.shape)))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    data = _batches(spec, config.vocab_size)
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for x in data:
        start = time.perf_counter()
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.setdefault("loss0", float(loss))
        _sync(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    out.update(device=str(device), params=params, times=times, step_s=step_s, gpu_peak=_gpu_peak(device))


def _meta(config):
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def run_benchmark(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs ``spec`` (name, preset, layers, mode, device, steps, batch, seq, path) in this process."""
    torch.manual_seed(0)
    out: dict[str, Any] = dict(spec, status="ok")
    (run_torch if spec["mode"] == "torch" else run_engine)(spec, out)
    if "step_s" in out:
        out["tokens_per_s"] = spec["batch"] * spec["seq"] / out["step_s"]
        out["peak_rss"] = procinfo.peak_rss_bytes()
    return out
