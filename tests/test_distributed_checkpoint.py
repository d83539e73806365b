"""Partitioned checkpoints: per-rank shard files plus one manifest, loaded with any world size;
exports gathered tensor by tensor.

In-process tests build partitioned checkpoints by cutting a one-process checkpoint by the
partition rule (engine/checkpoint/layout.py) and load them into one process (N -> 1 through the
pieced path), and check the manifest's validation. The 2-rank tests run gloo ranks as child
processes with torchrun's environment (as tests/test_distributed.py does) and need the
partitioned core (``runtime.partition``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import crc32c
import pytest
import torch
from helpers import REPO, batches, free_port, rank_env, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import engine
from engine.checkpoint import CheckpointError
from engine.checkpoint.layout import owned_range
from engine.distributed import ALIGN_ELEMENTS, DistributedSpec, Partition
from engine.offload.keys import StoreKey

LR = 1e-2


# ---------------------------------------------------------------------------------------------- one process
def _config(nvme: str) -> engine.Config:
    return engine.Config(nvme_path=nvme, optimizer=engine.AdamWConfig(lr=LR, weight_decay=0.1),
                         gradient_accumulation_steps=1, resident_threshold_bytes=4096)


def _train(trainer, data) -> None:
    for x in data:
        trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()


def _state(trainer) -> dict[str, torch.Tensor]:
    """Weights and Adam moments of every trainable parameter (one process: whole)."""
    out = {}
    for spec in trainer.runtime.trainable:
        out[f"param/{spec.name}"] = trainer.parameter(spec.name).clone()
        for kind in ("exp_avg", "exp_avg_sq"):
            out[f"{kind}/{spec.name}"] = trainer.runtime.store.get(StoreKey.moment(kind, spec.name)).clone()
    return out


def repartition(src: str, dst: str, world: int, align: int) -> None:
    """Writes checkpoint directory ``src`` (whole tensors) as ``world`` ranks' pieces in ``dst``:
    every non-empty tensor cut by the partition rule, rank r's pieces in its own file."""
    with open(os.path.join(src, "manifest.json")) as f:
        manifest = json.load(f)
    os.makedirs(dst)
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    tensors = {}
    for name, entry in manifest["tensors"].items():
        with safe_open(os.path.join(src, entry["file"]), "pt") as f:
            flat = f.get_tensor(name).reshape(-1)
        shards = []
        for r in range(world):
            a, b = owned_range(flat.numel(), world, r, align)
            if b > a:
                per_rank[r][name] = flat[a:b].clone()
                shards.append(dict(file=f"state-rank-{r:05d}.safetensors", start=a, stop=b, rank=r,
                                   crc32c=crc32c.crc32c(flat[a:b].contiguous().view(torch.uint8).numpy())))
        tensors[name] = dict(dtype=entry["dtype"], shape=entry["shape"], partitioned=True, shards=shards)
    files = {}
    for r, state in enumerate(per_rank):
        fname = f"state-rank-{r:05d}.safetensors"
        save_file(state, os.path.join(dst, fname))
        with open(os.path.join(dst, fname), "rb") as f:
            data = f.read()
        files[fname] = dict(bytes=len(data), crc32c=crc32c.crc32c(data), rank=r)
    manifest.update(version=2, world_size=world, partition=dict(world_size=world, align_elements=align),
                    files=files, tensors=tensors)
    with open(os.path.join(dst, "manifest.json"), "w") as f:
        json.dump(manifest, f)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A one-process run saved after 2 steps, its state after one more step, and the data."""
    root = tmp_path_factory.mktemp("ckpt1")
    data = batches(3)
    nvme = str(root / "nvme")
    os.makedirs(nvme)
    with engine.initialize(tiny_llama(), _config(nvme)) as trainer:
        _train(trainer, data[:2])
        saved = trainer.save_checkpoint(str(root / "ckpt"))
        _train(trainer, data[2:])
        after = _state(trainer)
    return str(root), saved, after, data


@pytest.mark.parametrize("world, align", [(2, 64), (3, 64), (2, ALIGN_ELEMENTS)])
def test_partitioned_checkpoint_loads_into_one_process_bit_identically(one_process, tmp_path, world, align):
    root, saved, after, data = one_process
    cut = str(tmp_path / "cut")
    repartition(saved, cut, world, align)
    if align == 64:  # the small alignment really cuts: pieces of one tensor in several files
        with open(os.path.join(cut, "manifest.json")) as f:
            assert max(len(t["shards"]) for t in json.load(f)["tensors"].values()) == world
    nvme = str(tmp_path / "nvme")
    os.makedirs(nvme)
    torch.manual_seed(5)
    with engine.initialize(tiny_llama(layers=2), _config(nvme)) as trainer:
        trainer.load_checkpoint(cut)
        _train(trainer, data[2:])
        resumed = _state(trainer)
    for name, value in after.items():
        assert torch.equal(resumed[name], value), name


def _corrupt_tensor(path: str, name: str) -> None:
    with safe_open(path, "pt") as f:
        assert name in f.keys()
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header - 8))
    begin = meta[name]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(header + begin)
        byte = f.read(1)
        f.seek(header + begin)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_or_uncovering_pieces_are_refused_naming_file_and_tensor(one_process, tmp_path):
    root, saved, _, _ = one_process
    nvme = str(tmp_path / "nvme")
    os.makedirs(nvme)
    cut = str(tmp_path / "cut")
    repartition(saved, cut, 2, 64)
    with open(os.path.join(cut, "manifest.json")) as f:
        manifest = json.load(f)
    name = next(n for n, t in manifest["tensors"].items() if len(t["shards"]) == 2 and n.startswith("exp_avg/"))
    bad = str(tmp_path / "corrupt")
    shutil.copytree(cut, bad)
    _corrupt_tensor(os.path.join(bad, "state-rank-00001.safetensors"), name)
    gap = str(tmp_path / "gap")
    shutil.copytree(cut, gap)
    manifest["tensors"][name]["shards"][1]["start"] += 1
    with open(os.path.join(gap, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with engine.initialize(tiny_llama(), _config(nvme)) as trainer:
        with pytest.raises(CheckpointError, match=r"state-rank-00001\.safetensors: tensor .* is corrupt"):
            trainer.load_checkpoint(bad)
        with pytest.raises(CheckpointError, match="do not cover the tensor"):
            trainer.load_checkpoint(gap)
        trainer.load_checkpoint(cut)  # the good one still loads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_keys_get_their_ranges_from_pieces_of_another_world_size(tmp_path, dtype):
    """3 saved ranks -> each of 2 loading ranks' store key, segment by segment (4096 elements): a
    segment crossing a piece boundary is assembled from two files; bf16 keys convert explicitly."""
    from engine.checkpoint.format import read_header
    from engine.checkpoint.layout import Layout, saved_tensors
    from engine.checkpoint.reshard import load_tensors
    from engine.checkpoint.transfer import StoreTarget
    from engine.storage import TensorStore
    from engine.storage.staging import staging_blocks

    full = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0))
    flat = full.reshape(-1)
    files, shards = {}, []
    for r in range(3):
        a, b = owned_range(flat.numel(), 3, r, ALIGN_ELEMENTS)
        fname = f"state-rank-{r:05d}.safetensors"
        save_file({"master/w": flat[a:b].clone()}, str(tmp_path / fname))
        data = (tmp_path / fname).read_bytes()
        files[fname] = dict(bytes=len(data), crc32c=crc32c.crc32c(data), rank=r)
        shards.append(dict(file=fname, start=a, stop=b, rank=r, crc32c=crc32c.crc32c(flat[a:b].numpy())))
    assert [s["stop"] for s in shards] == [8192, 16384, 20000]
    manifest = dict(files=files, partition=dict(world_size=3, align_elements=ALIGN_ELEMENTS),
                    tensors={"master/w": dict(dtype="F32", shape=[4, 5000], partitioned=True, shards=shards)})
    headers = {f: read_header(str(tmp_path / f)) for f in files}
    saved = saved_tensors(manifest, "manifest.json")
    for rank in range(2):
        a, b = owned_range(flat.numel(), 2, rank, ALIGN_ELEMENTS)
        os.makedirs(tmp_path / f"store-{rank}")
        with TensorStore(str(tmp_path / f"store-{rank}"), stripe_size=16 * 1024, grow_step="1MiB") as store:
            assert store.segment_elements == 4096
            store.allocate("k", (b - a,), dtype)
            with staging_blocks(None, 4096 * 4) as blocks:
                load_tensors(manifest, headers, saved, {"master/w": [StoreTarget("k", a)]}, store, blocks,
                             here=Layout(2, ALIGN_ELEMENTS), there=Layout(3, ALIGN_ELEMENTS), rank=rank, world_size=2)
            assert torch.equal(store.get("k"), flat[a:b].to(dtype)), rank


def test_partition_rule_is_the_runtimes():
    for world in (1, 2, 3, 4):
        for numel in (0, 1, 2047, 2048, 2049, 10_000, 3 * 2048 + 5):
            partition = Partition(DistributedSpec(rank=0, world_size=world))
            ranges = [owned_range(numel, world, r, ALIGN_ELEMENTS) for r in range(world)]
            assert ranges == [partition.range(numel, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# ---------------------------------------------------------------------------------------------- 2 ranks
WORKER = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
    import torch
    from safetensors.torch import save_file
    from helpers import batches, peft_llama, tiny_llama
    import engine
    from engine.distributed import shard_indices
    from engine.offload.keys import StoreKey

    a = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    cfg = engine.Config(nvme_path=a["nvme"], device="cpu", optimizer=engine.AdamWConfig(lr=1e-2, weight_decay=0.1),
                        gradient_accumulation_steps=1, gradient_clipping=1.0, resident_threshold_bytes=4096,
                        state_partitioning=a["mode"], collective_timeout_s=60,
                        trainable_placement="memory" if a.get("lora") else "nvme")
    trainer = engine.initialize(peft_llama() if a.get("lora") else tiny_llama(), cfg)
    spec = trainer.runtime.distributed
    data = batches(a["steps"], shape=(4, 16))
    mine = list(shard_indices(4, spec))
    out = dict(rank=spec.rank, world=spec.world_size, partitioned=trainer.runtime.partition is not None)
    if a.get("fail_write") == rank:  # this rank's shard write fails (a full disk)
        import engine.checkpoint.ranks as ranks_mod

        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device (test)")
        ranks_mod.write_own = full_disk
    start = 0
    try:
        if a.get("load"):
            trainer.load_checkpoint(a["load"])
            start = trainer.global_steps
        for step in range(start, a["steps"]):
            x = data[step][mine]
            trainer.backward(trainer(input_ids=x, labels=x).loss)
            trainer.step()
            if a.get("save") and step + 1 == a["save_at"]:
                out["saved"] = trainer.save_checkpoint(a["save"])
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    if "error" not in out:
        names = [s.name for s in trainer.runtime.trainable]
        state = {f"param/{n}": trainer.runtime.parameter(n).clone().reshape(-1) for n in names}  # gathers
        for n in names if not a.get("lora") else []:  # this rank's own pieces of the moments
            for kind in ("exp_avg", "exp_avg_sq"):
                state[f"{kind}/{n}"] = trainer.runtime.store.get(StoreKey.moment(kind, n)).clone().reshape(-1)
        save_file(state, os.path.join(a["out"], f"state-{a['tag']}-{rank}.safetensors"))
        if a.get("export") and a.get("lora"):
            out["exported"] = trainer.save_adapter(a["export"])
            out["merged"] = trainer.merge_and_export(a["export"] + "-merged")
        elif a.get("export"):
            out["exported"] = trainer.save_pretrained(a["export"])
    with open(os.path.join(a["out"], f"out-{a['tag']}-{rank}.json"), "w") as f:
        json.dump(out, f)
    trainer.close()
''')

class Ranks:
    """Launches the worker as ``world`` ranks (torchrun's environment, no agent) and reads their results."""

    def __init__(self, root: str):
        self.root = root
        self.worker = os.path.join(root, "worker.py")
        with open(self.worker, "w") as f:
            f.write(WORKER)

    def run(self, world: int, tag: str, steps: int = 4, mode: str = "partitioned", **over) -> list[dict]:
        nvme = os.path.join(self.root, f"nvme-{tag}")
        os.makedirs(nvme, exist_ok=True)
        a = dict(tag=tag, nvme=nvme, steps=steps, mode=mode, out=self.root, **over)
        port = str(free_port())
        envs = [rank_env()] if world == 1 else [rank_env(r, world, port) for r in range(world)]
        procs = [subprocess.Popen([sys.executable, self.worker, json.dumps(a), REPO], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for env in envs]
        outs = []
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
        for r in range(world):
            with open(os.path.join(self.root, f"out-{tag}-{r}.json")) as f:
                out = json.load(f)
            path = os.path.join(self.root, f"state-{tag}-{r}.safetensors")
            out["state"] = load_file(path) if os.path.exists(path) else {}
            outs.append(out)
        return outs


def _equal_weights(a: dict, b: dict, what: str) -> None:
    names = [n for n in b["state"] if n.startswith("param/")]
    assert names
    for n in names:
        assert torch.equal(a["state"][n], b["state"][n]), f"{what}: {n}"


def _equal_moments(a: list[dict], b: list[dict], what: str) -> None:
    """Each rank's moment pieces bit for bit (same world size)."""
    for r, (x, y) in enumerate(zip(a, b)):
        for n, t in y["state"].items():
            if not n.startswith("param/"):
                assert torch.equal(x["state"][n], t), f"{what}: rank {r} {n}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return Ranks(str(tmp_path_factory.mktemp("dckpt")))


@pytest.fixture(scope="module")
def two_saved(ranks):
    """2 partitioned ranks, 4 steps uninterrupted, saving at step 2, exporting at the end."""
    return ranks.run(2, "two", save=os.path.join(ranks.root, "ckpt-two"), save_at=2,
                     export=os.path.join(ranks.root, "export-2"))


@pytest.fixture(scope="module")
def one_saved(ranks):
    """The same global batches in one process, saving at step 2, exporting at the end."""
    return ranks.run(1, "single", save=os.path.join(ranks.root, "ckpt-one"), save_at=2,
                     export=os.path.join(ranks.root, "export-1"))


def test_two_rank_checkpoint_layout_and_resume_bit_identical(ranks, two_saved):
    assert all(t["partitioned"] for t in two_saved)
    path = two_saved[0]["saved"]
    assert two_saved[1]["saved"] == path
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["world_size"] == 2 and manifest["partition"]["world_size"] == 2
    assert manifest["partition"]["align_elements"] == ALIGN_ELEMENTS
    sizes = {r: sum(os.path.getsize(os.path.join(path, n)) for n, i in manifest["files"].items() if i.get("rank") == r)
             for r in (0, 1)}
    # The optimizer state of the partitioned tensors (masters/moments in the store) is split evenly:
    # each rank's file holds about half (within the 2048-element alignment of each tensor).
    state = [sum(s["stop"] - s["start"] for t in manifest["tensors"].values() if t.get("partitioned")
                 for s in t["shards"] if s["rank"] == r) for r in (0, 1)]
    total = sum(state)
    assert total and all(0.4 * total <= n <= 0.6 * total for n in state), state
    assert all(0.4 * sum(sizes.values()) <= s <= 0.6 * sum(sizes.values()) for s in sizes.values()), sizes
    again = ranks.run(2, "resume-2-2", load=os.path.join(ranks.root, "ckpt-two"))
    for r in range(2):
        _equal_weights(again[r], two_saved[r], f"2 -> 2 rank {r}")
    _equal_moments(again, two_saved, "2 -> 2")


def _close_weights(a: dict, b: dict, what: str) -> None:
    """Another world size: the averaged gradients differ in summation order only; rtol 1e-5 in
    relative L2 norm as tests/test_distributed.py measures it (Adam amplifies last-bit differences
    of near-zero gradients in single elements)."""
    for n, w in b["state"].items():
        if n.startswith("param/"):
            x, y = a["state"][n].double(), w.double()
            rel = ((x - y).norm() / y.norm()).item() if y.norm() > 0 else (x - y).abs().max().item()
            assert rel <= 1e-5, f"{what}: {n} relative L2 difference {rel:g}"


def test_two_rank_checkpoint_resumes_on_one_and_one_on_two(ranks, two_saved, one_saved):
    one = ranks.run(1, "resume-2-1", load=os.path.join(ranks.root, "ckpt-two"))
    _close_weights(one[0], two_saved[0], "2 -> 1")
    _close_weights(one[0], one_saved[0], "2 -> 1 vs one process throughout")
    up = ranks.run(2, "resume-1-2", load=os.path.join(ranks.root, "ckpt-one"))
    for r in range(2):
        _close_weights(up[r], one_saved[0], f"1 -> 2 rank {r}")


def test_replicated_checkpoint_resumes_partitioned(ranks, two_saved):
    rep = ranks.run(2, "replicated", mode="replicated", save=os.path.join(ranks.root, "ckpt-rep"), save_at=2)
    assert not any(t["partitioned"] for t in rep)
    part = ranks.run(2, "rep-to-part", load=os.path.join(ranks.root, "ckpt-rep"))
    for r in range(2):
        _close_weights(part[r], rep[r], f"replicated -> partitioned rank {r}")
    _close_weights(part[0], two_saved[0], "replicated -> partitioned vs partitioned throughout")


def test_save_pretrained_from_two_partitioned_ranks_equals_one_process(ranks, two_saved, one_saved):
    export2, export1 = os.path.join(ranks.root, "export-2"), os.path.join(ranks.root, "export-1")
    two, one = two_saved, one_saved
    assert two[1]["exported"] == [] and two[0]["exported"] and one[0]["exported"]
    a, b = load_file(os.path.join(export2, "model.safetensors")), load_file(os.path.join(export1, "model.safetensors"))
    assert a.keys() == b.keys()
    for n in a:  # 2 ranks vs 1 process: within the bound above; the layout is the same
        x, y = a[n].double(), b[n].double()
        assert x.shape == y.shape
        assert ((x - y).norm() / max(y.norm().item(), 1e-30)).item() <= 1e-5, n
    # the export equals that run's own gathered weights exactly
    for n, w in two[0]["state"].items():
        if n.startswith("param/") and n[len("param/"):] in a:
            assert torch.equal(a[n[len("param/"):]].reshape(-1), w), n


def test_a_corrupt_shard_fails_the_load_on_every_rank(ranks, two_saved):
    src = two_saved[0]["saved"]
    bad = os.path.join(ranks.root, "ckpt-bad")
    shutil.copytree(src, bad)
    with open(os.path.join(bad, "manifest.json")) as f:
        manifest = json.load(f)
    fname = next(n for n, i in manifest["files"].items() if i.get("rank") == 1)
    name = next(t for t, e in manifest["tensors"].items() if e.get("partitioned")
                and any(s["file"] == fname for s in e["shards"]))
    _corrupt_tensor(os.path.join(bad, fname), name)
    outs = ranks.run(2, "corrupt", load=bad)
    for r, out in enumerate(outs):
        assert out.get("error", "").startswith("CheckpointError"), (r, out.get("error"))
        assert fname in out["error"], (r, out["error"])


def test_a_failed_shard_write_fails_every_rank_and_leaves_no_checkpoint(ranks, two_saved):
    target = os.path.join(ranks.root, "ckpt-failed")
    outs = ranks.run(2, "failed-save", steps=3, load=os.path.join(ranks.root, "ckpt-two"), save=target, save_at=3,
                     fail_write=1)
    assert "No space left on device (test)" in outs[1].get("error", ""), outs[1].get("error")
    assert outs[0].get("error", "").startswith("CheckpointError: save_checkpoint failed on rank 1"), outs[0]
    assert "no checkpoint was written" in outs[0]["error"]
    assert sorted(os.listdir(target)) == []  # no tag, no 'latest', no temporary directory, lock released


def test_lora_in_dram_over_a_partitioned_base_resumes_and_exports_from_two_ranks(ranks):
    """DRAM placement: the adapters' state is replicated (rank 0's file), the frozen base partitioned."""
    export = os.path.join(ranks.root, "adapter-2")
    two = ranks.run(2, "lora", lora=True, save=os.path.join(ranks.root, "ckpt-lora"), save_at=2, export=export)
    with open(os.path.join(two[0]["saved"], "manifest.json")) as f:
        tensors = json.load(f)["tensors"]
    assert all(not t.get("partitioned") for n, t in tensors.items() if "lora_" in n)
    assert any(t.get("partitioned") for n, t in tensors.items() if "base_layer" in n)
    again = ranks.run(2, "lora-resume", lora=True, load=os.path.join(ranks.root, "ckpt-lora"))
    for r in range(2):
        _equal_weights(again[r], two[r], f"LoRA 2 -> 2 rank {r}")
    assert two[1]["exported"] == [] and two[1]["merged"] == [] and two[0]["exported"] and two[0]["merged"]
    adapter = load_file(os.path.join(export, "adapter_model.safetensors"))
    assert adapter and all("lora_" in n for n in adapter)
    merged = load_file(os.path.join(export + "-merged", "model.safetensors"))
    assert not any("lora_" in n for n in merged) and "model.layers.0.self_attn.q_proj.weight" in merged


def test_a_saved_ranks_rng_file_must_be_there_and_intact(tmp_path):
    """A rank the checkpoint was saved with needs its own RNG file, of the listed size and crc32c; only a
    rank beyond the saved world size takes rank 0's states."""
    from engine.checkpoint.rng import rank_rng, rng_file, rng_state

    data = json.dumps(rng_state()).encode()
    (tmp_path / rng_file(1)).write_bytes(data)
    manifest = dict(world_size=2, rng={"zero": True},
                    rng_files={rng_file(1): dict(bytes=len(data), crc32c=crc32c.crc32c(data))})
    state, source = rank_rng(str(tmp_path), manifest, 1)
    assert state == json.loads(data) and source.endswith(rng_file(1))
    assert rank_rng(str(tmp_path), manifest, 2)[0] == {"zero": True}  # saved with 2 ranks: rank 2 takes rank 0's
    (tmp_path / rng_file(1)).write_bytes(data[:-1] + b" ")
    with pytest.raises(CheckpointError, match="damaged"):
        rank_rng(str(tmp_path), manifest, 1)
    (tmp_path / rng_file(1)).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        rank_rng(str(tmp_path), manifest, 1)
