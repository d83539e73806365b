"""This engine vs DeepSpeed ZeRO-Infinity vs plain PyTorch, side by side in one session.

Same model, data and seed in every mode (HF Llama-style presets 125m, 350m, 1b; fp32 and
bf16; batch 2 x seq 256): plain torch in memory; DeepSpeed ZeRO-3 with parameters and
optimizer on NVMe (a config that really keeps parameters there, and DeepSpeed's default
offload config) when it is installed; this engine with every MemAscend technique on, each
one off ("no-<switch>") and all off ("baseline"). Every configuration runs in its own
process (engine.bench). Prints a markdown table per dtype (peak RSS, peak system memory,
step time, bytes moved, max loss difference vs torch), writes the memory timelines, and
checks the targets at 1B fp32: engine peak RSS <= 0.25x DeepSpeed's, step <= 0.7x
DeepSpeed's; average peak-RSS reduction vs DeepSpeed over the presets >= 75%.

    python benchmarks/compare_zero_infinity.py --models 125m --dtypes fp32 --modes engine,torch,deepspeed
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

from _common import save_result

from engine.bench import ALL_MODES, compare, format_table, table_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="125m,350m,1b")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--modes", default=",".join(ALL_MODES), help="default: every mode")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every mode")
    parser.add_argument("--path", default=None, help="NVMe directory (default: system temp dir)")
    parser.add_argument("--timelines", default=None, help="timeline PNG/JSON directory (default: a temp dir)")
    args = parser.parse_args()
    models, modes = args.models.split(","), args.modes.split(",")
    timelines = args.timelines or tempfile.mkdtemp(prefix="memascend-timelines-")
    everything = {}
    for dtype in args.dtypes.split(","):
        results = compare(models, modes, steps=args.steps, batch=args.batch, seq=args.seq, dtype=dtype,
                          path=args.path, checkpointing=args.checkpointing, timeline_dir=timelines)
        everything[dtype] = results
        print(f"\n### {dtype}, batch {args.batch} x seq {args.seq}"
              f"{', activation checkpointing' if args.checkpointing else ''}, median of {args.steps} steps\n")
        print(format_table(*table_rows(results), markdown=True))
        by = {(r["model"], r["mode"]): r for r in results}
        reductions = [1 - by[(m, "engine")]["peak_rss"] / by[(m, "deepspeed")]["peak_rss"]
                      for m in models if (m, "engine") in by and (m, "deepspeed") in by]
        if reductions:
            print(f"\naverage peak-RSS reduction vs DeepSpeed over {len(reductions)} preset(s): "
                  f"{statistics.mean(reductions):.1%} (target >= 75%)")
        if dtype == "fp32" and ("1b", "engine") in by and ("1b", "deepspeed") in by:
            e, d = by[("1b", "engine")], by[("1b", "deepspeed")]
            print(f"1B: engine/DeepSpeed peak RSS {e['peak_rss'] / d['peak_rss']:.2f} (target <= 0.25), "
                  f"step {e['step_s'] / d['step_s']:.2f} (target <= 0.7)")
    print(f"\ntimelines: {timelines}")
    print("saved", save_result("compare_zero_infinity", dict(vars(args), results=everything)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
