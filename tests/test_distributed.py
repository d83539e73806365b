"""Several ranks on torch.distributed (gloo, CPU): data-parallel training equals one process with the
same global batch, checkpoints move between world sizes, a dead rank ends the others with a
DistributedError, per-rank swap paths.

Ranks are child processes given torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) directly - as torchrun sets it, but without its agent, which would kill the survivor
of a dead rank before it could report; the CLI test launches through torchrun itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import REPO, free_port, rank_env
from safetensors.torch import load_file

import engine
from engine.distributed import SINGLE, DistributedSpec, rank_paths, shard_indices
from engine.errors import ConfigError, DistributedError

STEPS, SAVE_AT = 4, 2
GLOBAL_BATCH = 4  # 2 ranks x micro-batch 2 == 1 process x micro-batch 4

WORKER = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
    import torch
    from safetensors.torch import save_file
    from helpers import batches, peft_llama, tiny_llama
    import engine
    from engine.distributed import shard_indices

    a = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    if a.get("own_group"):  # the user's group, initialized before the engine: used as it is
        torch.distributed.init_process_group("gloo")
    model = peft_llama() if a["lora"] else tiny_llama()
    cfg = engine.Config(nvme_path=a["nvme"], device=a.get("device", "cpu"),
                        optimizer=engine.AdamWConfig(lr=1e-2, weight_decay=0.1),
                        gradient_accumulation_steps=2, gradient_clipping=1.0, resident_threshold_bytes=4096,
                        trainable_placement="memory" if a["lora"] else "nvme", collective_timeout_s=a["timeout"],
                        state_partitioning=a.get("partitioning", "partitioned"))
    if a.get("pretrained"):  # a meta model, each tensor read from the file, this rank's shard stored
        trainer = engine.from_pretrained(a["pretrained"], cfg)
    else:
        trainer = engine.initialize(model, cfg)
    spec = trainer.runtime.distributed
    torch.manual_seed(100 + rank)  # per-rank RNG streams, to check that a resumed rank gets its own back
    data = batches(2 * a["steps"], shape=(4, 16))  # global micro-batches
    mine = list(shard_indices(4, spec))
    out = dict(rank=spec.rank, world=spec.world_size, losses=[], norms=[], draws=None)
    start = 0
    if a.get("load"):
        trainer.load_checkpoint(a["load"])
        start = trainer.global_steps
        out["draws"] = torch.rand(3).tolist()
    for step in range(start, a["steps"]):
        for m in range(2):
            x = data[2 * step + m][mine]
            loss = trainer(input_ids=x, labels=x).loss
            trainer.backward(loss)
            if a.get("die_at") == step + 1 and m == 0 and rank == 1:
                os._exit(3)  # dies mid-window: rank 0 waits for it in the next collective
            if a.get("hang_at") == step + 1 and m == 0 and rank == 1:
                import time
                time.sleep(3600)  # hangs mid-window (alive, its sockets open): only the timeout tells
            trainer.step()
            out["losses"].append(loss.item())
        out["norms"].append(trainer.runtime.last_grad_norm)
        if a.get("save") and step + 1 == a["save_at"]:
            out["saved"] = trainer.save_checkpoint(a["save"])
            out["draws"] = torch.rand(3).tolist()
    names = [s.name for s in trainer.runtime.trainable]
    save_file({n: trainer.runtime.parameter(n).clone().reshape(-1) for n in names},
              os.path.join(a["out"], f"weights-{a['tag']}-{rank}.safetensors"))
    out["report"] = {k: trainer.memory_report()[k] for k in ("rank", "world_size")}
    store = trainer.runtime.store.stats()
    out["store"] = {k: store[k] for k in ("disk_used", "bytes_read", "bytes_written")}
    out["gathers"] = trainer.runtime.streamer.stats()["gathers"]
    out["created"] = spec.created
    with open(os.path.join(a["out"], f"out-{a['tag']}-{rank}.json"), "w") as f:
        json.dump(out, f)
    trainer.close()
''')

class Runs:
    def __init__(self, root):
        self.root = root
        self.worker = os.path.join(root, "worker.py")
        with open(self.worker, "w") as f:
            f.write(WORKER)

    def args(self, tag: str, **over) -> dict:
        nvme = os.path.join(self.root, f"nvme-{tag}")
        os.makedirs(nvme, exist_ok=True)
        a = dict(tag=tag, lora=False, nvme=nvme, steps=STEPS, timeout=60, out=self.root)
        a.update(over)
        return a

    def launch(self, world: int, a: dict, timeout: float = 180) -> list[subprocess.CompletedProcess]:
        cmd = [sys.executable, self.worker, json.dumps(a), REPO]
        if world == 1:
            return [subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=rank_env())]
        port = str(free_port())
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=rank_env(r, world, port))
                 for r in range(world)]
        done = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return done

    def run(self, world: int, tag: str, **over) -> list[dict]:
        a = self.args(tag, **over)
        for r in self.launch(world, a):
            assert r.returncode == 0, r.stderr[-3000:]
        return [self.result(tag, rank) for rank in range(world)]

    def result(self, tag: str, rank: int) -> dict:
        with open(os.path.join(self.root, f"out-{tag}-{rank}.json")) as f:
            out = json.load(f)
        out["weights"] = load_file(os.path.join(self.root, f"weights-{tag}-{rank}.safetensors"))
        return out


# Ranks that do not run the same thing: each case must end every rank with a DistributedError,
# never train on silently mixed averages or diverged replicas.
MISMATCH = textwrap.dedent('''
    import os, sys
    import torch
    import engine
    mode, root, partitioning = sys.argv[1], sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])

    class Experts(torch.nn.Module):  # two "experts" of one shape: a mixed average would go unnoticed
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 64, bias=False)
            self.b = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x, order):
            first, second = (self.a, self.b) if order == 0 else (self.b, self.a)
            h = first(x)
            return (h + second(x)).pow(2).mean()  # the backward reaches the experts in another order

    torch.manual_seed(rank if mode == "seed" else 0)
    model = Experts()
    placement = "nvme"
    if mode == "order-frozen":  # frozen streamed experts, a trainable scale in DRAM (the PEFT placement)
        model.requires_grad_(False)
        model.scale = torch.nn.Parameter(torch.ones(()))
        inner = model.forward
        model.forward = lambda x, order: inner(x, order) * model.scale
        placement = "memory"
    nvme = os.path.join(root, f"nvme-{mode}-{rank}")
    if not (mode == "build" and rank == 1):  # rank 1's swap path does not exist: its build fails
        os.makedirs(nvme, exist_ok=True)
    trainer = engine.initialize(model, engine.Config(nvme_path=nvme, device="cpu", resident_threshold_bytes=0,
                                                     collective_timeout_s=60, state_partitioning=partitioning,
                                                     trainable_placement=placement))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(rank))
    trainer.backward(trainer(x, order=rank if mode.startswith("order") else 0))
    trainer.step()
    print("trained", flush=True)
''')


@pytest.mark.parametrize("mode, message, partitioning", [
    ("order", "gradients averaged in the window's last micro-batch", "replicated"),
    ("order", "the ranks ran different collectives", "partitioned"),  # the trail of gathers and reduce-scatters
    ("order-frozen", "the ranks ran different collectives", "partitioned"),  # gathers only (DRAM placement)
    ("seed", "initial weights", "partitioned"),
    ("build", "engine.initialize failed on 1 of 2 rank(s)", "partitioned"),
])
def test_ranks_that_differ_fail_on_every_rank(tmp_path, mode, message, partitioning):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH)
    port = str(free_port())
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(script), mode, str(tmp_path), partitioning], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=rank_env(r, 2, port)) for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert time.monotonic() - start < 50  # detected where it happens, not by the 60 s collective timeout
    for p, (out, err) in zip(procs, results):
        assert p.returncode != 0 and "trained" not in out, err[-2000:]
        assert "DistributedError" in err or (mode == "build" and "FileNotFoundError" in err), err[-2000:]
        assert message in err or (mode == "build" and "does not exist" in err), err[-2000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(str(tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="module")
def nvme_runs(runs):
    """One process x micro-batch 4 and 2 ranks x micro-batch 2 (each saving at step 2), NVMe placement;
    the 2-rank run on per-rank ``{rank}`` swap directories."""
    single = runs.run(1, "single", save=os.path.join(runs.root, "ckpt-single"), save_at=SAVE_AT)
    for r in range(2):
        os.makedirs(os.path.join(runs.root, f"nvme-two-r{r}"))
    two = runs.run(2, "two", nvme=os.path.join(runs.root, "nvme-two-r{rank}"),
                   save=os.path.join(runs.root, "ckpt-two"), save_at=SAVE_AT)
    return single, two


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Within rtol 1e-5 as tests/test_trainer.py measures it (helpers.assert_same_training): each
    value for losses and norms, the relative L2 norm of the difference for a weight tensor. The
    averaged gradient differs from one process's by summation order only (two partial means, then
    their mean); Adam turns those last-bit differences on near-zero gradient elements into ~1e-6
    absolute differences of single elements (measured: 11 of 16384 lm_head elements, max 2.2e-6),
    so an elementwise bound would fail where the tensor agrees to ~1e-7 in norm."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    if a.numel() > 16:
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 1e-5, f"{what}: relative L2 difference {rel:g}"
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0.0, msg=lambda m: f"{what}: {m}")


def _assert_same_training(single: dict, two: list[dict]) -> None:
    mean_losses = [(a + b) / 2 for a, b in zip(two[0]["losses"], two[1]["losses"])]
    _close(torch.tensor(mean_losses, dtype=torch.float64), torch.tensor(single["losses"], dtype=torch.float64),
           "per-micro-batch loss averaged over the ranks")
    for r in range(2):
        _close(torch.tensor(two[r]["norms"]), torch.tensor(single["norms"]), f"gradient norm on rank {r}")
    for name, w in single["weights"].items():
        _close(two[0]["weights"][name], w, f"final {name}")
        # replicated state: the ranks agree bit for bit
        assert torch.equal(two[0]["weights"][name], two[1]["weights"][name]), name


def test_two_ranks_train_as_one_process_with_the_global_batch_nvme(nvme_runs):
    single, two = nvme_runs
    assert [t["report"] for t in two] == [dict(rank=0, world_size=2), dict(rank=1, world_size=2)]
    assert [t["created"] for t in two] == [True, True]  # made from torchrun's environment
    assert single[0]["report"] == dict(rank=0, world_size=1)
    _assert_same_training(single[0], two)
    # {rank} paths: each rank's private swap directory was in its own directory (removed at close)
    assert all(os.path.isdir(os.path.join(os.path.dirname(two[0]["saved"]), "..", f"nvme-two-r{r}")) for r in (0, 1))


def test_two_ranks_train_as_one_process_dram_lora(runs):
    single = runs.run(1, "lora-single", lora=True)
    two = runs.run(2, "lora-two", lora=True, own_group=True)
    assert [t["created"] for t in two] == [False, False]  # the script's own process group
    assert single[0]["weights"] and all("lora" in n for n in single[0]["weights"])
    _assert_same_training(single[0], two)


def test_resume_two_ranks_bit_identical_and_across_world_sizes(runs, nvme_runs):
    single, two = nvme_runs
    assert two[0]["saved"] == two[1]["saved"]  # every rank is told the path rank 0 wrote
    ckpt2, ckpt1 = os.path.join(runs.root, "ckpt-two"), os.path.join(runs.root, "ckpt-single")
    assert sorted(f for f in os.listdir(two[0]["saved"]) if f.startswith("rng-")) == ["rng-rank-00001.json"]
    again = runs.run(2, "resume-2-2", load=ckpt2)
    for r in range(2):
        assert again[r]["draws"] == two[r]["draws"], f"rank {r} resumed with another RNG state"
        assert all(torch.equal(again[r]["weights"][n], w) for n, w in two[r]["weights"].items())
    assert again[0]["draws"] != again[1]["draws"]
    one = runs.run(1, "resume-2-1", load=ckpt2)  # 2 -> 1: same global batch, one process
    for name, w in single[0]["weights"].items():
        _close(one[0]["weights"][name], w, f"2 -> 1 resumed {name}")
    up = runs.run(2, "resume-1-2", load=ckpt1)  # 1 -> 2
    _assert_same_training(dict(single[0], losses=single[0]["losses"][2 * SAVE_AT:],
                               norms=single[0]["norms"][SAVE_AT:]), up)
    assert up[1]["draws"] == up[0]["draws"] == single[0]["draws"]  # no RNG of rank 1 saved: rank 0's


def test_a_dead_rank_ends_the_survivor_with_a_distributed_error(runs, nvme_runs):
    _, two = nvme_runs
    a = runs.args("dies", die_at=SAVE_AT + 1, timeout=10, load=os.path.join(runs.root, "ckpt-two"),
                  save=os.path.join(runs.root, "ckpt-dies"), save_at=STEPS)
    start = time.monotonic()
    survivor, dead = runs.launch(2, a, timeout=90)
    assert time.monotonic() - start < 60
    assert dead.returncode == 3
    assert survivor.returncode != 0
    assert "DistributedError" in survivor.stderr and "failed on rank 0 of 2" in survivor.stderr, \
        survivor.stderr[-3000:]
    assert "gradient of" in survivor.stderr or "weights of" in survivor.stderr  # a reduce-scatter or a gather
    assert not os.path.exists(os.path.join(runs.root, "ckpt-dies"))  # nothing half-written
    # the last checkpoint still loads
    again = runs.run(1, "after-death", load=os.path.join(runs.root, "ckpt-two"))
    assert again[0]["losses"]


def test_from_pretrained_on_two_ranks_trains_as_one_process(runs, tmp_path):
    """engine.from_pretrained under two ranks: the meta model's tensors come from the safetensors file
    whole on every rank, each keeps its shard; training equals one process from the same file."""
    from helpers import tiny_llama
    path = str(tmp_path / "hf")
    tiny_llama().save_pretrained(path)
    single = runs.run(1, "pre-single", pretrained=path, steps=2)
    two = runs.run(2, "pre-two", pretrained=path, steps=2)
    _assert_same_training(single[0], two)
    assert all(t["gathers"] > 0 for t in two)


EXPORT_FAILS = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
    import torch.distributed as dist
    from helpers import batches, tiny_llama
    import engine
    who, root = int(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    os.makedirs(os.path.join(root, f"nvme{rank}"), exist_ok=True)
    cfg = engine.Config(nvme_path=os.path.join(root, f"nvme{rank}"), device="cpu", resident_threshold_bytes=4096,
                        collective_timeout_s=60)
    trainer = engine.initialize(tiny_llama(), cfg)
    x = batches(1, shape=(2, 16))[0]
    trainer.backward(trainer(input_ids=x, labels=x).loss)
    trainer.step()
    if rank == who:  # this rank's second store read fails (an I/O error) in the middle of the export
        store, get, count = trainer.runtime.store, trainer.runtime.store.get, [0]
        def failing(key):
            count[0] += 1
            if count[0] == 2:
                raise OSError(5, "Input/output error (injected)")
            return get(key)
        store.get = failing
    try:
        trainer.save_pretrained(os.path.join(root, "export"))
    except engine.errors.AgreedFailure as exc:
        print("agreed:", exc, flush=True)
    dist.barrier()  # the ranks are still in step: the next collective pairs up
    print("in step", sorted(os.listdir(os.path.join(root, "export"))), flush=True)
    trainer.close()
''')


@pytest.mark.parametrize("who", [0, 1])
def test_a_read_failure_on_one_rank_stops_every_ranks_export_at_the_same_tensor(tmp_path, who):
    """A partitioned export gathers tensor by tensor: a rank whose own read fails still joins that
    gather, and every rank raises AgreedFailure there - none waits out the timeout, nothing is written."""
    script = tmp_path / "export_fails.py"
    script.write_text(EXPORT_FAILS)
    port = str(free_port())
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(script), str(who), str(tmp_path), REPO], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=rank_env(r, 2, port)) for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert time.monotonic() - start < 50  # not the 60 s collective timeout
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
        assert "agreed:" in out and "Input/output error (injected)" in out, out
        assert "in step []" in out, out  # no file committed


def test_a_hung_rank_ends_the_survivor_within_the_collective_timeout(runs):
    """A rank that stops calling collectives but stays alive (its connections open): the survivor's
    next collective (a weight's all-gather or a gradient's reduce-scatter) times out after
    collective_timeout_s (10 s here) with a DistributedError naming it."""
    a = runs.args("hangs", hang_at=2, timeout=10)
    cmd = [sys.executable, runs.worker, json.dumps(a), REPO]
    port = str(free_port())
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=rank_env(r, 2, port)) for r in range(2)]
    try:
        _, err = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode != 0
    assert elapsed < 60, elapsed
    assert "DistributedError" in err and "failed on rank 0 of 2" in err, err[-3000:]
    assert "collective_timeout_s" in err


def test_partitioned_state_halves_each_ranks_disk_and_reads(runs, nvme_runs):
    """Partitioned (the default): each rank stores and reads about half of one process's bytes, and a
    replicated run (the whole state on every rank) trains the same and stores it all on each rank."""
    single, two = nvme_runs
    replicated = runs.run(2, "replicated", partitioning="replicated")
    _assert_same_training(single[0], replicated)
    assert all(r["gathers"] == 0 for r in replicated) and all(t["gathers"] > 0 for t in two)
    one = single[0]["store"]
    for r in range(2):
        assert replicated[r]["store"]["disk_used"] == one["disk_used"]
    # rank 0 also owns the tensors of at most one chunk (2048 elements): slightly more than half here
    for key in ("disk_used", "bytes_read", "bytes_written"):
        shares = [t["store"][key] / one[key] for t in two]
        assert max(shares) <= 0.6 and sum(shares) <= 1.1, (key, shares)


def test_two_ranks_on_one_plain_path_do_not_collide_copying_device(runs, nvme_runs):
    """No placeholder: both ranks' private swap directories under one path, neither reclaimed by the
    other. On the "separate" device (the GPU path's copies, on the CPU): gradients averaged on the
    compute tensor before the device norm, accumulated ones on the host."""
    single, _ = nvme_runs
    two = runs.run(2, "shared-path", device="separate")
    _assert_same_training(single[0], two)
    assert os.listdir(runs.args("shared-path")["nvme"]) == []  # both removed their own at close


def test_shared_path_directories_are_private_and_live_ones_are_kept(tmp_path):
    from engine.storage import cleanup

    mine, fd = cleanup.make_swap_dir(str(tmp_path))
    code = ("import sys, time; from engine.storage import cleanup; d, fd = cleanup.make_swap_dir(sys.argv[1]); "
            "print(d, flush=True); cleanup.sweep(sys.argv[1]); time.sleep(30)")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=rank_env())
    try:
        theirs = other.stdout.readline().strip()
        assert theirs and theirs != mine
        cleanup.sweep(str(tmp_path))  # the other "rank" is alive: its directory stays, and so does mine
        assert os.path.isdir(theirs) and os.path.isdir(mine)
    finally:
        other.kill()
        other.wait()
        os.close(fd)
        cleanup.unregister(mine)


def test_rank_paths_shard_indices_and_config():
    spec = DistributedSpec(rank=3, world_size=4, local_rank=1, backend="gloo")
    assert rank_paths(["/n/{rank}", "/d{local_rank}/x", "/plain"], spec) == ["/n/3", "/d1/x", "/plain"]
    assert rank_paths(["/n/{rank}"], SINGLE) == ["/n/0"]
    engine.Config(nvme_path=["/tmp/{rank}", "/tmp/{{literal}}"])
    for bad in ("/tmp/{node}", "/tmp/{0}", "/tmp/{rank"):
        with pytest.raises(ConfigError, match="placeholders"):
            engine.Config(nvme_path=bad)
    for bad in (0, -1, "10"):
        with pytest.raises(ConfigError, match="collective_timeout_s"):
            engine.Config(collective_timeout_s=bad)
    assert [list(shard_indices(8, DistributedSpec(r, 4))) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(shard_indices(5, SINGLE)) == [0, 1, 2, 3, 4]
    assert [len(shard_indices(5, DistributedSpec(r, 2), even=False)) for r in range(2)] == [3, 2]
    with pytest.raises(DistributedError, match="does not split evenly over 2 ranks"):
        shard_indices(5, DistributedSpec(0, 2))


def test_cli_train_shards_the_global_batch_and_rank_0_reports(runs):
    def train(world: int, tag: str) -> list[float]:
        nvme, out = os.path.join(runs.root, f"cli-nvme-{tag}"), os.path.join(runs.root, f"cli-out-{tag}")
        os.makedirs(nvme)
        args = ["engine", "train", "--steps", "2", "--batch", "4", "--seq-len", "32", "--quiet", "--dtype", "fp32",
                "--nvme-path", nvme, "--output-dir", out]
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)] if world > 1 else []
        r = subprocess.run([sys.executable, *launcher, "-m", *args], capture_output=True, text=True, timeout=300,
                           env=rank_env())
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("peak RSS") == 1  # one summary: rank 0's (torchrun: one launch line)
        with open(os.path.join(out, "train.json")) as f:
            return json.load(f)["train"]["losses"]
    one, two = train(1, "one"), train(2, "two")
    _close(torch.tensor(two), torch.tensor(one), "CLI step losses (global batch 4)")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpu_ranks_nccl_train_as_one_gpu_process(runs):
    """NCCL (device "cuda" becomes cuda:LOCAL_RANK): the same equality as on gloo."""
    single = runs.run(1, "cuda-single", device="cuda")
    two = runs.run(2, "cuda-two", device="cuda")
    _assert_same_training(single[0], two)
