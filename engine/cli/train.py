"""``python -m engine train``: fine-tune with parameters and optimizer states on NVMe.

With no arguments: the ``tiny`` Llama-style preset (hidden 256, 4 layers, byte-level
vocabulary) trained from scratch on the corpus shipped in ``engine/data``, in a private
temporary NVMe directory, for enough steps that the loss visibly falls (about a minute
on two CPU cores). A progress bar shows loss, step time, DRAM and I/O bandwidth; at the
end the memory report is printed and the profiler's timeline (PNG + JSON) is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Optional

import torch

from ..api import from_pretrained, initialize
from ..checkpoint.hf import load_pretrained
from ..config import AdamWConfig, AutoValues, Config
from ..data import BYTE_VOCAB, BYTES, Encoder, TokenBatches, corpus_documents, open_documents, token_stream
from ..distributed import all_reduce_mean_, env_rank_path, shard_indices
from ..errors import CLIError
from ..memory.profiler import MemoryProfiler
from ..peft import LoraConfig, apply_lora
from ..presets import llama_config
from ..units import format_bytes

DEFAULT_STEPS, DEFAULT_BATCH, DEFAULT_SEQ = 100, 8, 128
DEFAULT_LR_SCRATCH, DEFAULT_LR_PRETRAINED = 2e-3, 2e-5


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with parameters and optimizer states on NVMe "
                       "(no arguments: the embedded default run)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="Hugging Face model directory (config.json + *.safetensors); "
                   "default: the 'tiny' preset trained from scratch")
    p.add_argument("--data", metavar="PATH", help="training data: a .txt file (one document), .jsonl (one object "
                   "per line), a .parquet file or a directory of them, or a datasets save_to_disk directory "
                   "(a DatasetDict: its 'train' split); parquet/datasets with an input_ids column are used "
                   "pre-tokenized. Documents are tokenized with the --model directory's tokenizer (byte-level "
                   "without one), joined with its EOS token (byte-level: a blank line) and packed: each "
                   "sequence is a random --seq-len window of that stream (resumable by --seed). The stream "
                   "is held in memory, 4 bytes per token (default: the corpus shipped with the package)")
    p.add_argument("--text-field", metavar="NAME", help="the text field of .jsonl/parquet/datasets rows (default "
                   "\"text\"; naming it also makes a pre-tokenized input_ids column be ignored)")
    p.add_argument("--config", metavar="FILE", help="engine config (YAML/JSON) or a DeepSpeed JSON; "
                   "options given here override it")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="compute dtype (default fp32)")
    p.add_argument("--device", metavar="DEVICE", help="compute device: auto (CUDA when available, else the CPU), "
                   "cpu, cuda, cuda:N (default: the config's, auto)")
    p.add_argument("--nvme-path", action="append", metavar="DIR",
                   help="directory for the swap files; repeat to stripe over several drives "
                   "(default: $TMPDIR/memascend-<uid>, private to this user)")
    p.add_argument("--gpu-memory", metavar="BYTES", help="GPU memory budget, e.g. 20GiB (default: the config's "
                   "gpu_memory, else the card's free memory); a run that cannot fit is refused before allocating")
    p.add_argument("--memory-budget", metavar="BYTES", help="host memory budget, e.g. 4GiB (the run is refused "
                   "before any allocation if it cannot fit)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only (engine.peft)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", metavar="NAMES",
                   help="comma-separated names of the linear layers to adapt (default q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"micro-batch size (default {DEFAULT_BATCH}); under torchrun the global one, split by rank")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ, help=f"tokens per sequence (default {DEFAULT_SEQ})")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULT_LR_SCRATCH} from scratch, "
                   f"{DEFAULT_LR_PRETRAINED} with --model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", metavar="DIR", help="save a checkpoint here at the end (and every --save-every)")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="also checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="resume from the checkpoint in --checkpoint-dir")
    p.add_argument("--output-dir", default="memascend-output", metavar="DIR",
                   help="where the memory report (train.json) and timeline (train.png) go (default ./memascend-output)")
    p.add_argument("--profile-interval", type=float, default=0.02, metavar="S", help="profiler sampling period")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


# ---------------------------------------------------------------------- set-up
def build_config(args: argparse.Namespace, embedded: bool) -> Config:
    """The engine config: ``--config`` (or this command's defaults), then the explicit options.
    A DeepSpeed file's ``"auto"`` values take the options, else this command's defaults."""
    defaults = _defaults(embedded)
    if args.config:
        cfg = Config.load(args.config, auto=_auto_values(args, defaults))
    else:
        cfg = Config(optimizer=AdamWConfig(lr=defaults["lr"]), gradient_clipping=defaults["gradient_clipping"],
                     resident_threshold_bytes=defaults["resident_threshold_bytes"])
    overrides: dict[str, Any] = {}
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.device:
        overrides["device"] = args.device
    if args.nvme_path:
        overrides["nvme_path"] = args.nvme_path[0] if len(args.nvme_path) == 1 else list(args.nvme_path)
    if args.memory_budget:
        overrides["host_memory_budget"] = args.memory_budget
    if args.gpu_memory:
        overrides["gpu_memory"] = args.gpu_memory
    if args.grad_accum:
        overrides["gradient_accumulation_steps"] = args.grad_accum
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)  # validated again
    if args.lr is not None:
        cfg.optimizer = dataclasses.replace(cfg.optimizer, lr=args.lr)
        cfg.validate()
    return cfg


def _defaults(embedded: bool) -> AutoValues:
    """This command's settings where neither an option nor the config file gives one."""
    # Streaming even the small default model's matrices (threshold 16 KiB) exercises the real path.
    return AutoValues(lr=DEFAULT_LR_SCRATCH if embedded else DEFAULT_LR_PRETRAINED, gradient_clipping=1.0,
                      resident_threshold_bytes=(16 << 10) if embedded else 1 << 20)


def _auto_values(args: argparse.Namespace, defaults: AutoValues) -> AutoValues:
    """What a DeepSpeed ``"auto"`` stands for here: the options given, else this command's defaults
    (as the Hugging Face Trainer fills them from its TrainingArguments)."""
    auto = AutoValues(**defaults, train_micro_batch_size_per_gpu=args.batch,
                      train_batch_size=args.batch * (args.grad_accum or 1))
    if args.lr is not None:
        auto["lr"] = args.lr
    if args.dtype:
        auto["dtype"] = args.dtype
    if args.grad_accum:
        auto["gradient_accumulation_steps"] = args.grad_accum
    return auto


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch", "seq_len"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.save_every < 0:
        raise CLIError("--save-every must be >= 0")
    if args.resume and not args.checkpoint_dir:
        raise CLIError("--resume needs --checkpoint-dir (the checkpoint to resume from)")
    if args.save_every and not args.checkpoint_dir:
        raise CLIError("--save-every needs --checkpoint-dir")
    for path in args.nvme_path or []:
        if not os.path.isdir(env_rank_path(path)):  # {rank}: this rank's
            raise CLIError(f"--nvme-path {path!r} does not exist or is not a directory")
    if args.model is not None:
        if not os.path.isdir(args.model):
            raise CLIError(f"--model {args.model!r}: no such model directory")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise CLIError(f"--model {args.model!r}: no config.json in the directory")
    if args.data is not None and not os.path.exists(args.data):
        raise CLIError(f"--data {args.data!r}: no such file or directory")
    if args.resume and not os.path.isdir(args.checkpoint_dir):
        raise CLIError(f"--resume: no checkpoint directory {args.checkpoint_dir!r}")


def _check_writable(directory: str) -> None:
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--output-dir {directory!r}: {existing!r} is not a writable directory")


def _build_trainer(args: argparse.Namespace, cfg: Config):
    """The trainer for the chosen model."""
    if args.model is None:
        from transformers import LlamaForCausalLM

        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(llama_config("tiny", max_positions=max(args.seq_len, 128)))
        if args.lora:
            _apply_lora(args, model)
        return initialize(model, cfg)
    if args.lora:
        return _lora_from_pretrained(args, cfg)
    return from_pretrained(args.model, cfg)


def _lora_config(args: argparse.Namespace) -> LoraConfig:
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    return LoraConfig(r=args.lora_rank, alpha=args.lora_alpha, target_modules=targets)


def _apply_lora(args: argparse.Namespace, model: torch.nn.Module) -> None:
    apply_lora(model, _lora_config(args))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA: r={args.lora_rank}, alpha={args.lora_alpha:g} on {args.lora_targets}: "
          f"{trainable:,} trainable parameters", file=sys.stderr)


def _lora_from_pretrained(args: argparse.Namespace, cfg: Config):
    """A Hugging Face checkpoint with LoRA adapters: the meta model is wrapped before its names
    are matched to the checkpoint's (``base_layer``), then each base tensor is read from the
    safetensors files straight into the store - the same reader as ``engine.from_pretrained``."""
    with load_pretrained(args.model, cfg, prepare=lambda model: _apply_lora(args, model)) as src:
        return initialize(src.model, src.config, initializer=src.initializer,
                                 buffer_initializer=src.initializer)


def _encoder(model_dir: Optional[str]) -> Encoder:
    """The model directory's tokenizer when it has one (EOS between documents); byte-level otherwise."""
    if model_dir is None or not any(os.path.exists(os.path.join(model_dir, f))
                                    for f in ("tokenizer.json", "tokenizer.model")):
        if model_dir is not None:
            print(f"note: {model_dir} has no tokenizer; using byte-level tokens", file=sys.stderr)
        return BYTES
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(texts: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than the model's context are expected, packing cuts them.
        return tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    if tok.eos_token_id is not None:
        return Encoder(encode, (int(tok.eos_token_id),), f"{model_dir}'s tokenizer, EOS {tok.eos_token!r} "
                       f"(id {tok.eos_token_id}) between documents")
    separator = tuple(encode(["\n\n"])[0])
    print(f"note: {model_dir}'s tokenizer has no EOS token; documents are joined with the tokens of a "
          f"blank line {list(separator)} (set eos_token in its tokenizer_config.json to change it)", file=sys.stderr)
    return Encoder(encode, separator, f"{model_dir}'s tokenizer, a blank line between documents")


def _tokens(args: argparse.Namespace) -> tuple[torch.Tensor, bool]:
    """The packed token stream of ``--data`` (or the shipped corpus), and whether it is byte-level;
    read before any model is built: a bad row fails the run before minutes of loading weights."""
    docs = open_documents(args.data, args.text_field) if args.data else corpus_documents()
    encoder = _encoder(args.model) if docs.kind == "text" else BYTES  # pre-tokenized: no tokenizer needed
    tokens = token_stream(docs, encoder, progress=not args.quiet)
    how = "as they are" if docs.kind == "tokens" else f"tokenized: {encoder.name}"
    if args.data:  # the shipped corpus needs no note
        print(f"data: {docs.path} ({docs.description}): {len(tokens):,} tokens, {how}", file=sys.stderr)
    return tokens, docs.kind == "text" and encoder is BYTES


def _check_vocab(args: argparse.Namespace, tokens: torch.Tensor, byte_level: bool, trainer) -> None:
    vocab = trainer.module.get_input_embeddings().weight.shape[0]
    top = int(tokens.max())
    if top < vocab:
        return
    if byte_level and vocab < BYTE_VOCAB:
        raise CLIError(f"--model {args.model!r} has no tokenizer and a vocabulary of {vocab} < 256: cannot use "
                       "byte-level tokens")
    raise CLIError(f"the data has token id {top} but the model's vocabulary is {vocab}: pre-tokenized for another "
                   "model? Tokenize it with this model's tokenizer, or name its text column with --text-field")


# ---------------------------------------------------------------------- the run
def _eval_loss(trainer, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return float(trainer(input_ids=batch, labels=batch).loss)


def _bar(total: int, initial: int, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, disable=quiet,
                dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    embedded = args.model is None
    cfg = build_config(args, embedded)
    _check_writable(args.output_dir)  # created at the end; a run must not fail only then
    tokens, byte_level = _tokens(args)

    prof = MemoryProfiler(args.profile_interval, label="python -m engine train").start()
    started = time.perf_counter()
    trainer = None
    try:
        batches = TokenBatches(tokens, args.batch, args.seq_len, seed=args.seed)
        trainer = _build_trainer(args, cfg)
        prof.attach(trainer=trainer)
        _check_vocab(args, tokens, byte_level, trainer)
        if args.resume:
            path, _ = trainer.load_checkpoint(args.checkpoint_dir)
            if trainer.runtime.distributed.is_main:
                print(f"resumed from {path} at step {trainer.global_steps}", file=sys.stderr)
        start_step = trainer.global_steps
        if start_step >= args.steps:
            raise CLIError(f"the checkpoint is at step {start_step}: nothing to do for --steps {args.steps}")
        result = _train_loop(args, trainer, batches, prof, start_step)
        report = trainer.memory_report()
        main = trainer.runtime.distributed.is_main
    finally:
        prof.detach()  # before the pool and store close
        if trainer is not None:
            trainer.__exit__(*sys.exc_info())  # a failing close must not hide the run's own error
        prof.stop()
    wall = time.perf_counter() - started
    if not main:  # several ranks (torchrun): rank 0 prints and writes the report
        return 0
    prof.extra["train"] = dict(result, wall_s=wall, model=args.model or "tiny (embedded default)",
                               data=args.data or "engine/data/corpus.txt", tokens=len(tokens),
                               config=cfg.to_dict())
    prof.extra["memory_report"] = _jsonable(report)
    json_path, png_path = prof.save(args.output_dir, "train")
    _print_summary(result, report, prof, wall, json_path, png_path)
    return 0


def _train_loop(args, trainer, batches: TokenBatches, prof: MemoryProfiler, start_step: int) -> dict:
    gas = trainer.gradient_accumulation_steps
    eval_batch = batches.eval_batch()
    eval_before = _eval_loss(trainer, eval_batch) if start_step == 0 else None
    losses: list[float] = []
    step_times: list[float] = []
    spec = trainer.runtime.distributed
    # Several ranks: --batch is the global batch, each rank trains on its own slice of it.
    mine = list(shard_indices(args.batch, spec))
    bar = _bar(args.steps, start_step, args.quiet or not spec.is_main)
    moved = _moved(trainer)
    try:
        for step in range(start_step, args.steps):
            t0 = time.perf_counter()
            step_loss = 0.0
            for micro in range(gas):
                x = batches.batch_at(step * gas + micro)
                if spec.is_distributed:
                    x = x[mine]
                # The trainer marks the forward, backward, optimizer and checkpoint phases itself.
                out = trainer(input_ids=x, labels=x)
                trainer.backward(out.loss)
                trainer.step()
                step_loss += out.loss.detach().item() / gas
            if spec.is_distributed:  # the global batch's mean (equal slices)
                step_loss = float(all_reduce_mean_(torch.tensor([step_loss], dtype=torch.float64), spec,
                                                   f"the loss of step {step + 1}")[0])
            if not math.isfinite(step_loss):
                raise CLIError(f"the loss is {step_loss} at step {step + 1}: lower --lr or use --dtype fp32")
            if args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0:
                trainer.save_checkpoint(args.checkpoint_dir)
            dt = time.perf_counter() - t0
            now_moved = _moved(trainer)
            losses.append(step_loss)
            step_times.append(dt)
            rss = prof.latest("rss")
            bar.set_postfix_str(f"loss {step_loss:.3f}, {dt:.2f} s/step, DRAM {(rss or 0) / 2**30:.2f} GiB, "
                                f"I/O {(now_moved - moved) / dt / 1e9:.2f} GB/s", refresh=False)
            moved = now_moved
            bar.update(1)
    finally:
        bar.close()
    if args.checkpoint_dir and not (args.save_every and args.steps % args.save_every == 0):
        trainer.save_checkpoint(args.checkpoint_dir)
    eval_after = _eval_loss(trainer, eval_batch)
    return dict(start_step=start_step, steps=args.steps, losses=losses, step_times=step_times,
                eval_loss_before=eval_before, eval_loss_after=eval_after)


def _moved(trainer) -> int:
    r = trainer.memory_report()
    return r["bytes_read"] + r["bytes_written"]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _print_summary(result: dict, report: dict, prof: MemoryProfiler, wall: float, json_path: str,
                   png_path: str) -> None:
    losses = result["losses"]
    k = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    peaks = prof.peaks()
    pool = report["pool"]
    plan = report["plan"]
    steps = len(result["step_times"])
    rows = [
        ("training loss", f"{first:.3f} -> {last:.3f} (mean of the first / last {k} steps)"),
        ("held-out loss", (f"{result['eval_loss_before']:.3f} -> " if result["eval_loss_before"] is not None else "")
         + f"{result['eval_loss_after']:.3f}"),
        ("steps", f"{result['start_step']} -> {result['steps']} in {wall:.1f} s "
                  f"(median {sorted(result['step_times'])[steps // 2]:.2f} s/step)" if steps else "none"),
        ("I/O backend", f"{report['backend']} (fixed buffers: {'yes' if report['fixed_buffers'] else 'no'})"),
        ("pinned pool", f"{format_bytes(pool['capacity'])} (peak in use {format_bytes(pool['peak_in_use'])}, "
                        f"{'page-locked' if pool['locked'] else 'NOT page-locked'})"),
        ("planned peak host memory", format_bytes(plan["predicted_peak_bytes"])),
        ("peak RSS (VmHWM)", format_bytes(report["peak_rss_bytes"])),
        ("peak system memory used", f"{format_bytes(peaks['system_used'] or 0)} "
                                    f"(+{format_bytes(prof.report(False)['peak_system_used_over_baseline'] or 0)} "
                                    "over the start)"),
        ("read / written on NVMe", f"{format_bytes(report['bytes_read'])} / {format_bytes(report['bytes_written'])}"),
        ("time: forward / backward / optimizer", f"{report['forward_s']:.1f} / {report['backward_s']:.1f} / "
                                                 f"{report['step_s']:.1f} s (I/O wait {report['io_wait_s']:.1f} s)"),
        ("report", json_path),
        ("timeline", png_path),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))
