"""Checkpoints: exact resume in a new process, crash safety, HF safetensors in and out, bad input."""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import child_env
from safetensors.torch import load_file, save_file

import engine
from engine.checkpoint import CheckpointError
from engine.checkpoint.atomic import CheckpointRoot
from engine.checkpoint.format import read_header

ENV = child_env()

# Shared by the test process and its children (exec'd here, run with ``python -c`` there).
HELPERS = r'''
import json, os, random, sys
import numpy as np
import torch
import engine

def llama(seed, dropout=0.1, tied=False, inter=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=dropout, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).float()

class Net(torch.nn.Module):
    """A plain two-layer model (no transformers import: the crash children start fast)."""
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 256)
        self.b = torch.nn.Linear(256, 64)
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

def make_config(nvme, dtype="fp32", **kw):
    base = dict(nvme_path=nvme, dtype=dtype, optimizer=engine.AdamWConfig(lr=1e-3, weight_decay=0.1),
                gradient_accumulation_steps=2, gradient_clipping=1.0, resident_threshold_bytes=4096)
    base.update(kw)
    return engine.Config(**base)

DATA = torch.randint(0, 256, (16, 2, 16), generator=torch.Generator().manual_seed(3))

def seed_all(s):
    torch.manual_seed(s); np.random.seed(s); random.seed(s)

def make_sched(trainer):
    return torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=2, gamma=0.5)

def train(trainer, sched, steps, losses):
    for _ in range(steps):
        for _ in range(trainer.gradient_accumulation_steps):
            x = DATA[int(np.random.randint(0, len(DATA)))]  # data order: numpy's RNG
            if random.random() < 0.5:                      # python's RNG
                x = x.flip(1)
            out = trainer(input_ids=x, labels=x)           # dropout: torch's RNG
            trainer.backward(out.loss)
            trainer.step()
            losses.append(out.loss.item())
        sched.step()

def net_step(trainer, n=1):
    for _ in range(n * trainer.gradient_accumulation_steps):
        x = torch.randn(8, 64)
        trainer.backward(trainer(x).pow(2).mean())
        trainer.step()

def weights(trainer, model):
    return {n: trainer.parameter(n).clone().contiguous() for n, _ in model.named_parameters()}

def resume(ckpt, nvme, dtype, out):
    seed_all(999)           # other RNG states: the checkpoint must restore them
    model = llama(seed=42)  # other initial weights: the checkpoint must replace them
    with engine.initialize(model, make_config(nvme, dtype)) as trainer:
        sched = make_sched(trainer)
        path, client = trainer.load_checkpoint(ckpt, lr_scheduler=sched)
        losses = list(client["losses"])
        train(trainer, sched, 3, losses)
        from safetensors.torch import save_file
        save_file(weights(trainer, model), out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump(dict(losses=losses, lr=trainer.optimizer.param_groups[0]["lr"], steps=trainer.global_steps), f)

def crash(root, nvme, point, expected):
    """Saves step 1, then step 2 with the pause hook armed at ``point`` (or, for "loop", saves
    forever); writes each step's weights to ``expected``-<step> before saving it."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = Net()
    with engine.initialize(model, make_config(nvme, checkpoint_keep_last=1)) as trainer:
        step = 0
        while True:
            net_step(trainer)
            step += 1
            save_file(weights(trainer, model), f"{expected}-{step}.safetensors")
            if step == 2 and point != "loop":
                os.environ["MEMASCEND_CHECKPOINT_PAUSE_AT"] = point
            trainer.save_checkpoint(root, {"step": step}, max_shard_size="96KiB")
            if step == 1:
                print("READY", flush=True)
            if step == 2 and point != "loop":
                print("FINISHED", flush=True)
                return

def small_llama(seed):
    """The odd-sized Llama of the hardening report: an 89x48 fp32 embedding is 17088 bytes, not a
    multiple of 4 KiB, and smaller than a store segment."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=89, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(cfg).float()

def small_config(nvme):
    return engine.Config(nvme_path=nvme, dtype="fp32", offload_params="nvme", offload_optimizer="nvme",
                         resident_threshold_bytes=0, optimizer=engine.AdamWConfig(lr=1e-3, weight_decay=0.1))

SMALL_DATA = torch.randint(0, 89, (4, 2, 12), generator=torch.Generator().manual_seed(5))

def small_steps(trainer, start, n, losses):
    for i in range(start, start + n):
        x = SMALL_DATA[i]
        out = trainer(input_ids=x, labels=x)
        trainer.backward(out.loss)
        trainer.step()
        losses.append(out.loss.item())

def small_resume(ckpt, nvme, out):
    model = small_llama(seed=9)  # other initial weights: the checkpoint must replace them
    with engine.initialize(model, small_config(nvme)) as trainer:
        _, client = trainer.load_checkpoint(ckpt)
        losses = list(client["losses"])
        small_steps(trainer, 2, 2, losses)
        from safetensors.torch import save_file
        save_file(weights(trainer, model), out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump(dict(losses=losses, steps=trainer.global_steps), f)

if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
'''


def helpers() -> dict:
    ns = {"__name__": "checkpoint_helpers"}
    exec(compile(HELPERS, "checkpoint_helpers", "exec"), ns)
    return ns


H = helpers()


def run_child(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", HELPERS, *args], capture_output=True, text=True, timeout=timeout,
                         env=ENV)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def trained_trainer(tmp_path, steps=2, dtype="fp32", model=None, **kw):
    H["seed_all"](0)
    model = model if model is not None else H["llama"](seed=0)
    trainer = engine.initialize(model, H["make_config"](str(tmp_path / "nvme"), dtype, **kw))
    sched = H["make_sched"](trainer)
    H["train"](trainer, sched, steps, [])
    return trainer, model


@pytest.fixture
def nvme(tmp_path):
    path = tmp_path / "nvme"
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("dtype,new_process", [("fp32", True), ("bf16", False)])
def test_resume_in_a_new_process_is_bit_identical(tmp_path, nvme, dtype, new_process):
    """6 steps straight == 3 steps, save, load in a new process, 3 more: losses and weights bit for bit
    (dropout, numpy/python data order and a StepLR schedule make every piece of state matter).
    bf16 (fp32 masters, bf16 weights) resumes in the same process to keep the suite fast."""
    H["seed_all"](0)
    model = H["llama"](seed=0)
    with engine.initialize(model, H["make_config"](str(nvme), dtype)) as trainer:
        sched = H["make_sched"](trainer)
        ref_losses: list[float] = []
        H["train"](trainer, sched, 6, ref_losses)
        ref = H["weights"](trainer, model)
        ref_lr = trainer.optimizer.param_groups[0]["lr"]

    H["seed_all"](0)
    model = H["llama"](seed=0)
    ckpt = tmp_path / "ckpt"
    with engine.initialize(model, H["make_config"](str(nvme), dtype)) as trainer:
        sched = H["make_sched"](trainer)
        losses: list[float] = []
        H["train"](trainer, sched, 3, losses)
        assert losses == ref_losses[:6]
        trainer.save_checkpoint(str(ckpt), {"losses": losses}, lr_scheduler=sched, max_shard_size="100KiB")
    assert len([f for f in os.listdir(ckpt / "step-00000003") if f.endswith(".safetensors")]) > 1  # sharded

    out = str(tmp_path / "resumed")
    if new_process:
        run_child("resume", str(ckpt), str(nvme), dtype, out)
    else:
        H["resume"](str(ckpt), str(nvme), dtype, out)
    with open(out + ".json") as f:
        resumed = json.load(f)
    assert resumed["losses"] == ref_losses  # exact float equality, all 12 micro-batches
    assert resumed["steps"] == 6 and resumed["lr"] == ref_lr
    got = load_file(out + ".safetensors")
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        assert torch.equal(got[name], value), name


def test_odd_sized_model_resumes_in_a_new_process(tmp_path, nvme):
    """Hardening item 2: an 89x48 fp32 embedding (17088 bytes, smaller than a store segment, not a
    multiple of 4 KiB) used to get a 20480-byte staging block on load and fail "cannot hold a
    store segment". 4 steps straight == 2 steps, save, load in a new process, 2 more, bit for bit."""
    model = H["small_llama"](seed=0)
    ref_losses: list[float] = []
    with engine.initialize(model, H["small_config"](str(nvme))) as trainer:
        H["small_steps"](trainer, 0, 4, ref_losses)
        ref = H["weights"](trainer, model)
    model = H["small_llama"](seed=0)
    losses: list[float] = []
    with engine.initialize(model, H["small_config"](str(nvme))) as trainer:
        H["small_steps"](trainer, 0, 2, losses)
        trainer.save_checkpoint(str(tmp_path / "ckpt"), {"losses": losses})
    out = str(tmp_path / "resumed")
    run_child("small_resume", str(tmp_path / "ckpt"), str(nvme), out)
    with open(out + ".json") as f:
        resumed = json.load(f)
    assert resumed == dict(losses=ref_losses, steps=4)  # exact float equality
    got = load_file(out + ".safetensors")
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_file_round_trip_of_odd_shapes(tmp_path, dtype):
    """Store -> safetensors -> store for sizes around the segment and 4 KiB boundaries, through
    staging blocks sized the way save and load size them (for the largest tensor, as fp32)."""
    from engine.checkpoint.transfer import (
        Entry,
        StoreSource,
        StoreTarget,
        load_safetensors,
        staging_bytes_for,
        write_safetensors,
    )
    from engine.storage.staging import staging_blocks
    from engine.storage.store import TensorStore

    seg = 16384  # a 64 KiB stripe: multi-segment tensors stay small
    sizes = [(1,), (7, 3), (89, 48), (seg - 1,), (seg,), (seg + 1,), (1023, 5), (3 * seg + 17,), (2, seg + 3)]
    gen = torch.Generator().manual_seed(0)
    with TensorStore(str(tmp_path), stripe_size=4 * seg, grow_step="1MiB") as store:
        assert store.segment_elements == seg
        for shape in sizes:
            store.put(("src", shape), torch.randn(shape, generator=gen).to(dtype))
        # the largest tensor over one segment, under it (blocks smaller than a segment), just over 4 KiB
        for subset in (sizes, [(1,), (7, 3), (89, 48)], [(1023, 5), (89, 48), (1,)]):
            largest = max(math.prod(s) * 4 for s in subset)
            entries = [Entry(f"t{i}", dtype, s, StoreSource(("src", s))) for i, s in enumerate(subset)]
            file = str(tmp_path / f"f{len(subset)}-{largest}.safetensors")
            with staging_blocks(None, staging_bytes_for(store, largest)) as blocks:
                result = write_safetensors(file, entries, store, blocks)
                for shape in subset:
                    store.allocate(("dst", shape), shape, dtype)
                load_safetensors(read_header(file), {e.name: [StoreTarget(("dst", e.shape))] for e in entries},
                                 store, blocks, result["tensors"], result["crc32c"])
            for shape in subset:
                assert torch.equal(store.get(("dst", shape)), store.get(("src", shape))), shape
                store.free(("dst", shape))


def test_resume_with_trainable_state_in_memory(tmp_path, nvme):
    """The in-DRAM trainable placement (masters and CPUAdamW moments in memory) resumes exactly too."""
    def partial(model):  # PEFT-like: only the attention outputs and norms train, the frozen rest streams
        for name, p in model.named_parameters():
            p.requires_grad_("o_proj" in name or "norm" in name)
        return model

    kw = dict(trainable_placement="memory", dtype="bf16")
    H["seed_all"](0)
    model = partial(H["llama"](seed=0))
    cfg = H["make_config"](str(nvme), **kw)
    with engine.initialize(model, cfg) as trainer:
        sched = H["make_sched"](trainer)
        ref_losses: list[float] = []
        H["train"](trainer, sched, 4, ref_losses)
        ref = {n: trainer.weight(n).clone() for n, _ in model.named_parameters()}  # masters of the trainable ones
    H["seed_all"](0)
    model = partial(H["llama"](seed=0))
    with engine.initialize(model, cfg) as trainer:
        sched = H["make_sched"](trainer)
        H["train"](trainer, sched, 2, [])
        trainer.save_checkpoint(str(tmp_path / "ckpt"), lr_scheduler=sched)
    H["seed_all"](5)
    model = partial(H["llama"](seed=7))
    with engine.initialize(model, cfg) as trainer:
        sched = H["make_sched"](trainer)
        trainer.load_checkpoint(str(tmp_path / "ckpt"), lr_scheduler=sched)
        losses: list[float] = []
        H["train"](trainer, sched, 2, losses)
        assert losses == ref_losses[4:]
        for name, value in ref.items():
            assert torch.equal(trainer.weight(name), value), name


# ---------------------------------------------------------------------------------------------- crash safety
# point -> the step `latest` must name after a SIGKILL there
CRASH_POINTS = {"file-data": 1, "shard-written": 1, "manifest-written": 1, "before-latest": 1, "after-latest": 2,
                "retention": 2}


def _reap(proc: subprocess.Popen, watchdog) -> None:
    """Stops a test's child process (and its hang watchdog) whatever the test's outcome."""
    watchdog.cancel()
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def _crash_run(base, point: str, delay) -> None:
    """Starts a ``crash`` child, waits for READY (step 1 saved) and for it to pause at ``point``
    (or sleeps ``delay`` seconds while it saves in a loop), then SIGKILLs it."""
    (base / "nvme").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", HELPERS, "crash", str(base / "ckpt"), str(base / "nvme"),
                             "loop" if delay is not None else point, str(base / "expected")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        lines = [proc.stdout.readline().strip()]
        if lines[0] == "READY":
            if delay is None:
                lines.append(proc.stdout.readline().strip())
            else:
                time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        expected = ["READY"] + ([f"PAUSED {point}"] if delay is None else [])
        assert lines == expected, (point, lines, proc.stderr.read()[-3000:])
    finally:
        _reap(proc, watchdog)


def test_sigkill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """Children are SIGKILLed at each pause point of a save (and at seeded random moments of a save
    loop); `latest` always names a complete checkpoint with the right weights, and the next save
    removes the killed one's leftovers."""
    rng = random.Random(7)
    runs = {point: None for point in CRASH_POINTS}
    runs["random-kill"] = rng.uniform(0.1, 0.8)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # two cores
        for future in [pool.submit(_crash_run, tmp_path / name, name, delay) for name, delay in runs.items()]:
            future.result()

    for name in runs:
        base = tmp_path / name
        root = base / "ckpt"
        torch.manual_seed(1)
        model = H["Net"]()
        with engine.initialize(model, H["make_config"](str(tmp_path / name / "nvme"), checkpoint_keep_last=1)) as tr:
            leftovers = [e for e in os.listdir(root) if e.startswith(".")]
            if name in ("file-data", "shard-written", "manifest-written", "retention"):
                assert leftovers, name  # a partial save (or half-deleted old one) is there...
            _, client = tr.load_checkpoint(str(root))  # ...and ignored
            step = client["step"]
            if name in CRASH_POINTS:
                assert step == CRASH_POINTS[name], (name, step)
            assert tr.global_steps == step
            expected = load_file(str(base / f"expected-{step}.safetensors"))
            for pname, value in expected.items():
                assert torch.equal(tr.parameter(pname), value), (name, pname)
            tr.save_checkpoint(str(root), {"step": step}, tag="after-crash")
        # the killed save's leftovers are gone; keep_last=1 leaves only the new one
        assert sorted(os.listdir(root)) == ["after-crash", "latest"], (name, os.listdir(root))


def test_layout_permissions_retention_and_refusals(tmp_path, nvme):
    trainer, model = trained_trainer(tmp_path, steps=1)
    root = tmp_path / "ckpt"
    with trainer:
        for _ in range(3):
            H["train"](trainer, H["make_sched"](trainer), 1, [])
            trainer.save_checkpoint(str(root), {"note": "x"}, keep_last=2)
        assert sorted(os.listdir(root)) == ["latest", "step-00000003", "step-00000004"]
        assert (root / "latest").read_text() == "step-00000004\n"
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        for d in ("step-00000003", "step-00000004"):
            assert stat.S_IMODE(os.stat(root / d).st_mode) == 0o700
            for f in os.listdir(root / d):
                assert stat.S_IMODE(os.stat(root / d / f).st_mode) == 0o600, f
        assert stat.S_IMODE(os.stat(root / "latest").st_mode) == 0o600
        # Saving the same tag again replaces it atomically.
        trainer.save_checkpoint(str(root), {"note": "again"}, tag="step-00000004")
        _, client = trainer.load_checkpoint(str(root))
        assert client == {"note": "again"}
        # Refused before anything is written: non-JSON client state, a save inside an accumulation window.
        with pytest.raises(CheckpointError, match="client_state"):
            trainer.save_checkpoint(str(root), {"t": torch.zeros(1)})
        with pytest.raises(CheckpointError, match="tuples become lists"):
            trainer.save_checkpoint(str(root), {"pos": (1, 2)})
        x = H["DATA"][0]
        trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()
        with pytest.raises(CheckpointError, match="accumulation boundary"):
            trainer.save_checkpoint(str(root))
        assert sorted(os.listdir(root)) == ["latest", "step-00000003", "step-00000004"]
    # Only JSON and safetensors in a checkpoint: nothing is unpickled on load.
    for f in os.listdir(root / "step-00000004"):
        assert f == "manifest.json" or f.endswith(".safetensors")


def test_fp16_loss_scaler_and_counters_come_back(tmp_path, nvme):
    """An fp16 run with a skipped (overflow) step: scale, hysteresis, counters and the last
    gradient norm are restored; tags and checkpoint directories can be loaded directly."""
    H["seed_all"](0)
    model = H["llama"](seed=0)
    cfg = H["make_config"](str(nvme), "fp16", hysteresis=1, initial_scale_power=8)
    x = H["DATA"][0]
    with engine.initialize(model, cfg) as trainer:
        for scale_loss in (1.0, 1.0, float("inf"), float("inf"), 1.0, 1.0):
            trainer.backward(trainer(input_ids=x, labels=x).loss * scale_loss)
            trainer.step()
        assert trainer.skipped_steps == 1 and trainer.loss_scale == 128.0
        first = trainer.save_checkpoint(str(tmp_path / "ckpt"))
        scaler, norm = trainer.scaler.state_dict(), trainer.last_grad_norm
        trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()
        trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()
        trainer.save_checkpoint(str(tmp_path / "ckpt"), tag="later")
    with engine.initialize(H["llama"](seed=1), cfg) as tr:
        for source, tag in ((str(tmp_path / "ckpt"), "step-00000002"), (first, None)):
            path, _ = tr.load_checkpoint(source, tag=tag)
            assert path == first
            assert tr.scaler.state_dict() == scaler and tr.last_grad_norm == norm
            assert (tr.micro_steps, tr.global_steps, tr.skipped_steps) == (6, 2, 1)
        tr.load_checkpoint(str(tmp_path / "ckpt"))
        assert tr.global_steps == 3


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def saved(tmp_path, nvme):
    """A checkpoint of a trained tiny Llama (two shards) and its directory."""
    trainer, model = trained_trainer(tmp_path)
    with trainer:
        path = trainer.save_checkpoint(str(tmp_path / "ckpt"), max_shard_size="150KiB")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) >= 2
    return path, files


def _fresh(tmp_path, **kw):
    model = H["llama"](seed=3, **{k: kw.pop(k) for k in ("inter",) if k in kw})
    return engine.initialize(model, H["make_config"](str(tmp_path / "nvme"), **kw))


def test_truncated_file_is_named_with_its_tensor(tmp_path, saved):
    path, files = saved
    victim = os.path.join(path, files[-1])
    header = read_header(victim)
    last = max(header.tensors.values(), key=lambda t: t.begin)
    with open(victim, "r+b") as f:
        f.truncate(header.file_size - 100)
    with _fresh(tmp_path) as tr, pytest.raises(CheckpointError) as err:
        tr.load_checkpoint(path)
    assert victim in str(err.value) and "truncated" in str(err.value) and last.name in str(err.value)


def test_corrupted_tensor_is_named_with_its_file(tmp_path, saved):
    path, files = saved
    victim = os.path.join(path, files[0])
    header = read_header(victim)
    target = next(t for t in header.tensors.values() if t.name.startswith("exp_avg/"))
    with open(victim, "r+b") as f:
        f.seek(header.offset(target) + target.nbytes // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with _fresh(tmp_path) as tr:
        with pytest.raises(CheckpointError) as err:
            tr.load_checkpoint(path)
        assert victim in str(err.value) and repr(target.name) in str(err.value) and "corrupt" in str(err.value)
        # The state is half-loaded now: saving it over good checkpoints is refused.
        with pytest.raises(CheckpointError, match="failed part-way"):
            tr.save_checkpoint(str(tmp_path / "other"))


def test_shape_mismatches_are_all_listed(tmp_path, saved):
    path, _ = saved
    with _fresh(tmp_path, inter=96) as tr, pytest.raises(CheckpointError) as err:
        tr.load_checkpoint(path)
    message = str(err.value)
    assert "shape mismatch" in message
    for layer in (0, 1):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for kind in ("param", "exp_avg", "exp_avg_sq"):
                assert f"{kind}/model.layers.{layer}.mlp.{proj}.weight" in message


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_manifest_paths_outside_the_checkpoint_are_refused(tmp_path, saved, name):
    path, files = saved
    outside = tmp_path / "outside.safetensors"
    os.replace(os.path.join(path, files[0]), outside)
    if name == "link.safetensors":
        os.symlink(outside, os.path.join(path, name))
    manifest_file = os.path.join(path, "manifest.json")
    with open(manifest_file) as f:
        manifest = json.load(f)
    manifest["files"][name] = manifest["files"].pop(files[0])
    for entry in manifest["tensors"].values():
        if entry["file"] == files[0]:
            entry["file"] = name
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    with _fresh(tmp_path) as tr, pytest.raises(CheckpointError, match="refusing") as err:
        tr.load_checkpoint(path)
    assert name in str(err.value)


def test_latest_pointing_outside_is_refused(tmp_path, saved):
    path, _ = saved
    root = os.path.dirname(path)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("../elsewhere\n")
    with _fresh(tmp_path) as tr, pytest.raises(CheckpointError, match="refusing"):
        tr.load_checkpoint(root)


def test_other_dtype_is_refused_or_converted_explicitly(tmp_path, nvme):
    trainer, model = trained_trainer(tmp_path, dtype="bf16")
    with trainer:
        path = trainer.save_checkpoint(str(tmp_path / "ckpt"))
        masters = H["weights"](trainer, model)
        moments = {n: trainer.runtime.store.get(("exp_avg", n)).clone() for n in masters}
    with _fresh(tmp_path) as tr:
        with pytest.raises(CheckpointError, match="dtype='bf16'.*convert_dtype=True"):
            tr.load_checkpoint(path)
        tr.load_checkpoint(path, convert_dtype=True)
        for name, value in masters.items():  # fp32 weights = the saved fp32 masters, exactly
            assert torch.equal(tr.parameter(name), value), name
            assert torch.equal(tr.runtime.store.get(("exp_avg", name)), moments[name]), name
        assert tr.global_steps == 2
        H["train"](tr, H["make_sched"](tr), 1, [])  # and it trains on


# ---------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("tied", [False, True])
def test_export_then_from_pretrained_gives_identical_logits(tmp_path, nvme, tied):
    from transformers import AutoModelForCausalLM

    model = H["llama"](seed=0, tied=tied, dropout=0.0)
    trainer, model = trained_trainer(tmp_path, model=model)
    x = H["DATA"][0]
    out = tmp_path / "export"
    with trainer:
        files = trainer.save_pretrained(str(out), max_shard_size="60KB")
        trainer.eval()
        with torch.no_grad():
            ref = trainer(input_ids=x).logits
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and str(out / "config.json") in files
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)  # a tied weight is written once, as HF does
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.equal(hf(input_ids=x).logits, ref)
    with engine.from_pretrained(str(out), H["make_config"](str(nvme))) as tr:
        tr.eval()
        with torch.no_grad():
            assert torch.equal(tr(input_ids=x).logits, ref)


def test_export_of_a_bf16_run(tmp_path, nvme):
    """bf16 training exports its bf16 weights by default and its fp32 masters with dtype=float32."""
    trainer, model = trained_trainer(tmp_path, dtype="bf16")
    with trainer:
        trainer.save_pretrained(str(tmp_path / "bf16"))
        trainer.save_pretrained(str(tmp_path / "fp32"), dtype=torch.float32)
        low = load_file(str(tmp_path / "bf16" / "model.safetensors"))
        high = load_file(str(tmp_path / "fp32" / "model.safetensors"))
        for name, _ in model.named_parameters():
            assert torch.equal(high[name], trainer.parameter(name)), name
            weight = trainer.runtime.store.get(("param", name)).view(low[name].shape)  # the bf16 compute weights
            assert low[name].dtype == torch.bfloat16 and torch.equal(low[name], weight), name
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_from_pretrained_reads_a_checkpoint_written_by_transformers(tmp_path, nvme):
    model = H["llama"](seed=0, dropout=0.0).eval()
    model.save_pretrained(str(tmp_path / "hf"), max_shard_size="50KB")
    x = H["DATA"][1]
    with torch.no_grad():
        ref = model(input_ids=x).logits
    with engine.from_pretrained(str(tmp_path / "hf"), H["make_config"](str(nvme))) as tr:
        tr.eval()
        with torch.no_grad():
            assert torch.equal(tr(input_ids=x).logits, ref)
    # bf16 training from an fp32 checkpoint: fp32 masters are the checkpoint's values exactly
    with engine.from_pretrained(str(tmp_path / "hf"), H["make_config"](str(nvme), "bf16")) as tr:
        for name, p in model.named_parameters():
            assert torch.equal(tr.parameter(name), p.detach()), name


def test_from_pretrained_bad_checkpoints(tmp_path, nvme):
    from transformers import LlamaConfig

    model = H["llama"](seed=0, dropout=0.0)
    good = tmp_path / "hf"
    model.save_pretrained(str(good), max_shard_size="50KB")
    cfg = H["make_config"](str(nvme))
    # shapes that do not match the config: all listed, nothing written
    other = LlamaConfig.from_pretrained(str(good))
    other.intermediate_size = 96
    with pytest.raises(CheckpointError) as err:
        engine.from_pretrained(str(good), cfg, hf_config=other)
    for layer in (0, 1):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{layer}.mlp.{proj}.weight" in str(err.value)
    assert os.listdir(nvme) == []
    # a truncated shard: the file and the tensor cut off are named
    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    index = json.loads((cut / "model.safetensors.index.json").read_text())
    victim = str(cut / sorted(set(index["weight_map"].values()))[-1])
    header = read_header(victim)
    last = max(header.tensors.values(), key=lambda t: t.begin)
    with open(victim, "r+b") as f:
        f.truncate(header.file_size - 8)
    with pytest.raises(CheckpointError) as err:
        engine.from_pretrained(str(cut), cfg)
    assert victim in str(err.value) and last.name in str(err.value)
    # a parameter missing from the checkpoint
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    state = {n: p.detach().clone() for n, p in model.named_parameters() if n != "model.norm.weight"}
    save_file(state, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(good / "config.json", lacking / "config.json")
    with pytest.raises(CheckpointError, match=r"1 parameter\(s\) missing: model\.norm\.weight"):
        engine.from_pretrained(str(lacking), cfg)
    # pickles are not loaded
    bad = tmp_path / "pickle"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        engine.from_pretrained(str(bad), cfg, hf_config=other)
    assert os.listdir(nvme) == []


DRAM_CHILD = r'''
import json, sys
import torch, engine
from engine.procinfo import process_memory, reset_peak_rss

path, nvme = sys.argv[1:3]
from transformers import AutoConfig, AutoModelForCausalLM
with torch.device("meta"):  # import everything transformers loads lazily before measuring
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
reset_peak_rss()  # VmHWM := the current RSS
base = process_memory().rss
trainer = engine.from_pretrained(path, engine.Config(nvme_path=nvme, sub_group_size=1 << 20,
                                                     resident_threshold_bytes=64 << 10))
peak = process_memory().peak_rss - base
pool = trainer.runtime.pool.stats()["capacity"]
from safetensors import safe_open
index = json.load(open(path + "/model.safetensors.index.json"))["weight_map"]
checked = 0
for name in ("model.embed_tokens.weight", "model.layers.5.mlp.down_proj.weight", "lm_head.weight"):
    with safe_open(path + "/" + index[name], "pt") as f:
        assert torch.equal(trainer.parameter(name), f.get_tensor(name)), name
        checked += 1
trainer.close()
print(json.dumps(dict(peak=peak, pool=pool, checked=checked)))
'''


def test_import_of_a_checkpoint_larger_than_the_dram_budget(tmp_path, nvme):
    """A 32-layer model (~460 MB of fp32 safetensors in 20 MB shards) imports with peak RSS growth
    under a budget of the pinned pool (fixed by the planner: optimizer pipeline, staging) + 4 x the
    largest tensor + 24 MiB, which is smaller than the checkpoint: nothing scales with the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=32,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    # Written tensor by tensor (random values) in HF's sharded layout: the test process never holds it all.
    names = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]
    g = torch.Generator().manual_seed(0)
    out = tmp_path / "big"
    out.mkdir()
    shards, current, size = [], {}, 0
    for name, shape in names:
        current[name] = torch.randn(shape, generator=g) * 0.02
        size += current[name].numel() * 4
        if size >= 20 << 20:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        total += sum(t.numel() * 4 for t in shard.values())
    del shards, current
    (out / "model.safetensors.index.json").write_text(json.dumps(dict(metadata=dict(total_size=total),
                                                                      weight_map=weight_map)))
    cfg.save_pretrained(str(out))
    largest = max(torch.Size(s).numel() * 4 for _, s in names)

    # glibc raises its mmap threshold as large blocks are freed and then keeps freed tensors in its
    # heap, a cache whose size varies from run to run (15 to 148 MB above the pool seen here); a fixed
    # threshold returns freed tensors to the system, so VmHWM measures what the engine holds.
    env = dict(ENV, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    result = subprocess.run([sys.executable, "-c", DRAM_CHILD, str(out), str(nvme)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    budget = stats["pool"] + 4 * largest + (24 << 20)
    assert stats["checked"] == 3
    assert total > 1.3 * budget, (total, budget)  # the budget really is smaller than the checkpoint
    assert stats["peak"] < budget, (stats["peak"] / 2**20, budget / 2**20, total / 2**20)


# ---------------------------------------------------------------------------------------------- hostile files
def _without_hanging(fn, fifos, timeout=60):
    """Runs ``fn`` in a thread; if it is still running after ``timeout`` s (blocked opening a FIFO),
    opens the FIFOs for writing to release it and fails the test instead of hanging the suite."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader sees EOF
            except OSError:
                pass
        thread.join(30)
        pytest.fail(f"blocked for {timeout}s on a FIFO")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _fifo_instead_of(path) -> str:
    path = str(path)
    os.unlink(path)
    os.mkfifo(path, 0o600)
    return path


def test_fifo_shard_or_latest_is_refused_not_waited_on(tmp_path, saved):
    path, files = saved
    root = os.path.dirname(path)
    shard = os.path.join(path, files[0])
    keep = tmp_path / "shard-copy"
    shutil.copy(shard, keep)
    with _fresh(tmp_path) as tr:
        fifo = _fifo_instead_of(shard)
        with pytest.raises(CheckpointError, match="not a regular file") as err:
            _without_hanging(lambda: tr.load_checkpoint(path), [fifo])
        assert fifo in str(err.value)
        os.unlink(fifo)
        shutil.copy(keep, shard)
        fifo = _fifo_instead_of(os.path.join(root, "latest"))
        with pytest.raises(CheckpointError, match="not a regular file") as err:
            _without_hanging(lambda: tr.load_checkpoint(root), [fifo])
        assert "latest" in str(err.value)
        assert tr.global_steps == 0 and not tr.runtime.poisoned  # nothing was loaded


def test_from_pretrained_refuses_fifos(tmp_path, nvme):
    model = H["llama"](seed=0, dropout=0.0)
    good = tmp_path / "hf"
    model.save_pretrained(str(good), max_shard_size="50KB")
    shard = sorted(set(json.loads((good / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]
    cfg = H["make_config"](str(nvme))
    for victim in ("model.safetensors.index.json", shard, "config.json"):
        case = tmp_path / f"case-{victim}"
        shutil.copytree(good, case)
        fifo = _fifo_instead_of(case / victim)
        with pytest.raises(CheckpointError, match="not a regular file") as err:
            _without_hanging(lambda case=case: engine.from_pretrained(str(case), cfg), [fifo])
        assert fifo in str(err.value), victim
    assert os.listdir(nvme) == []


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_refused(tmp_path, saved):
    path, files = saved
    manifest_file = os.path.join(path, "manifest.json")
    text = open(manifest_file).read()
    with open(manifest_file, "w") as f:
        f.write(text.replace('"client_state": {}', f'"client_state": {_deep(100_000)}'))
    with _fresh(tmp_path) as tr:
        with pytest.raises(CheckpointError, match="nested") as err:
            tr.load_checkpoint(path)
        assert manifest_file in str(err.value)
        # Saving what could not be loaded back is refused too.
        nested: list = []
        for _ in range(200):
            nested = [nested]
        with pytest.raises(CheckpointError, match="nested"):
            tr.save_checkpoint(str(tmp_path / "other"), {"deep": nested})
    # A safetensors header, in a checkpoint or in from_pretrained.
    bad = tmp_path / "deep.safetensors"
    header = ('{"a":' + _deep(100_000) + "}").encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match="safetensors header is nested more than 100 levels") as err:
        read_header(str(bad))  # parse_json's refusal, as for every other JSON the engine reads
    assert str(bad) in str(err.value)
    model_dir = tmp_path / "deep-index"
    H["llama"](seed=0, dropout=0.0).save_pretrained(str(model_dir), max_shard_size="50KB")
    (model_dir / "model.safetensors.index.json").write_text('{"weight_map": ' + _deep(100_000) + "}")
    with pytest.raises(CheckpointError, match="nested"):
        engine.from_pretrained(str(model_dir), H["make_config"](str(tmp_path / "nvme")))


def _edit(manifest: dict, how: str, files: list[str], sched_state: dict) -> str:
    """Applies one hostile edit; returns the field the error must name."""
    t = manifest["trainer"]
    if how == "huge-steps":
        t["global_steps"] = 10 ** 30
        return "trainer.global_steps"
    if how == "negative-steps":
        t["global_steps"] = -1
        return "trainer.global_steps"
    if how == "nan-lr":
        t["param_groups"][0]["lr"] = float("nan")
        return "trainer.param_groups[0].lr"
    if how == "string-lr":
        t["param_groups"][0]["lr"] = "fast"
        return "trainer.param_groups[0].lr"
    if how == "bool-lr":
        t["param_groups"][0]["lr"] = True
        return "trainer.param_groups[0].lr"
    if how == "beta-one":
        t["param_groups"][0]["betas"] = [0.9, 1.0]
        return "trainer.param_groups[0].betas[1]"
    if how == "injected-params":
        t["param_groups"][0]["params"] = [0, 1]
        return "trainer.param_groups[0].params"
    if how == "unknown-group-key":
        t["param_groups"][0]["foreach"] = True
        return "trainer.param_groups[0].foreach"
    if how == "scheduler-overwrites-optimizer":
        manifest["lr_scheduler"] = dict(sched_state, optimizer="not an optimizer")
        return "lr_scheduler"
    if how == "scheduler-string-epoch":
        manifest["lr_scheduler"] = dict(sched_state, last_epoch="soon")
        return "lr_scheduler.last_epoch"
    if how == "no-file-crc":
        del manifest["files"][files[0]]["crc32c"]
        return f"files.{files[0]}"
    if how == "no-tensor-crc":
        name = next(iter(manifest["tensors"]))
        del manifest["tensors"][name]["crc32c"]
        return f"tensors.{name}"
    if how == "no-counter":
        del t["micro_steps"]
        return "trainer"
    if how == "nan-grad-norm":
        t["last_grad_norm"] = float("nan")
        return "trainer.last_grad_norm"
    if how == "bad-rng":
        manifest["rng"]["python"][1] = [1, 2, 3]
        return "rng.python"
    if how == "scheduler-float-epoch":  # an int field: a float would break the scheduler's counting
        manifest["lr_scheduler"] = dict(sched_state, last_epoch=1.5)
        return "lr_scheduler.last_epoch"
    if how == "scheduler-infinite-lr":
        manifest["lr_scheduler"] = dict(sched_state, base_lrs=[float("inf")] * len(sched_state["base_lrs"]))
        return "lr_scheduler.base_lrs[0]"
    if how == "string-gauss":  # random.setstate keeps it: random.gauss() would return the string
        manifest["rng"]["python"][2] = "not a number"
        return "rng.python"
    if how == "numpy-pos-out-of-bounds":  # numpy accepts it, and a later draw reads out of bounds
        manifest["rng"]["numpy"][2] = 10 ** 6
        return "rng.numpy[2]"
    if how == "numpy-float-key":  # numpy would truncate it
        manifest["rng"]["numpy"][1][5] = 1.5
        return "rng.numpy[1][5]"
    if how == "unknown-top-key":
        manifest["extra"] = 1
        return "(top level)"
    raise AssertionError(how)


HOSTILE_EDITS = ["huge-steps", "negative-steps", "nan-lr", "string-lr", "bool-lr", "beta-one", "injected-params",
                 "unknown-group-key", "scheduler-overwrites-optimizer", "scheduler-string-epoch", "no-file-crc",
                 "no-tensor-crc", "no-counter", "nan-grad-norm", "bad-rng", "unknown-top-key", "scheduler-float-epoch",
                 "scheduler-infinite-lr", "string-gauss", "numpy-pos-out-of-bounds", "numpy-float-key"]


def test_hostile_manifest_fields_are_refused_before_the_trainer_is_touched(tmp_path, saved):
    path, files = saved
    manifest_file = os.path.join(path, "manifest.json")
    original = open(manifest_file).read()
    with _fresh(tmp_path) as tr:
        sched = H["make_sched"](tr)
        sched_state = json.loads(json.dumps(sched.state_dict()))
        name = "model.layers.0.mlp.down_proj.weight"
        before = tr.parameter(name).clone()
        lr, optimizer, rng = tr.optimizer.param_groups[0]["lr"], sched.optimizer, torch.get_rng_state()
        for how in HOSTILE_EDITS:
            manifest = json.loads(original)
            manifest["lr_scheduler"] = sched_state  # (saved without one) a valid base to edit
            field = _edit(manifest, how, files, sched_state)
            with open(manifest_file, "w") as f:
                json.dump(manifest, f)
            with pytest.raises(CheckpointError) as err:
                tr.load_checkpoint(path, lr_scheduler=sched)
            assert manifest_file in str(err.value) and repr(field) in str(err.value), (how, str(err.value))
            # untouched: no tensor streamed, no counter, group, scheduler or RNG state written
            assert not tr.runtime.poisoned, how
            assert tr.global_steps == 0 and tr.micro_steps == 0, how
            assert torch.equal(tr.parameter(name), before), how
            assert tr.optimizer.param_groups[0]["lr"] == lr and "params" in tr.optimizer.param_groups[0], how
            assert sched.optimizer is optimizer and torch.equal(torch.get_rng_state(), rng), how
        manifest = json.loads(original)
        manifest["lr_scheduler"] = sched_state
        with open(manifest_file, "w") as f:
            json.dump(manifest, f)
        tr.load_checkpoint(path, lr_scheduler=sched)  # the unedited checkpoint still loads
        assert tr.global_steps == 2


def test_a_shard_tensor_the_manifest_does_not_list_is_named(tmp_path, saved):
    path, files = saved
    manifest_file = os.path.join(path, "manifest.json")
    manifest = json.loads(open(manifest_file).read())
    name = next(n for n, e in manifest["tensors"].items() if e["file"] == files[0])
    del manifest["tensors"][name]
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    with _fresh(tmp_path) as tr, pytest.raises(CheckpointError, match="does not list") as err:
        tr.load_checkpoint(path)
    assert name in str(err.value) and files[0] in str(err.value)
    assert not tr.runtime.poisoned


# ---------------------------------------------------------------------------------------------- one saver; ENOSPC
def test_a_second_saver_to_the_same_directory_is_refused(tmp_path, nvme):
    """A child pauses mid-save (holding the directory's save lock); a save to the same directory
    from this process fails at once naming the child's pid instead of racing its retention."""
    base = tmp_path / "child"
    (base / "nvme").mkdir(parents=True)
    root = base / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", HELPERS, "crash", str(root), str(base / "nvme"), "manifest-written",
                             str(base / "expected")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        lines = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
        assert lines == ["READY", "PAUSED manifest-written"], (lines, proc.stderr.read()[-3000:])
        torch.manual_seed(1)
        model = H["Net"]()
        with engine.initialize(model, H["make_config"](str(tmp_path / "nvme"), checkpoint_keep_last=1)) as tr:
            H["net_step"](tr)
            with pytest.raises(CheckpointError, match="another save") as err:
                tr.save_checkpoint(str(root), {"step": "other"})
            assert str(root) in str(err.value) and f"pid {proc.pid}" in str(err.value)
            assert (root / "latest").read_text() == "step-00000001\n"  # the child's checkpoint is untouched
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            # A killed holder releases the lock: the next save goes through and cleans up after it.
            tr.save_checkpoint(str(root), {"step": "other"}, tag="after")
        assert sorted(os.listdir(root)) == ["after", "latest"]
    finally:
        _reap(proc, watchdog)


def test_two_savers_in_one_process_conflict_too(tmp_path, nvme):
    from engine.checkpoint.atomic import CheckpointRoot

    root = CheckpointRoot(str(tmp_path / "ckpt"))
    with root.saving():
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
            with CheckpointRoot(str(tmp_path / "ckpt")).saving():
                pass
    assert os.listdir(tmp_path / "ckpt") == []  # the lock file goes with the save
    with root.saving():  # and can be taken again
        pass


def _fd_path(fd: int) -> str:
    """What ``fd`` names; "" when it is gone (closed meanwhile by another thread: not the target)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _enospc_on(monkeypatch, part: str) -> None:
    """``os.write`` to a file whose path contains ``part`` fails with ENOSPC, as on a full disk
    (other writes go through)."""
    import errno as errno_mod

    real = os.write

    def write(fd, data):
        if part in _fd_path(fd):
            raise OSError(errno_mod.ENOSPC, os.strerror(errno_mod.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_enospc_on_the_manifest_names_it(tmp_path, nvme, monkeypatch):
    trainer, model = trained_trainer(tmp_path, steps=1)
    root = tmp_path / "ckpt"
    with trainer:
        trainer.save_checkpoint(str(root))
        H["train"](trainer, H["make_sched"](trainer), 1, [])
        _enospc_on(monkeypatch, "manifest.json")
        with pytest.raises(CheckpointError) as err:  # a CheckpointWriteError: also an OSError
            trainer.save_checkpoint(str(root))
        assert err.value.errno == 28 and "manifest.json" in str(err.value) and str(root) in str(err.value)
        assert isinstance(err.value, OSError) and err.value.filename.endswith("manifest.json")
    assert sorted(os.listdir(root)) == ["latest", "step-00000001"]  # the failed save left nothing


def test_enospc_on_latest_reports_the_committed_checkpoint(tmp_path, nvme, monkeypatch):
    trainer, model = trained_trainer(tmp_path, steps=1)
    root = tmp_path / "ckpt"
    with trainer:
        trainer.save_checkpoint(str(root))
        H["train"](trainer, H["make_sched"](trainer), 1, [])
        _enospc_on(monkeypatch, ".tmp-latest-")
        with pytest.raises(CheckpointError) as err:  # LatestNotUpdatedError
            trainer.save_checkpoint(str(root))
        message = str(err.value)
        assert "'step-00000002' was committed at" in message and str(root / "step-00000002") in message
        assert "'latest' still names 'step-00000001'" in message and err.value.errno == 28
        assert err.value.committed == str(root / "step-00000002")
        assert sorted(os.listdir(root)) == ["latest", "step-00000001", "step-00000002"]  # no .tmp-latest-* left
        assert (root / "latest").read_text() == "step-00000001\n"
        monkeypatch.undo()
        trainer.load_checkpoint(str(root), tag="step-00000002")  # what the message says is there, is
        assert trainer.global_steps == 2


def test_enospc_on_a_buffered_shard_names_it(tmp_path, monkeypatch):
    """Through the page cache (file systems without O_DIRECT) a full disk fails write(2), which
    names no file; the error does. (The O_DIRECT path's AsyncIOError names it already.)"""
    from engine.checkpoint.transfer import Entry, write_safetensors

    file = str(tmp_path / "shard.safetensors")
    _enospc_on(monkeypatch, "shard.safetensors")
    with pytest.raises(CheckpointError) as err:
        write_safetensors(file, [Entry("t", torch.float32, (4,), torch.ones(4))], None, [])
    assert err.value.errno == 28 and file in str(err.value) and err.value.filename == file


# ---------------------------------------------------------------------------------------- injected failures of `latest`
def _committed_once(root_dir) -> "CheckpointRoot":
    """A checkpoint root whose 'latest' names 'a' (a manifest-only checkpoint: commit() needs no more)."""
    from engine.checkpoint.atomic import CheckpointRoot, write_file

    root = CheckpointRoot(str(root_dir))
    tmp = root.begin("a")
    write_file(tmp, "manifest.json", b"{}")
    root.commit(tmp, "a")
    return root


def test_a_failed_root_fsync_after_latest_moved_says_latest_moved(tmp_path, monkeypatch):
    from engine.checkpoint import LatestNotDurableError, LatestNotUpdatedError
    from engine.checkpoint.atomic import write_file

    root = _committed_once(tmp_path / "ckpt")
    tmp = root.begin("b")
    write_file(tmp, "manifest.json", b"{}")
    real_rename, real_fsync, moved = os.rename, os.fsync, []

    def rename(src, dst, *a, **kw):
        real_rename(src, dst, *a, **kw)
        moved.append(os.path.basename(dst) == "latest")

    def fsync(fd):
        if any(moved):  # the root's fsync after 'latest' was replaced
            raise OSError(5, os.strerror(5))
        return real_fsync(fd)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(LatestNotDurableError) as err:
        root.commit(tmp, "b")
    monkeypatch.undo()
    message = str(err.value)
    assert not isinstance(err.value, LatestNotUpdatedError) and err.value.errno == 5
    assert "'latest' names it" in message and "power cut" in message and "still names" not in message, message
    assert err.value.committed == str(tmp_path / "ckpt" / "b") and root.latest() == "b"


def test_a_failed_cleanup_does_not_hide_the_rename_error_of_latest(tmp_path, monkeypatch, caplog):
    from engine.checkpoint import LatestNotUpdatedError
    from engine.checkpoint.atomic import write_file

    root = _committed_once(tmp_path / "ckpt")
    tmp = root.begin("b")
    write_file(tmp, "manifest.json", b"{}")
    real_rename, real_unlink = os.rename, os.unlink

    def rename(src, dst, *a, **kw):
        if os.path.basename(dst) == "latest":
            raise OSError(28, os.strerror(28))
        return real_rename(src, dst, *a, **kw)

    def unlink(path, *a, **kw):
        if ".tmp-latest-" in os.fspath(path):
            raise PermissionError(13, os.strerror(13), path)
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level("WARNING"), pytest.raises(LatestNotUpdatedError) as err:
        root.commit(tmp, "b")
    monkeypatch.undo()
    assert err.value.errno == 28 and "'latest' still names 'a'" in str(err.value), str(err.value)
    assert ".tmp-latest-" in caplog.text and "could not remove" in caplog.text  # logged, not raised
    assert root.latest() == "a"


def test_make_private_dir_creates_every_missing_parent_0700(tmp_path, monkeypatch):
    from engine.checkpoint.atomic import make_private_dir

    old = os.umask(0o022)
    try:
        existing = tmp_path / "mine"
        existing.mkdir(mode=0o755)
        make_private_dir(str(existing / "a" / "b" / "c"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755  # an existing directory keeps its mode
    for d in (existing / "a", existing / "a" / "b", existing / "a" / "b" / "c"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        make_private_dir(str(tmp_path / "file"))


def test_the_enospc_helper_lets_a_write_to_a_closed_fd_fail_as_it_would(tmp_path, monkeypatch):
    """A background thread's fd closed under the patched os.write: EBADF from the real write,
    not the helper's own readlink failure."""
    import errno as errno_mod

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    _enospc_on(monkeypatch, "manifest.json")
    with pytest.raises(OSError) as err:
        os.write(fd, b"x")
    assert err.value.errno == errno_mod.EBADF


def test_cuda_rng_states_are_checked_against_the_devices_before_anything_is_set(tmp_path, monkeypatch):
    """A CUDA state of the wrong size fails in parse_rng (before the load writes the trainer), not
    in set_rng_state_all at the end. (CPU-only CI: torch.cuda's device queries are faked.)"""
    from engine.checkpoint.manifest import parse_rng
    from engine.checkpoint.rng import rng_state

    saved = json.loads(json.dumps(rng_state()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: torch.zeros(16, dtype=torch.uint8))
    saved["cuda"] = ["00" * 16]
    assert parse_rng(saved, "m.json").cuda[0].numel() == 16
    saved["cuda"] = ["00" * 8]
    with pytest.raises(CheckpointError, match=r"m.json: field 'rng.cuda\[0\]' holds 8 bytes.*has 16"):
        parse_rng(saved, "m.json")
    assert parse_rng(saved, "m.json", check_cuda=False).cuda is not None  # the structural check alone
    saved["cuda"] = ["00" * 16, "00" * 16]  # saved on two devices, one here: not restored (logged)
    assert parse_rng(saved, "m.json").cuda is None
