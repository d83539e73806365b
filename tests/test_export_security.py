"""save_adapter / merge_and_export: private files whatever the umask, and no write follows a planted symlink."""
from __future__ import annotations

import os
import stat

import helpers
import pytest
import torch
from transformers import LlamaForCausalLM

import engine
from engine.peft import LoraConfig, apply_lora

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]
KINDS = ["adapter-builtin", "adapter-peft", "merge-builtin", "merge-peft"]
# every name an export writes (merge with a small max_shard_size: several shards and an index)
FINAL_NAMES = ["adapter_model.safetensors", "adapter_config.json", "README.md", "model.safetensors",
               "model.safetensors.index.json", "config.json"] + \
              [f"model-{i:05d}-of-{n:05d}.safetensors" for n in range(1, 9) for i in range(1, n + 1)]
SHARD = "20KiB"


def tiny_llama() -> LlamaForCausalLM:
    return helpers.tiny_llama(layers=1, vocab=64, hidden=32, inter=64, positions=32)


def lora_model(kind: str) -> torch.nn.Module:
    if kind.endswith("builtin"):
        model = apply_lora(tiny_llama(), LoraConfig(r=2, alpha=4, target_modules=TARGETS))
    else:
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter an effect the loads can check
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def export(kind: str, model: torch.nn.Module, out) -> list[str]:
    if kind.startswith("adapter"):
        return engine.peft.save_adapter(model, out)
    return engine.peft.merge_and_export(model, out, max_shard_size=SHARD)


def assert_loads(kind: str, model: torch.nn.Module, out) -> None:
    """The export loads in peft / transformers and computes what the model computes."""
    x = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=x).logits
        if kind.startswith("adapter"):
            loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
        else:
            loaded = LlamaForCausalLM.from_pretrained(str(out))
        got = loaded(input_ids=x).logits
    if kind.startswith("adapter"):
        assert torch.equal(got, expected)  # the same weights and the same computation: exact (measured 0)
    else:
        # merged: W + s*B@A rounded once; in memory x@W + s*(x@A)@B - a different fp32 summation
        # order. Measured: max abs difference 6.0e-8 (2 ulp at the logits' scale of 0.35); atol 1e-6
        # leaves room for other BLAS kernels without hiding a wrong weight (errors of order 1e-2).
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.fixture
def umask_000():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("kind", KINDS)
def test_exports_are_private_under_umask_000(kind, tmp_path, umask_000):
    model = lora_model(kind)
    out = tmp_path / "out"  # created by the export
    files = export(kind, model, out)
    assert files and all(os.path.dirname(f) == str(out) for f in files)
    seen = []
    for root, _dirs, names in os.walk(out):
        assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700, root
        for name in names:
            mode = os.lstat(os.path.join(root, name)).st_mode
            assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600, (name, oct(mode))
            seen.append(name)
    assert sorted(seen) == sorted(os.path.basename(f) for f in files)  # no temporary left behind
    if kind.startswith("merge"):
        assert "model.safetensors.index.json" in seen
    assert_loads(kind, model, out)


@pytest.mark.parametrize("kind", KINDS)
def test_planted_symlinks_do_not_redirect_an_export(kind, tmp_path):
    model = lora_model(kind)
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"must stay")
    planted = []
    for name in FINAL_NAMES:  # the old predictable temporary names, and the final ones
        for link in (out / f"{name}.tmp-{os.getpid()}", out / name):
            link.symlink_to(victim)
            planted.append(link)
    files = export(kind, model, out)
    assert victim.read_bytes() == b"must stay"
    for f in files:
        assert stat.S_ISREG(os.lstat(f).st_mode), f  # the link was replaced, not followed
    for link in planted:  # links at names this export does not write would only confuse the loaders
        if link.is_symlink():
            link.unlink()
    assert_loads(kind, model, out)


def test_a_named_peft_adapter_goes_to_its_private_subdirectory(tmp_path, umask_000):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS),
                                adapter_name="custom")
    out = tmp_path / "out"
    files = engine.peft.save_adapter(model, out)
    assert {os.path.relpath(f, out) for f in files} >= {"custom/adapter_model.safetensors",
                                                        "custom/adapter_config.json"}
    for root, _dirs, names in os.walk(out):
        assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700, root
        assert all(stat.S_IMODE(os.lstat(os.path.join(root, n)).st_mode) == 0o600 for n in names), names
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    peft.PeftModel.from_pretrained(tiny_llama(), str(out / "custom"))


def test_a_directory_swapped_in_during_the_commit_is_not_written_through(tmp_path, monkeypatch):
    """A subdirectory replaced by a symlink after it was checked: the commit is relative to the
    directory it opened, so nothing lands in the link's target."""
    from engine.peft.adapters import PrivateOutput

    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    real_fchmod, swapped = os.fchmod, []

    def fchmod(fd, mode):  # just before the file is renamed into out/sub
        if not swapped and "/sub/" in os.readlink(f"/proc/self/fd/{fd}"):
            os.rename(out / "sub", out / "sub-real")
            os.symlink(victim, out / "sub")
            swapped.append(True)
        return real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod)
    with PrivateOutput(out) as po:
        os.mkdir(os.path.join(po.tmp, "sub"))  # as peft writes a named adapter
        with open(os.path.join(po.tmp, "sub", "x.json"), "w") as f:
            f.write("{}")
        po.commit_all()
    assert swapped and os.listdir(victim) == []
    assert (out / "sub-real" / "x.json").read_text() == "{}"


def test_a_planted_subdirectory_link_is_refused(tmp_path):
    from engine.checkpoint import CheckpointError
    from engine.peft.adapters import PrivateOutput

    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(victim)
    with pytest.raises(CheckpointError, match="symbolic link"), PrivateOutput(out) as po:
        os.mkdir(os.path.join(po.tmp, "sub"))
        (open(os.path.join(po.tmp, "sub", "x.json"), "w")).close()
        po.commit_all()
    assert os.listdir(victim) == [] and not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_each_written_file_is_fsynced_once(tmp_path, monkeypatch):
    from engine.peft.adapters import PrivateOutput

    real_fsync, files = os.fsync, []

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            files.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with PrivateOutput(tmp_path / "out") as po:
        po.write("a.json", b"{}")
        po.write("b.json", b"[]")
    assert files == ["a.json", "b.json"]
    assert (tmp_path / "out" / "b.json").read_bytes() == b"[]"


def test_an_existing_export_directory_keeps_its_mode_new_ones_are_0700(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)  # the user's choice: kept
    old = os.umask(0o022)  # os.makedirs would create the parent "a" 0755 under it
    try:
        engine.peft.save_adapter(lora_model("adapter-builtin"), mine / "a" / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in (mine / "a", mine / "a" / "b"))


@pytest.mark.parametrize("export", ["save_adapter", "merge_and_export"])
def test_weights_are_written_inside_the_opened_directory_even_if_it_is_swapped(tmp_path, monkeypatch, export):
    """The output directory is replaced by a link to a look-alike (its temporary directory's name
    recreated there) just before the weights are written: they still go into the directory that was
    opened (relative to its descriptor), nothing into the look-alike."""
    import engine.checkpoint.hf_writer as hf_writer
    import engine.peft.adapters as adapters

    out, victim = tmp_path / "out", tmp_path / "victim"
    module = adapters if export == "save_adapter" else hf_writer
    real_write = module.write_safetensors

    def swap_then_write(path, *args, **kwargs):
        tmp = os.path.basename(os.path.dirname(path))
        if not victim.exists():
            os.rename(out, tmp_path / "out-real")
            (victim / tmp).mkdir(parents=True)
            os.symlink(victim, out)
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(module, "write_safetensors", swap_then_write)
    model = lora_model("adapter-builtin")
    if export == "save_adapter":
        engine.peft.save_adapter(model, out)
        weights = "adapter_model.safetensors"
    else:
        engine.peft.merge_and_export(model, out, max_shard_size=SHARD)
        weights = "model.safetensors.index.json"  # and its shards, listed in it
    assert victim.exists() and [n for _, _, names in os.walk(victim) for n in names] == []
    assert (tmp_path / "out-real" / weights).is_file()
