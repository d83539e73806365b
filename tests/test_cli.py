"""``python -m engine``: the embedded default ``train`` run (loss falls, report + timeline,
checkpoint and exact resume, --model and --lora), ``plan`` exit codes, ``profile``, ``bench``,
and one-line errors with exit status 2 for bad input."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from helpers import run_python

from engine.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = ["--batch", "4", "--seq-len", "32", "--quiet"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_python("-m", "engine", *args, timeout=timeout)


def load_report(directory) -> dict:
    with open(os.path.join(directory, "train.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default, shortened: 6 steps on a smaller batch, in its own process."""
    out = tmp_path_factory.mktemp("default")
    nvme = out / "nvme"
    nvme.mkdir()
    proc = cli("train", "--steps", "6", *SMALL, "--nvme-path", str(nvme), "--output-dir", str(out / "report"))
    return proc, out


def test_default_train_run_learns_and_writes_report_and_timeline(default_run):
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = load_report(out / "report")
    train = report["train"]
    losses = train["losses"]
    assert len(losses) == 6 and all(map(lambda x: x == x, losses))
    # From ~ln(256) = 5.5 (random bytes) the loss falls visibly within a few steps.
    assert losses[0] > 5.0
    assert sum(losses[-2:]) / 2 < losses[0] - 0.8
    assert train["eval_loss_after"] < train["eval_loss_before"] - 0.8
    # The memory report and the profiler's series: phases of every kind, the pool and store seen.
    assert {p["name"] for p in report["phases"]} == {"forward", "backward", "optimizer"}
    assert report["phase_summary"]["optimizer"]["count"] == 6
    assert report["io_source"] == "store" and report["totals"]["written"] > 0
    assert report["peaks"]["pool_reserved"] == report["memory_report"]["pool"]["capacity"]
    assert report["memory_report"]["steps"] == 6
    with open(out / "report" / "train.png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert "training loss" in proc.stdout and "peak RSS (VmHWM)" in proc.stdout
    assert os.listdir(out / "nvme") == []  # swap files removed at the end


def test_checkpoint_then_resume_continues_the_same_run(default_run, tmp_path, capsys):
    """3 steps + checkpoint, then --resume to step 6: the same losses as the uninterrupted run.
    (In this process: the subprocess start-up, mostly importing torch, is the slow part.)"""
    proc, out = default_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = load_report(out / "report")["train"]["losses"]
    ckpt = str(tmp_path / "ckpt")
    assert main(["train", "--steps", "3", *SMALL, "--checkpoint-dir", ckpt, "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["train", "--steps", "6", *SMALL, "--checkpoint-dir", ckpt, "--resume",
                 "--output-dir", str(tmp_path / "b")]) == 0
    assert "at step 3" in capsys.readouterr().err
    resumed = load_report(tmp_path / "b")["train"]
    assert resumed["start_step"] == 3
    assert load_report(tmp_path / "a")["train"]["losses"] == pytest.approx(full[:3], rel=1e-6)
    assert resumed["losses"] == pytest.approx(full[3:], rel=1e-5)
    assert {p["name"] for p in load_report(tmp_path / "b")["phases"]} >= {"checkpoint", "optimizer"}


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A small Llama checkpoint as Hugging Face writes it (config.json + model.safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("hf") / "model"
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_a_hugging_face_model_directory(hf_model_dir, tmp_path, lora, capsys):
    # An engine config file too: stream tensors above 4 KiB (all of this small model's matrices).
    config = write(tmp_path / "engine.yaml", "resident_threshold_bytes: 4096\noptimizer:\n  lr: 0.01\n")
    args = ["train", "--model", str(hf_model_dir), "--config", config, "--steps", "3", *SMALL,
            "--output-dir", str(tmp_path)] + (["--lora", "--lora-rank", "4"] if lora else [])
    assert main(args) == 0
    report = load_report(tmp_path)
    assert report["train"]["config"]["resident_threshold_bytes"] == 4096
    assert report["train"]["eval_loss_after"] < report["train"]["eval_loss_before"]
    assert report["memory_report"]["streamer"]["bytes_read"] > 0  # weights really streamed from NVMe
    if lora:
        # Only the adapters of q/k/v/o in 2 layers train: 2 x 4 x (64 x 4 + 4 x 64) parameters.
        err = capsys.readouterr().err
        assert "LoRA: r=4" in err and f"{2 * 4 * 512:,} trainable" in err


def test_plan_llama_7b_fits_or_not(capsys):
    assert main(["plan", "llama-7b", "--memory-budget", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "llama-7b (6,738,415,616 parameters)" in out
    for row in ("pinned pool total", "predicted peak host memory", "disk on"):
        assert row in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("fits")] == ["yes"]

    assert main(["plan", "llama-7b", "--memory-budget", "1GiB"]) == 1
    captured = capsys.readouterr()
    assert [line.split()[-1] for line in captured.out.splitlines() if line.startswith("fits")] == ["NO"]
    assert "does not fit" in captured.err and "1.00 GiB is too small" in captured.err


def test_plan_for_a_gpu_this_machine_does_not_have(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "llama-7b", "--dtype", "bf16", "--device", "cuda", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split("  ", 1) for line in out.splitlines()[1:])
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["compute device"] == "cuda" and rows["GPU memory budget"] == "24.00 GiB" and rows["fits"] == "yes"
    for row in ("GPU: resident parameters, buffers", "GPU: streamed-weight window", "GPU: gradient staging",
                "predicted peak GPU memory"):
        assert rows[row].endswith("iB"), row
    assert rows["GPU: activations"] == "not included"

    # With activations of a long sequence, 2 GiB is too small: the smallest plan is shown, and why.
    assert main(["plan", "llama-7b", "--dtype", "bf16", "--device", "cuda:1", "--gpu-memory", "2GiB",
                 "--batch", "1", "--seq-len", "2048"]) == 1
    captured = capsys.readouterr()
    assert "prefetch depth                         0" in captured.out and "compute device" in captured.out
    assert [line.split()[-1] for line in captured.out.splitlines() if line.startswith("fits")] == ["NO"]
    assert "does not fit: GPU memory 2.00 GiB on cuda:1 is too small" in captured.err and "more" in captured.err

    # No card to ask and no --gpu-memory; a CPU device with a GPU budget; an unknown device: one-line errors.
    for argv, message in ((["--device", "cuda"], "give gpu_memory"),
                          (["--device", "cpu", "--gpu-memory", "8GiB"], "computes on no GPU"),
                          (["--device", "mps"], "device must be 'auto', 'cpu', 'cuda', 'cuda:N'"),
                          (["--device", "cuda", "--gpu-memory", "lots"], "gpu_memory must be a byte size")):
        assert main(["plan", "llama-7b", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    # The CPU device shows no GPU lines.
    assert main(["plan", "llama-7b", "--device", "cpu"]) == 0
    assert "GPU" not in capsys.readouterr().out


def test_train_device_flag_goes_into_the_config(capsys):
    from engine.cli import build_parser, train

    parser = build_parser()
    for flag, device in (([], "auto"), (["--device", "cuda:1"], "cuda:1"), (["--device", "cpu"], "cpu")):
        assert train.build_config(parser.parse_args(["train", *flag]), embedded=True).device == device
    assert main(["train", "--device", "mps", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device must be 'auto', 'cpu', 'cuda', 'cuda:N'" in err[0]


def test_train_gpu_memory_flag_goes_into_the_config(capsys):
    from engine.cli import build_parser, train

    args = build_parser().parse_args(["train", "--device", "cuda", "--gpu-memory", "20GiB"])
    assert train.build_config(args, embedded=True).gpu_memory == "20GiB"
    # the CPU computes on no GPU: a budget there is a mistake, refused before anything is built
    assert main(["train", "--device", "cpu", "--gpu-memory", "8GiB", "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "computes on no GPU" in err[0]


def test_plan_checks_the_disk_of_the_nvme_paths(tmp_path, capsys):
    # 70B in fp32 needs well over 1 TiB of swap space: no test machine's disk holds it.
    assert main(["plan", "llama-70b", "--nvme-path", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1].split() == ["fits", "on", "disk", "NO"]
    assert "not enough disk space" in captured.err


def test_plan_reads_a_config_json(hf_model_dir, capsys):
    assert main(["plan", str(hf_model_dir / "config.json"), "--batch", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "activations" in out and "not included" not in out


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory either
    bad_ds = write(tmp_path / "ds.json", json.dumps(
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}))
    typo = write(tmp_path / "engine.json", json.dumps({"dtyp": "bf16"}))
    cases = [
        (["train", "--model", str(tmp_path / "missing")], "no such model directory"),
        (["train", "--config", bad_ds], "zero_optimization.offload_param.device"),
        (["train", "--config", typo], "did you mean 'dtype'"),
        (["train", "--memory-budget", "1MiB", "--steps", "1", "--quiet", "--output-dir", str(tmp_path)],
         "too small"),
        (["train", "--data", str(tmp_path / "none.txt")], "no such file"),
        (["train", "--resume"], "--resume needs --checkpoint-dir"),
        (["train", "--nvme-path", str(tmp_path / "nope")], "does not exist"),
        (["train", "--output-dir", str(tmp_path / "ds.json" / "out")], "is not a writable directory"),
        (["plan", "llama-3b"], "unknown model preset 'llama-3b'"),
        (["plan", "llama-7b", "--memory-budget", "lots"], "not a byte size"),
        (["bench", "--models", "2b"], "unknown model preset '2b'"),
        (["profile"], "no command given"),
        (["profile", "--", str(tmp_path / "no-such-program")], "cannot run"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
    assert not os.path.exists(tmp_path / "memascend-output")


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    proc = cli("plan", str(tmp_path / "no-config.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no model config") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_deepspeed_config_is_translated_and_unsupported_keys_named(tmp_path, caplog):
    from engine.cli import train

    ds = write(tmp_path / "ds.json", json.dumps({
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.01}},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)},
                              "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)},
                              "overlap_comm": True}}))
    parser = __import__("engine.cli", fromlist=["build_parser"]).build_parser()
    with caplog.at_level(logging.WARNING, logger="engine"):
        cfg = train.build_config(parser.parse_args(["train", "--config", ds, "--lr", "1e-4"]), embedded=True)
    assert "zero_optimization.overlap_comm" in caplog.text
    assert (cfg.dtype, cfg.gradient_clipping, cfg.nvme_path) == ("bf16", 0.5, str(tmp_path))
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-4, 0.01)  # --lr overrides the file


def test_profile_runs_a_command_and_reports_its_peak(tmp_path, capfd):
    code = ("import time; x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
            "print('child done', flush=True); time.sleep(0.3)")
    assert main(["profile", "--output-dir", str(tmp_path), "--", sys.executable, "-c", code]) == 0
    out, err = capfd.readouterr()
    assert "child done" in out  # the command's own output passes through
    assert "peak RSS" in err
    with open(tmp_path / "profile.json") as f:
        report = json.load(f)
    assert report["peaks"]["rss"] >= 300 << 20
    assert report["ru_maxrss"] >= 300 << 20 and report["exit_status"] == 0
    with open(tmp_path / "profile.png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    # The command's exit status is profile's.
    assert main(["profile", "--output-dir", str(tmp_path), "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_bench_compares_engine_and_torch_on_the_same_weights_and_data(monkeypatch, tmp_path):
    import engine.bench as bench

    monkeypatch.setattr(bench, "deepspeed_missing", lambda: "DeepSpeed is not installed (test)")
    lines: list[str] = []
    results = bench.compare(["tiny"], ["engine", "torch", "deepspeed"], steps=2, batch=2, seq=32, lr=1e-3,
                            timeline_dir=str(tmp_path), log=lines.append)
    assert lines[0] == "DeepSpeed is not installed (test)"
    assert [r["mode"] for r in results] == ["engine", "torch"]
    engine_r, torch_r = results
    # Same starting weights and batches: the engine's losses are torch's (fp32 AdamW parity).
    assert engine_r["losses"] == pytest.approx(torch_r["losses"], rel=1e-4)
    assert engine_r["bytes_written"] > 0 and engine_r["peak_rss"] > 0 and torch_r["step_s"] > 0
    assert engine_r["moved_per_step"] > 0  # steady-state NVMe traffic of a step
    assert bench.BenchSpec(mode="no-store").validate().mode == "no-store"  # one technique off
    with pytest.raises(ValueError, match="unknown mode 'no-bogus'"):
        bench.BenchSpec(mode="no-bogus").validate()
    headers, rows = bench.table_rows(results)
    assert rows[0][headers.index("max loss diff vs torch")] != "" and rows[1][headers.index("RSS/torch")] == "1.00"
    assert "| model" in bench.format_table(headers, rows, markdown=True)
    assert sorted(os.listdir(tmp_path)) == ["tiny-engine-fp32.json", "tiny-engine-fp32.png", "tiny-torch-fp32.json",
                                            "tiny-torch-fp32.png"]


def test_dataset_files_and_batches(tmp_path):
    from engine.data import TokenBatches, byte_tokens, default_corpus, load_text

    assert len(default_corpus().encode()) > 20_000  # the shipped corpus is package data
    txt = write(tmp_path / "a.txt", "héllo world\n" * 50)
    assert load_text(txt).startswith("héllo")
    jsonl = write(tmp_path / "a.jsonl", '{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert load_text(jsonl) == "first\n\nsecond"
    bad = write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: expected an object with a string \"text\" field"):
        load_text(bad)
    with pytest.raises(ValueError, match=r"c\.jsonl:1: not valid JSON"):
        load_text(write(tmp_path / "c.jsonl", "{oops\n"))
    with pytest.raises(ValueError, match="expected a .txt or .jsonl"):
        load_text(write(tmp_path / "d.csv", "a,b"))
    tokens = byte_tokens(load_text(txt))
    assert tokens.dtype == torch.int64 and int(tokens.max()) < 256 and len(tokens) == len("héllo world\n".encode()) * 50
    batches = TokenBatches(tokens, batch=3, seq_len=16, seed=5)
    assert batches.batch_at(7).shape == (3, 16)
    assert torch.equal(batches.batch_at(7), TokenBatches(tokens, 3, 16, seed=5).batch_at(7))  # resumable
    assert not torch.equal(batches.batch_at(7), batches.batch_at(8))
    with pytest.raises(ValueError, match="too few for --seq-len 4096"):
        TokenBatches(tokens, batch=1, seq_len=4096)


# -------------------------------------------------------------------- --config with DeepSpeed "auto" (hardening item 8)
HF_AUTO_DS = {
    "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}, "offload_optimizer": {"device": "nvme"},
                          "stage3_param_persistence_threshold": "auto"},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
}


def test_deepspeed_auto_is_resolved_from_the_command_line(tmp_path):
    from engine.cli import build_parser, train

    ds = write(tmp_path / "ds.json", json.dumps(HF_AUTO_DS))
    parse = build_parser().parse_args
    cfg = train.build_config(parse(["train", "--config", ds, "--lr", "1e-4", "--dtype", "bf16", "--grad-accum", "2"]),
                             embedded=True)
    assert (cfg.optimizer.lr, cfg.dtype, cfg.gradient_accumulation_steps) == (1e-4, "bf16", 2)
    # Without options: this command's own defaults (those of a run without --config).
    cfg = train.build_config(parse(["train", "--config", ds]), embedded=True)
    plain = train.build_config(parse(["train"]), embedded=True)
    assert (cfg.optimizer.lr, cfg.gradient_clipping, cfg.resident_threshold_bytes) == \
           (plain.optimizer.lr, plain.gradient_clipping, plain.resident_threshold_bytes)
    assert (cfg.dtype, cfg.gradient_accumulation_steps) == ("fp32", 1)  # fp16/bf16 "auto": not bf16 unasked
    assert cfg.optimizer.betas == plain.optimizer.betas and cfg.optimizer.eps == plain.optimizer.eps


def test_deepspeed_auto_without_a_meaning_and_bad_values_are_one_line_errors(tmp_path, capsys):
    unresolved = write(tmp_path / "a.json", json.dumps(dict(HF_AUTO_DS, zero_optimization={
        "stage": 3, "offload_param": {"device": "auto", "nvme_path": "auto"}})))
    string_bool = write(tmp_path / "b.json", json.dumps(dict(HF_AUTO_DS, bf16={"enabled": "false"})))
    nan_lr = write(tmp_path / "c.json",
                   '{"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": NaN}}}')
    cases = [(unresolved, "zero_optimization.offload_param.device, zero_optimization.offload_param.nvme_path"),
             (string_bool, "bf16.enabled must be true or false"),
             (nan_lr, "optimizer.params.lr")]
    for path, message in cases:
        assert main(["train", "--config", path, "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (path, err)
