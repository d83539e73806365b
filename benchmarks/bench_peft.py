"""LoRA fine-tuning: this engine (frozen bf16 base streamed read-only from NVMe, fp32
adapters and their AdamW state in DRAM) vs Hugging Face peft with the model in memory.

LoRA r=16, alpha=32 on q,k,v,o,gate,up,down of HF Llama-style presets (engine/presets.py;
vocab 32000, bf16 base, fp32 adapters - peft's default layout for a bf16 base), AdamW, batch 2 x seq 256:
  125m: 768 hidden / 12 layers     350m: 1024 / 24     1b: 2048 / 16 (intermediate 5632, 32 heads)
Each configuration runs in a fresh subprocess; a sampler thread records the peak of
system-wide used memory (MemTotal - MemAvailable) beside the process's peak RSS (VmHWM).
Step time is the median of the steps after the first (which records the execution order).
The activation estimate is the planner's (forward and backward on the meta device).
BENCH_PEFT_CONFIG='{"malloc_mmap_threshold": null}' (JSON) overrides engine.Config fields,
e.g. for ablations: {"resident_threshold_bytes": 1099511627776} keeps the base in DRAM.

Targets (issue 6), 1b: engine peak RSS <= 1.5 GiB + activations; step time <= 1.1 x peft in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from _common import print_table, run_worker, save_result

from engine.errors import BenchError
from engine.presets import PRESETS, llama_config
from engine.procinfo import peak_rss_bytes

MODELS = ("125m", "350m", "1b")  # presets of engine/presets.py
MODES = ("engine", "peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def worker(args) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.model, max_positions=args.seq)
    from engine.memory.profiler import MemoryProfiler

    sampler = MemoryProfiler().start()  # peak of system-wide used memory over its baseline
    data = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq)) for _ in range(args.steps)]
    times, extra = [], {}
    if args.mode == "peft":
        import peft

        torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of the base ever exists
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        params = [q for q in model.parameters() if q.requires_grad]  # fp32 (peft's autocast_adapter_dtype)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        for x in data:
            start = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
    else:
        import engine
        from engine.bench import init_value
        from engine.peft import LoraConfig, apply_lora

        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        apply_lora(model, LoraConfig(r=16, alpha=32, target_modules=TARGETS))

        def init(name, shape):
            return None if name.endswith("inv_freq") else init_value(name, shape)

        conf = engine.Config(nvme_path=args.path, frozen_dtype="bf16", optimizer=engine.AdamWConfig(lr=1e-4),
                             **json.loads(os.environ.get("BENCH_PEFT_CONFIG", "{}")))
        x0 = data[0]
        plan = engine.plan(model, conf, example_inputs=dict(input_ids=x0, labels=x0))
        with engine.initialize(model, conf, initializer=init) as trainer:
            for x in data:
                start = time.perf_counter()
                trainer.backward(trainer(input_ids=x, labels=x).loss)
                trainer.step()
                times.append(time.perf_counter() - start)
            report = trainer.memory_report()
        streamer = report["streamer"]
        extra = dict(bytes_read=report["bytes_read"], bytes_written=report["bytes_written"],
                     pool_bytes=report["pool"]["capacity"], predicted_peak=plan.predicted_peak_bytes,
                     activations=plan.activation_bytes, trainable_state=plan.trainable_state_bytes,
                     stall_s=streamer["stall_seconds"], misses=streamer["misses"], backend=report["backend"])
    peak_system = sampler.stop().report(include_series=False)["peak_system_used_over_baseline"]
    return dict(model=args.model, mode=args.mode, params=sum(q.numel() for q in model.parameters()),
                trainable=sum(q.numel() for q in model.parameters() if q.requires_grad),
                peak_rss=peak_rss_bytes(), peak_system=peak_system,
                step_s=statistics.median(times[1:]) if len(times) > 1 else times[0], times=times, **extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="125m,1b")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--path", default=None, help="NVMe directory (default: system temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    path = args.path or tempfile.gettempdir()
    results = []
    for model in args.models.split(","):
        if model not in PRESETS:
            parser.error(f"unknown model preset {model!r}; known: {', '.join(MODELS)} (or any of engine/presets.py)")
        for mode in args.modes.split(","):
            if mode not in MODES:
                parser.error(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
            cmd = [os.path.abspath(__file__), "--worker", "--model", model, "--mode", mode, "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--path", path]
            try:
                r = run_worker(cmd, what=f"{model}/{mode}")
            except BenchError as exc:
                print(exc, file=sys.stderr)
                continue
            results.append(r)
            print(f"{model:6s} {mode:7s} peak RSS {r['peak_rss'] / 2**30:6.2f} GiB  step {r['step_s']:7.2f} s",
                  flush=True)
    by = {(r["model"], r["mode"]): r for r in results}
    rows = []
    for r in results:
        ref = by.get((r["model"], "peft"))
        acts = r.get("activations") or (by.get((r["model"], "engine")) or {}).get("activations", 0)
        rows.append([r["model"], r["mode"], f"{r['params'] / 1e6:.0f}M", f"{r['trainable'] / 1e6:.1f}M",
                     f"{r['peak_rss'] / 2**30:.2f}", f"{(r['peak_rss'] - acts) / 2**30:.2f}",
                     f"{r['peak_system'] / 2**30:.2f}", f"{r['step_s']:.2f}",
                     f"{r['peak_rss'] / ref['peak_rss']:.2f}" if ref else "",
                     f"{r['step_s'] / ref['step_s']:.2f}" if ref else "",
                     f"{r['stall_s'] / len(r['times']):.2f}" if "stall_s" in r else ""])
    print(f"\nLoRA r=16 on {','.join(t.split('_')[0] for t in TARGETS)}; bf16 base, fp32 adapters, AdamW; "
          f"batch {args.batch} x seq {args.seq}; median step of {args.steps} (first excluded)")
    print_table(["model", "mode", "params", "trainable", "peak RSS GiB", "RSS - acts GiB", "peak sys GiB", "step s",
                 "RSS / peft", "step / peft", "stall s/step"], rows)
    for model in args.models.split(","):
        e = by.get((model, "engine"))
        if e:
            print(f"{model}: engine peak RSS - activations ({e['activations'] / 2**30:.2f} GiB) = "
                  f"{(e['peak_rss'] - e['activations']) / 2**30:.2f} GiB (target <= 1.5 GiB at 1b); "
                  f"bytes written during training {e['bytes_written'] / 2**20:.1f} MiB (the base, once, at init)")
    print("saved", save_result("peft", dict(results=results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
