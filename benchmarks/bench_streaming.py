"""Peak RSS of a training step (forward + backward) with weights streamed from NVMe vs in memory.

Hugging Face Llama-style models of ~125M, ~350M and ~1.1B parameters (the presets
125m, 350m and tinyllama-1.1b of engine/presets.py - any preset there works; fp32,
batch 2 x sequence 256 by default). Each configuration runs in a fresh
subprocess, which reports its ``VmHWM`` (peak resident set, ``engine.procinfo``):

``memory``    the model built normally, forward + backward in DRAM (gradients in ``param.grad``).
``adaptive``  built on the meta device and initialized straight into a TensorStore
              (:func:`engine.offload.initialize_into_store`), then streamed by a
              :class:`engine.offload.ParameterStreamer` with the adaptive size-class pool.
``uniform``   the same with the uniform pool (ZeRO-Infinity's ``buffer_count`` x largest tensor).
``torchpin``  adaptive pool, staging pinned through ``tensor.pin_memory()`` (ablation).
``files``     adaptive pool, ``files`` store layout (one file per tensor, ablation).

In the streamed runs gradients leave DRAM through ``GradientHooks`` (an ``on_grad`` sink):
with ``--grads store`` (default) each gradient is written to the store segment by
segment through two 16 MiB pinned blocks (what the gradient-offload issue will do
properly); ``--grads memory`` keeps them in ``param.grad`` like the in-memory run.

Reported per run: ``VmHWM`` of the whole process and the peak of the timed steps
alone (``VmHWM`` reset, ``engine.procinfo.reset_peak_rss``, before them), the ratio to
the in-memory run, step time, staging memory (reserved / peak held), and the read
bandwidth (bytes read / time with reads in flight) and compute stall on reads.

When the PinnedPool cannot be page-locked (RLIMIT_MEMLOCK), its slots are written
once before timing (``--prefault``, default on) so that the RSS shows the staging
memory a locked pool would hold.

Target (issue): streamed peak RSS at ~1B <= 30% of the in-memory run's.

Example: ``python benchmarks/bench_streaming.py --models 125m,350m --path /mnt/nvme/tmp``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from _common import child_env, print_table, run_worker, save_result

from engine.errors import BenchError
from engine.presets import PRESETS
from engine.procinfo import process_memory, reset_peak_rss

MODELS = ("125m", "350m", "tinyllama-1.1b")  # presets of engine/presets.py (any of them works)
BIG = ("1b", "tinyllama-1.1b")  # the ~1B presets the target is checked on
MODES = ("memory", "adaptive", "uniform", "torchpin", "files")


def reset_hwm() -> bool:
    """Resets VmHWM (False where /proc/self/clear_refs may not be written)."""
    try:
        reset_peak_rss()
        return True
    except OSError:
        return False


def llama_config(name: str):
    import transformers

    return transformers.LlamaConfig(**PRESETS[name], max_position_embeddings=2048, tie_word_embeddings=False,
                                    attn_implementation="sdpa")


class GradToStore:
    """on_grad sink: writes each gradient to the store, segment by segment, through two pinned blocks."""

    def __init__(self, store, segment_bytes: int):
        from engine import PinnedPool

        self.store = store
        self.segment = segment_bytes
        self.pool = PinnedPool(2 * segment_bytes)
        self.blocks = [self.pool.alloc(segment_bytes), self.pool.alloc(segment_bytes)]
        self.pending = [None, None]
        self.turn = 0
        self.bytes = 0
        self.seconds = 0.0

    def __call__(self, name: str, grad) -> None:
        import torch

        start = time.perf_counter()
        key = ("grad", name)
        if key not in self.store:
            self.store.allocate(key, tuple(grad.shape), grad.dtype)
        flat = grad.detach().reshape(-1).view(torch.uint8)
        nbytes = flat.numel()
        for offset in range(0, nbytes, self.segment):
            n = min(self.segment, nbytes - offset)
            i = self.turn
            self.turn ^= 1
            if self.pending[i] is not None:
                self.pending[i].wait()
            view = self.blocks[i].tensor((n,), torch.uint8)
            view.copy_(flat[offset:offset + n])
            del view
            self.pending[i] = self.store.write_from(key, self.blocks[i], offset, n)
            self.bytes += n
        self.seconds += time.perf_counter() - start

    def flush(self) -> None:
        for i, request in enumerate(self.pending):
            if request is not None:
                request.wait()
                self.pending[i] = None


def init_value(name: str, shape, generator):
    import torch

    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, 0.02, generator=generator)


def worker(args) -> dict:
    import resource

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or os.cpu_count())
    import transformers

    from engine.offload import initialize_into_store

    transformers.logging.set_verbosity_error()
    cfg = llama_config(args.model)
    result = dict(model=args.model, mode=args.mode, malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                  batch=args.batch, seq=args.seq, depth=args.depth,
                  checkpointing=args.checkpointing, grads=args.grads if args.mode != "memory" else "memory")
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    result["memlock_limit"] = -1 if soft == resource.RLIM_INFINITY else soft
    result["rss_imports"] = process_memory().rss
    g = torch.Generator().manual_seed(0)
    streamer = sink = pool = None
    t0 = time.perf_counter()
    if args.mode == "memory":
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(init_value(name, tuple(p.shape), g))
            for module in model.modules():
                if "RotaryEmbedding" in type(module).__name__:
                    model._init_weights(module)
    else:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        store_layout = "files" if args.mode == "files" else "direct"
        pool_mode = "uniform" if args.mode == "uniform" else "adaptive"
        pinned = "torch" if args.mode == "torchpin" else "exact"
        from engine import PinnedPool
        from engine.offload import ParameterStreamer, plan_staging
        from engine.offload.grad_hooks import GradientHooks
        from engine.storage import TensorStore

        # one PinnedPool sized by the plan, registered with the store's io_uring and carved by the streamer
        plan = plan_staging(model, prefetch_depth=args.depth, resident_threshold_bytes=args.threshold,
                            buffer_pool=pool_mode)
        pool = PinnedPool(plan.total_bytes) if pinned == "exact" else None
        path = tempfile.mkdtemp(prefix="bench-streaming-", dir=args.path)
        store = TensorStore(path, layout=store_layout, pool=pool)
        # weights are produced one at a time and written through the same pool: no full model in DRAM
        initialize_into_store(model, store,
                              lambda name, shape: None if "inv_freq" in name else init_value(name, shape, g),
                              resident_threshold_bytes=args.threshold,
                              pool=pool if pool is not None else PinnedPool(plan.total_bytes))
        on_grad = None
        if args.grads == "store":
            sink = GradToStore(store, store.segment_elements * 4)
            on_grad = sink
        streamer = ParameterStreamer(model, store, pool, prefetch_depth=args.depth,
                                     resident_threshold_bytes=args.threshold, buffer_pool=pool_mode,
                                     pinned_alloc=pinned).attach()
        if on_grad is not None:  # the gradient path's hooks, next to the streamer
            GradientHooks(model, on_grad).install()
        result["pool_locked"] = streamer.stats().get("pinned_pool", {}).get("locked")
        if args.prefault and not result["pool_locked"]:
            streamer.staging.touch()
        result["io_backend"] = store.stats()["backend"]
        result["store_layout"] = store.layout
    result["params"] = sum(p.numel() for p in model.parameters())
    result["build_seconds"] = time.perf_counter() - t0
    memory = process_memory()
    result["rss_after_build"], result["hwm_build"] = memory.rss, memory.peak_rss
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    result["hwm_reset"] = reset_hwm()
    times, losses = [], []
    for step in range(args.steps):
        if streamer is not None and step == args.steps - 1:
            streamer.reset_stats()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if sink is not None:
            sink.flush()
        times.append(time.perf_counter() - start)
        losses.append(out.loss.item())
        del out
    result["step_seconds"] = times
    result["loss"] = losses[-1]
    result["hwm_steps"] = process_memory().peak_rss
    result["hwm"] = max(result["hwm_steps"], result["hwm_build"]) if result["hwm_reset"] else result["hwm_steps"]
    if streamer is not None:
        s = streamer.stats()  # the last step only
        result.update(bytes_read=s["bytes_read"], read_seconds=s["read_seconds"], read_bandwidth=s["read_bandwidth"],
                      stall_seconds=s["stall_seconds"], hits=s["hits"], misses=s["misses"],
                      prefetch_skipped=s["prefetch_skipped"], staging_reserved=s["pool"]["reserved_bytes"],
                      staging_peak=s["pool"]["peak_held_bytes"], staging_classes=len(s["pool"]["classes"]),
                      staging_slots=s["pool"]["slots"], grown_slots=s["pool"]["grown_slots"],
                      streamed_bytes=s["streamed_bytes"], resident_bytes=s["resident_bytes"])
        if sink is not None:
            result.update(grad_bytes_written=sink.bytes // max(1, args.steps), grad_seconds=sink.seconds / args.steps)
        keys = [sp.key for sp in streamer.params.streamed.values()]
        streamer.close()
        if pool is not None:
            result["sweep_bandwidth"] = read_sweep(store, pool, keys)
        store.close()
    return result


def read_sweep(store, pool, keys) -> float:
    """Store read bandwidth without compute: every streamed tensor read once through the staging
    pool, as many in flight as the pool holds (bytes / wall time)."""
    from engine.errors import PoolExhaustedError

    inflight = []
    total = 0
    start = time.perf_counter()
    for key in keys:
        while True:
            try:
                block = pool.alloc(store.buffer_nbytes(key))
                break
            except PoolExhaustedError:
                if not inflight:
                    raise
                inflight.pop(0)[0].wait()
        inflight.append((store.read_into(key, block), block))
        del block
        total += store.buffer_nbytes(key)
    while inflight:
        inflight.pop(0)[0].wait()
    return total / (time.perf_counter() - start)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="125m,350m",
                        help=f"comma-separated presets, e.g. {','.join(MODELS)} (any of engine/presets.py)")
    parser.add_argument("--modes", default="memory,adaptive,uniform", help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="training steps per run (the first records the order)")
    parser.add_argument("--depth", type=int, default=1, help="prefetch depth")
    parser.add_argument("--threshold", type=int, default=1 << 20, help="resident_threshold_bytes")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (non-reentrant)")
    parser.add_argument("--grads", choices=("store", "memory"), default="store",
                        help="streamed runs: gradients to the store through on_grad, or kept in param.grad")
    parser.add_argument("--no-prefault", dest="prefault", action="store_false",
                        help="do not touch an unlocked pool's slots before timing")
    parser.add_argument("--path", default=tempfile.gettempdir(), help="directory for the swap files (NVMe)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="set MALLOC_MMAP_THRESHOLD_ in every run (glibc then returns freed large blocks to "
                             "the OS instead of keeping them in the heap); 0: glibc's dynamic default")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in models:
        if m not in PRESETS:
            parser.error(f"unknown model {m!r}; choose from {', '.join(PRESETS)}")
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    results = []
    passthrough = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--depth",
                   str(args.depth), "--threshold", str(args.threshold), "--grads", args.grads, "--path", args.path,
                   "--threads", str(args.threads)]
    if args.checkpointing:
        passthrough.append("--checkpointing")
    if not args.prefault:
        passthrough.append("--no-prefault")
    for model in models:
        for mode in modes:
            cmd = [os.path.abspath(__file__), "--worker", "--model", model, "--mode", mode] + passthrough
            print(f"[{model} {mode}] ...", flush=True)
            env = child_env(MALLOC_MMAP_THRESHOLD_=str(args.malloc_mmap_threshold)) if args.malloc_mmap_threshold \
                else child_env()
            try:
                r = run_worker(cmd, what=f"[{model} {mode}]", env=env, marker="RESULT ")
            except BenchError as exc:
                print(exc)
                print(f"[{model} {mode}] FAILED")
                continue
            results.append(r)
            print(f"[{model} {mode}] VmHWM {gib(r['hwm'])} GiB, step {r['step_seconds'][-1]:.1f} s, "
                  f"loss {r['loss']:.4f}", flush=True)

    rows = []
    base = {r["model"]: r for r in results if r["mode"] == "memory"}
    for r in results:
        ref = base.get(r["model"])
        ratio = f"{r['hwm'] / ref['hwm']:.1%}" if ref else "-"
        steps_ratio = f"{r['hwm_steps'] / ref['hwm_steps']:.1%}" if ref and r["hwm_reset"] else "-"
        bw = f"{r['read_bandwidth'] / 2**30:.2f}" if r.get("read_bandwidth") else "-"
        sweep = f"{r['sweep_bandwidth'] / 2**30:.2f}" if r.get("sweep_bandwidth") else "-"
        rows.append([r["model"], f"{r['params'] / 1e6:.0f}M", r["mode"], gib(r["hwm"]), ratio,
                     gib(r["hwm_steps"]), steps_ratio, f"{r['step_seconds'][-1]:.1f}",
                     gib(r["staging_reserved"]) if "staging_reserved" in r else "-",
                     gib(r["staging_peak"]) if "staging_peak" in r else "-",
                     gib(r["bytes_read"]) if "bytes_read" in r else "-", bw, sweep,
                     f"{r['stall_seconds']:.2f}" if "stall_seconds" in r else "-",
                     f"{r['hits']}/{r['misses']}" if "hits" in r else "-"])
    print()
    print_table(["model", "params", "mode", "VmHWM GiB", "vs memory", "steps peak GiB", "vs memory", "step s",
                 "staging GiB", "staging peak", "read GiB/step", "read GiB/s", "sweep GiB/s", "stall s",
                 "hits/misses"], rows)
    if results:
        print(f"(RSS after imports, before the model: {gib(results[0]['rss_imports'])} GiB; read GiB/s: bytes read "
              "in the step / time with reads in flight as seen at module boundaries, a lower bound; sweep: all "
              "weights read once without compute)")
    for model in models:
        a = next((r for r in results if r["model"] == model and r["mode"] == "adaptive"), None)
        u = next((r for r in results if r["model"] == model and r["mode"] == "uniform"), None)
        if a and u:
            print(f"{model}: adaptive/uniform staging {a['staging_reserved'] / u['staging_reserved']:.1%}, "
                  f"peak RSS {a['hwm'] / u['hwm']:.1%}")
    big = [r for r in results if r["model"] in BIG and r["mode"] == "adaptive" and r["model"] in base]
    if big:
        ratio = big[0]["hwm"] / base[big[0]["model"]]["hwm"]
        print(f"\ntarget: streamed peak RSS at 1B <= 30% of in-memory: {ratio:.1%} -> "
              f"{'MET' if ratio <= 0.30 else 'MISSED'}")
    locked = {r.get("pool_locked") for r in results if r["mode"] != "memory"}
    if False in locked:
        print("note: the PinnedPool could not be page-locked here (RLIMIT_MEMLOCK); "
              + ("its slots were pre-faulted so RSS includes them" if args.prefault
                 else "RSS excludes untouched slots"))
    print("saved", save_result("streaming", {"args": vars(args), "rows": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
