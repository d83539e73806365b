"""The planner's GPU side: the device memory predicted from shapes (checked against figures
computed here from the model's configuration), prefetch depth chosen to fit a GPU budget, the
error that says by how much a plan does not fit, the card's free memory as the default budget,
and no change at all for the CPU device. No GPU needed: CUDA is faked where it is queried."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import engine
from engine.config import Config, ConfigError
from engine.devices import AUTO_ENV
from engine.offload.planner import PlanError, plan
from engine.units import format_bytes

V, H, INTER, L, HEADS = 250, 64, 128, 2, 4  # vocab 250: the embedding's bytes are no multiple of 512
BF16 = 2


def meta_llama() -> torch.nn.Module:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=L,
                                            num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                            tie_word_embeddings=False))


def cuda_config(**fields) -> Config:
    # Threshold 4 KiB: every matrix is streamed, the norms (128 bytes in bf16) stay resident.
    return Config(**{"device": "cuda", "dtype": "bf16", "resident_threshold_bytes": 4096, **fields})


def block(n: int) -> int:
    return -(-n // 512) * 512  # the CUDA caching allocator's rounding


def expected_window(depth: int) -> int:
    """The most bytes of depth + 1 consecutive streamed tensors (every Linear is its own unit), in bf16."""
    layer = [H * H] * 4 + [H * INTER] * 3  # q, k, v, o, gate, up, down
    sizes = [block(n * BF16) for n in [V * H] + layer * L + [V * H]]  # embed_tokens ... lm_head
    return max(sum(sizes[i:i + depth + 1]) for i in range(len(sizes)))


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_gpu_memory_predicted_from_shapes(depth, no_cuda):
    model = meta_llama()
    activations = 123_457
    p = plan(model, cuda_config(prefetch_depth=depth), activation_bytes=activations, gpu_memory="1GiB")
    norms = (2 * L + 1) * H * BF16
    buffers = 2 * (H // HEADS // 2) * 4  # rotary inv_freq and original_inv_freq, fp32 (buffers keep their dtype)
    assert p.gpu_resident_bytes == norms + buffers
    assert p.gpu_window_bytes == expected_window(depth)
    assert p.gpu_grad_bytes == V * H * (4 + BF16)  # the largest gradient (the embedding) in bf16 and fp32
    assert p.gpu_activation_bytes == activations
    assert p.gpu_peak_bytes == norms + buffers + expected_window(depth) + V * H * 6 + activations
    assert (p.gpu_budget_bytes, p.device, p.prefetch_depth, p.fits) == (1 << 30, "cuda", depth, True)
    # On CUDA the activations are on the GPU: host memory does not count them.
    without = plan(model, cuda_config(prefetch_depth=depth), gpu_memory="1GiB")
    assert without.predicted_peak_bytes - without.process_bytes == p.predicted_peak_bytes - p.process_bytes
    table = p.table()
    for row, value in (("predicted peak GPU memory", p.gpu_peak_bytes), ("GPU memory budget", 1 << 30),
                       ("GPU: streamed-weight window", expected_window(depth))):
        assert f"{row}" in table and format_bytes(value) in table.split(row)[1].splitlines()[0]


def test_cpu_plans_have_no_gpu_figures_and_are_unchanged(no_cuda):
    model = meta_llama()
    base = dict(dtype="bf16", resident_threshold_bytes=4096)
    auto, cpu = plan(model, Config(**base), activation_bytes=1000), plan(model, Config(device="cpu", **base),
                                                                        activation_bytes=1000)
    for p in (auto, cpu):
        assert (p.device, p.gpu_resident_bytes, p.gpu_window_bytes, p.gpu_grad_bytes, p.gpu_activation_bytes,
                p.gpu_peak_bytes, p.gpu_budget_bytes) == ("cpu", 0, 0, 0, 0, 0, None)
        assert "GPU" not in p.table() and "compute device" not in p.table()
    ignore = {"process_bytes", "predicted_peak_bytes"}  # RSS moves between the two calls
    assert {k: v for k, v in dataclasses.asdict(auto).items() if k not in ignore} == \
           {k: v for k, v in dataclasses.asdict(cpu).items() if k not in ignore}
    assert cpu.predicted_peak_bytes - cpu.process_bytes == cpu.pool_bytes + cpu.resident_bytes + 1000


def test_separate_device_gets_gpu_figures_and_keeps_activations_in_host_memory(no_cuda):
    model = meta_llama()
    p = plan(model, cuda_config(device="separate", prefetch_depth=1), activation_bytes=5000)
    assert (p.device, p.gpu_budget_bytes, p.gpu_window_bytes, p.gpu_activation_bytes) == \
           ("separate (cpu)", None, expected_window(1), 5000)
    assert p.predicted_peak_bytes - p.process_bytes == p.pool_bytes + p.resident_bytes + 5000  # compute on the CPU


def test_auto_depth_is_the_largest_that_fits_the_gpu(no_cuda):
    model = meta_llama()
    peaks = {d: plan(model, cuda_config(prefetch_depth=d), gpu_memory="1GiB").gpu_peak_bytes for d in (0, 1, 2)}
    assert peaks[0] < peaks[1] < peaks[2]
    for budget, depth in ((peaks[2], 2), (peaks[2] - 1, 1), (peaks[1], 1), (peaks[1] - 1, 0), (peaks[0], 0)):
        p = plan(model, cuda_config(), gpu_memory=budget)
        assert (p.prefetch_depth, p.gpu_peak_bytes, p.fits) == (depth, peaks[depth], True), budget


def test_a_gpu_budget_that_cannot_be_met_says_by_how_much(no_cuda):
    model = meta_llama()
    smallest = plan(model, cuda_config(prefetch_depth=0), gpu_memory="1GiB")
    budget = smallest.gpu_peak_bytes - 1000
    with pytest.raises(PlanError) as info:
        plan(model, cuda_config(), gpu_memory=budget)
    message = str(info.value)
    assert message.startswith(f"GPU memory {format_bytes(budget)} on cuda is too small: the smallest plan needs "
                              f"{format_bytes(smallest.gpu_peak_bytes)} (resident parameters and buffers "
                              f"{format_bytes(smallest.gpu_resident_bytes)}, streamed-weight window "
                              f"{format_bytes(expected_window(0))} at prefetch depth 0, gradient staging "
                              f"{format_bytes(V * H * 6)}), {format_bytes(1000)} more")
    assert "host_memory_budget" not in message
    # Not enforced: the smallest plan, marked as not fitting.
    shown = plan(model, cuda_config(), gpu_memory=budget, enforce_budgets=False)
    assert (shown.prefetch_depth, shown.gpu_fits, shown.host_fits, shown.fits) == (0, False, True, False)
    # A fixed depth that does not fit is not lowered.
    with pytest.raises(PlanError, match="at prefetch depth 2"):
        plan(model, cuda_config(prefetch_depth=2), gpu_memory=smallest.gpu_peak_bytes)


def test_host_and_gpu_both_short_are_both_named(no_cuda):
    with pytest.raises(PlanError) as info:
        plan(meta_llama(), cuda_config(host_memory_budget="1MiB"), gpu_memory=4096)
    host, gpu = str(info.value).split("; ")
    assert host.startswith("host_memory_budget 1.00 MiB is too small: the smallest plan needs") and "more" in host
    assert gpu.startswith("GPU memory 4.00 KiB on cuda is too small")


def test_the_default_gpu_budget_is_the_cards_free_memory(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)  # the suite pins "auto" to the CPU (conftest.py)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (3 << 30, 80 << 30))
    model = meta_llama()
    for device, expected in (("cuda:1", torch.device("cuda", 1)), ("cuda", torch.device("cuda", 0)),
                             ("auto", torch.device("cuda", 0))):
        p = plan(model, cuda_config(device=device))
        assert (p.device, p.gpu_budget_bytes, asked[-1]) == (str(expected), 3 << 30, expected)
    asked.clear()
    assert plan(model, cuda_config(), gpu_memory="24GiB").gpu_budget_bytes == 24 << 30
    assert asked == []  # a given budget asks the card nothing
    with pytest.raises(PlanError, match=r"GPU memory 1.00 KiB on cuda:0 is too small"):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1024, 80 << 30))
        plan(model, cuda_config())


def test_planning_for_cuda_without_one_needs_gpu_memory_and_bad_values_are_refused(no_cuda):
    model = meta_llama()
    with pytest.raises(ConfigError, match=r"CUDA is not available here .*give gpu_memory"):
        plan(model, cuda_config())
    assert plan(model, cuda_config(device="cuda:3"), gpu_memory="24GiB").device == "cuda:3"
    assert plan(model, cuda_config(device="auto"), gpu_memory="24GiB").device == "cuda"
    with pytest.raises(ConfigError, match="device='cpu' computes on no GPU"):
        plan(model, cuda_config(device="cpu"), gpu_memory="24GiB")
    with pytest.raises(ConfigError, match="gpu_memory must be a byte size"):
        plan(model, cuda_config(), gpu_memory="lots")
    # The public entry point takes the same argument.
    assert engine.plan(model, cuda_config(), gpu_memory=1 << 30).gpu_budget_bytes == 1 << 30


def test_activation_estimate_goes_to_the_gpu(no_cuda):
    model = meta_llama()
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    p = plan(model, cuda_config(prefetch_depth=0), example_inputs=dict(input_ids=ids, labels=ids), gpu_memory="1GiB")
    assert p.activation_bytes > 0 and p.gpu_activation_bytes == p.activation_bytes
    assert p.gpu_peak_bytes == p.gpu_resident_bytes + p.gpu_window_bytes + p.gpu_grad_bytes + p.activation_bytes


def test_config_gpu_memory_is_the_budget_and_the_argument_wins(no_cuda):
    model = meta_llama()
    peaks = {d: plan(model, cuda_config(prefetch_depth=d), gpu_memory="1GiB").gpu_peak_bytes for d in (0, 1, 2)}
    p = plan(model, cuda_config(gpu_memory=peaks[1]))  # no card here: the field plans for that card
    assert (p.gpu_budget_bytes, p.prefetch_depth, p.fits) == (peaks[1], 1, True)
    assert plan(model, cuda_config(gpu_memory=peaks[1]), gpu_memory=peaks[2]).prefetch_depth == 2
    assert plan(model, cuda_config(gpu_memory="24GiB")).gpu_budget_bytes == 24 << 30
    with pytest.raises(PlanError, match=rf"GPU memory {format_bytes(peaks[0] - 1)} on cuda is too small"):
        plan(model, cuda_config(gpu_memory=peaks[0] - 1))


def test_config_gpu_memory_is_used_over_the_cards_free_memory(monkeypatch):
    monkeypatch.delenv(AUTO_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (3 << 30, 80 << 30))
    for device in ("cuda", "auto"):  # "auto" resolves to the card here: the field applies
        p = plan(meta_llama(), cuda_config(device=device, gpu_memory="2GiB"))
        assert (p.device, p.gpu_budget_bytes) == ("cuda", 2 << 30) and asked == []


def test_config_gpu_memory_with_auto_on_a_cpu_machine_is_ignored_with_a_warning(no_cuda):
    with pytest.warns(UserWarning, match="gpu_memory='2GiB' is ignored: device 'auto' resolves to the CPU"):
        p = plan(meta_llama(), cuda_config(device="auto", gpu_memory="2GiB"))
    assert (p.device, p.gpu_budget_bytes, p.gpu_peak_bytes) == ("cpu", None, 0)


def test_config_gpu_memory_in_separate_mode_is_checked_before_anything_is_allocated(tmp_path):
    from helpers import tiny_llama

    model = tiny_llama()
    cfg = Config(device="separate", nvme_path=str(tmp_path), resident_threshold_bytes=4096)
    needed = plan(model, dataclasses.replace(cfg, prefetch_depth=0)).gpu_peak_bytes
    assert plan(model, dataclasses.replace(cfg, gpu_memory=needed)).fits
    with pytest.raises(PlanError, match=rf"on separate \(cpu\) is too small: .*{format_bytes(1)} more"):
        engine.initialize(model, dataclasses.replace(cfg, gpu_memory=needed - 1))
    assert list(tmp_path.iterdir()) == []  # no swap directory, no store file
    assert all(not p.is_meta and torch.isfinite(p).all() for p in model.parameters())  # the model untouched


@pytest.mark.parametrize("value, message", [("lots", "gpu_memory must be a byte size"), (0, "gpu_memory must be"),
                                            (True, "gpu_memory must be")])
def test_config_gpu_memory_is_validated(value, message):
    with pytest.raises(ConfigError, match=message):
        Config(gpu_memory=value)
    with pytest.raises(ConfigError, match="device='cpu' computes on no GPU"):
        Config(device="cpu", gpu_memory="8GiB")
    assert Config.load(Config(device="cuda", gpu_memory="24GiB").to_dict()).gpu_memory == "24GiB"
    assert Config.load({"device": "separate", "gpu_memory": 1 << 30}).gpu_memory == 1 << 30


def test_cli_plan_takes_its_gpu_budget_from_the_config(tmp_path, capsys, no_cuda):
    from engine.cli import main

    cfg = tmp_path / "engine.json"
    cfg.write_text('{"device": "cuda", "gpu_memory": "30GiB"}')
    for extra, shown in (([], "30.00 GiB"), (["--gpu-memory", "24GiB"], "24.00 GiB")):
        assert main(["plan", "llama-7b", "--dtype", "bf16", "--config", str(cfg), *extra]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("GPU memory budget")]
        assert rows and rows[0].split()[-2:] == shown.split(), (extra, rows)


# ---------------------------------------------------------------------- several ranks (issue 16)
# A plan is one rank's; partitioned, it is sized with rank 0's shards (the largest), exact by Partition.own.
def rank_plan(model, world_size=None, rank=None, **fields):
    cfg = Config(**{"device": "cpu", "resident_threshold_bytes": 4096, "trainable_placement": "nvme", **fields})
    return plan(model, cfg, world_size=world_size, rank=rank)


def io(n: int) -> int:
    return -(-n // 4096) * 4096  # the store's and the pool's 4 KiB rounding


def test_a_partitioned_rank_plans_its_own_share_of_every_store_tensor(no_cuda):
    from engine.distributed import DistributedSpec, Partition

    model = meta_llama()
    one, two = rank_plan(model, 1, dtype="bf16"), rank_plan(model, 2, dtype="bf16")
    part = Partition(DistributedSpec(rank=0, world_size=2))
    numels = [p.numel() for p in model.parameters()]  # all trainable: param, fp32 master, 2 moments, fp32 grad
    assert one.disk_bytes == sum(io(n * BF16) + 4 * io(n * 4) for n in numels)
    assert two.disk_bytes == sum(io(part.own(n) * BF16) + 4 * io(part.own(n) * 4) for n in numels)
    assert 0.45 < two.disk_bytes / one.disk_bytes <= 0.55, (two.disk_bytes, one.disk_bytes)
    assert (two.world_size, two.rank, two.state_partitioning) == (2, 0, "partitioned")
    assert "rank 0 of 2" in two.table() and "partitioned" in two.table()


def test_partitioned_staging_holds_gathered_weights_and_the_optimizer_works_on_shards(no_cuda):
    # Two 3,000-element fp32 weights: one process stages 12,000 B (12 KiB slots); 2 ranks gather a
    # padded 2 x 2,048 elements (16 KiB), and each rank's shard is 2,048 elements.
    model = torch.nn.Sequential(torch.nn.Linear(100, 30, bias=False), torch.nn.Linear(30, 100, bias=False))
    for depth in (0, 1):
        one, two = rank_plan(model, 1, prefetch_depth=depth), rank_plan(model, 2, prefetch_depth=depth)
        assert one.staging_bytes == (depth + 1) * io(3000 * 4) == (depth + 1) * 12288
        assert two.staging_bytes == (depth + 1) * 2 * 2048 * 4
    from engine.offload.gradients import GRAD_STAGING_BYTES

    assert one.grad_staging_bytes == GRAD_STAGING_BYTES
    assert two.grad_staging_bytes == 2 * 2048 * 4 + GRAD_STAGING_BYTES  # the padded fp32 gradient + the shard's
    streams = 4  # fp32 compute: master (= the weights), grad, exp_avg, exp_avg_sq; 3 buffer sets
    assert one.optimizer_bytes == 3 * streams * 2 * io(3000 * 4)
    assert two.optimizer_bytes == 3 * streams * 2 * io(2048 * 4)
    assert two.disk_bytes == 2 * 4 * io(2048 * 4)  # param (the master), 2 moments, grad of each shard


def test_replicated_ranks_plan_the_whole_state_and_one_process_is_unchanged(no_cuda):
    model = meta_llama()
    ignore = {"process_bytes", "predicted_peak_bytes", "world_size", "rank", "state_partitioning"}
    single, replicated = rank_plan(model, dtype="bf16"), rank_plan(model, 2, 1, dtype="bf16",
                                                                   state_partitioning="replicated")
    assert {k: v for k, v in dataclasses.asdict(single).items() if k not in ignore} == \
           {k: v for k, v in dataclasses.asdict(replicated).items() if k not in ignore}
    assert (single.world_size, single.rank, single.state_partitioning) == (1, 0, "none")
    assert "ranks" not in single.table() and "rank 1 of 2" in replicated.table()
    assert "replicated" in replicated.table()


def test_ranks_come_from_torchruns_environment_and_bad_ones_are_refused(no_cuda, monkeypatch):
    model = meta_llama()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    p = rank_plan(model)
    assert (p.world_size, p.rank, p.state_partitioning) == (2, 1, "partitioned")
    assert p.disk_bytes == rank_plan(model, 2).disk_bytes  # every rank plans rank 0's bound
    for world, rank, field in ((0, None, "world_size"), (2, 2, "rank"), (2, -1, "rank")):
        with pytest.raises(ConfigError, match=field):
            rank_plan(model, world, rank)


def test_cli_plan_world_size(tmp_path, capsys, no_cuda):
    from engine.cli import main

    for r in (0, 1):
        (tmp_path / f"r{r}").mkdir()
    args = ["plan", "tiny", "--nvme-path", str(tmp_path / "r{rank}")]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main([*args, "--world-size", "2"]) == 0
    two = capsys.readouterr().out
    assert "rank 0 of 2" in two and "ranks" not in one

    def disk(out: str) -> str:
        return next(line for line in out.splitlines() if line.startswith("disk on")).split("  ")[-1].strip()

    assert disk(one) != disk(two)
    assert main([*args, "--world-size", "3"]) == 2  # rank 2's directory is missing: refused, named
    assert str(tmp_path / "r2") in capsys.readouterr().err


def test_ranks_sharing_a_file_system_are_counted_together(tmp_path, monkeypatch, no_cuda):
    from engine.offload import planner

    p = rank_plan(meta_llama(), 2)
    monkeypatch.setattr(planner, "available_bytes", lambda path: p.disk_bytes * 3 // 2)
    planner.check_disk(p, [str(tmp_path)])  # this rank alone fits
    with pytest.raises(PlanError, match="for 2 ranks"):
        planner.check_disk(p, [str(tmp_path)], ranks=[[str(tmp_path)], [str(tmp_path)]])


RANK_WORKER = '''
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
from helpers import batches, tiny_llama
import engine

a = json.loads(sys.argv[1])
cfg = engine.Config(nvme_path=a["nvme"], device="cpu", resident_threshold_bytes=4096, trainable_placement="nvme")
trainer = engine.initialize(tiny_llama(), cfg)
p = trainer.runtime.plan
out = dict(world=p.world_size, rank=p.rank, mode=p.state_partitioning, disk=p.disk_bytes,
           used=trainer.runtime.store.stats()["disk_used"])
for x in batches(2, shape=(1, 16)):  # two steps: the planned pool carries the whole step
    trainer.backward(trainer(input_ids=x, labels=x).loss)
    trainer.step()
with open(os.path.join(a["out"], f"rank{p.rank}.json"), "w") as f:
    json.dump(out, f)
trainer.close()
'''


def test_two_launched_ranks_use_the_disk_their_plan_predicts(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from helpers import REPO, child_env, tiny_llama

    script = tmp_path / "worker.py"
    script.write_text(RANK_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    arg = json.dumps(dict(nvme=str(tmp_path), out=str(tmp_path)))
    procs = [subprocess.Popen([sys.executable, str(script), arg, REPO], env=child_env(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = plan(tiny_llama(), Config(device="cpu", resident_threshold_bytes=4096, trainable_placement="nvme"),
                    world_size=2).disk_bytes
    assert [(g["world"], g["rank"], g["mode"], g["disk"]) for g in got] == [(2, r, "partitioned", expected)
                                                                             for r in (0, 1)]
    assert got[0]["used"] == expected  # rank 0 owns the largest shards: exactly what was planned
    assert got[1]["used"] <= expected
