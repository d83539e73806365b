"""The compute-device data path: the "separate" CPU mode (copies out of staging, gradients copied
back, resident values refreshed) trains exactly as torch in memory; CUDA-marked twins run on a GPU."""
from __future__ import annotations

import collections
import copy
import math
import types
from collections.abc import Mapping

import helpers
import pytest
import torch
from helpers import ACCUMULATING, batches, engine_config, reference_run, tiny_llama, train_steps, trainable

import engine
from engine import PinnedPool
from engine.devices import resolve_device
from engine.offload.device_copy import device_grad_norm, inputs_to_device
from engine.offload.gradients import GradientOffload
from engine.offload.params import is_placeholder
from engine.offload.stepper import ParamSpec
from engine.optim import kernels
from engine.storage import TensorStore

peft = pytest.importorskip("peft")

LR = 1e-3
MiB = 1 << 20
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def config(tmp_path, **overrides) -> engine.Config:
    return engine_config(tmp_path, lr=LR, **{**ACCUMULATING, **overrides})


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).float()
    g = torch.Generator().manual_seed(5)
    # Biases of pretrained size, not a fresh init's zeros: the key bias's gradient is mathematically zero
    # (softmax ignores a shift), so what autograd computes for it is rounding noise that Adam turns into
    # +-lr steps in any summation order - against a zero bias that dominates the relative error (on
    # the "cpu" device alike: 2e-4 measured with zeros, 1.6e-5 with 0.02-sized biases).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def peft_llama():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: give it values so both adapter paths train from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


MODELS = {"llama": tiny_llama, "gpt2": gpt2, "peft-llama": peft_llama}


def checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()


def in_arena(trainer, t: torch.Tensor) -> bool:
    pool = trainer.runtime.pool
    ptr = t.untyped_storage().data_ptr()
    return pool.base <= ptr < pool.base + pool.capacity


def watch_weights(trainer) -> list[bool]:
    """Forward pre-hooks (after the streamer's) recording, per real streamed weight, whether it views the arena."""
    seen: list[bool] = []
    streamed = {id(sp.param) for sp in trainer.runtime.streamer.params.streamed.values()}

    def hook(module, args):
        for p in module.parameters(recurse=False):
            if id(p) in streamed and not is_placeholder(p.data):
                seen.append(in_arena(trainer, p.data))

    for m in trainer.module.modules():
        m.register_forward_pre_hook(hook)
    return seen


def parity(tmp_path, name: str, ckpt: bool, device: str, steps: int = 3) -> dict:
    ref = MODELS[name]()
    model = copy.deepcopy(ref)
    for m in (ref, model):
        checkpointing(m, ckpt)
    data = batches(2 * steps)
    params = [p for p in ref.parameters() if p.requires_grad]
    # the reference's sqrt correctly rounded (helpers.correctly_rounded_sqrt): GPT-2's zero-initialized
    # biases make Adam amplify MKL's 1-ulp sqrt differences past 1e-5 on the CPU device as well
    ref_losses = reference_run(ref, data, steps, lr=LR, params=params, ieee_sqrt=True)
    with engine.initialize(model, config(tmp_path, device=device)) as trainer:
        assert str(trainer.runtime.device) == str(resolve_device(device))
        seen = watch_weights(trainer)
        losses = train_steps(trainer, data, steps)
        ref_trainable = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
        helpers.assert_same_training(ref_trainable, ref_losses, losses, trainer.parameter, nonempty=True)
        # the module's own resident trainable parameters follow the masters (refresh / copy back)
        mod = dict(trainer.module.named_parameters())
        for n, p in ref_trainable:
            if not is_placeholder(mod[n].data):
                got = mod[n].detach().cpu()
                assert ((got - p.detach()).norm() / p.detach().norm()).item() <= 1e-5, n
        report = trainer.memory_report()
    assert seen and not any(seen), "a weight computed with is a view of a staging slot"
    return report


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("name", list(MODELS))
def test_separate_device_matches_torch_in_memory(tmp_path, name, ckpt):
    report = parity(tmp_path, name, ckpt, "separate")
    assert report["device"] == "separate (cpu)"
    assert report["h2d_bytes"] > 0 and report["d2h_bytes"] > 0 and report["h2d_wait_s"] >= 0
    assert report["gpu_peak_allocated_bytes"] == 0 == report["gpu_peak_reserved_bytes"]


def test_cpu_device_stages_weights_in_the_arena_and_counts_no_copies(tmp_path):
    """The control: on "cpu" the weight *is* its slot (the arena check above can see it)."""
    model = tiny_llama()
    with engine.initialize(model, config(tmp_path, device="cpu")) as trainer:
        seen = watch_weights(trainer)
        train_steps(trainer, batches(2), 1)
        report = trainer.memory_report()
    assert seen and all(seen)
    assert report["device"] == "cpu"
    assert report["h2d_bytes"] == report["d2h_bytes"] == 0 == report["streamer"]["h2d_copies"]


def test_separate_copies_count_exactly_what_was_streamed(tmp_path):
    """Without prefetching every read is a demand read used at once: one copy per read, the
    copied bytes those weights' bytes; the gradient copies are every trainable parameter's
    gradient bytes, once per micro-batch."""
    model = tiny_llama()
    with engine.initialize(model, config(tmp_path, device="separate", prefetch_depth=0)) as trainer:
        runtime = trainer.runtime
        streamer = runtime.streamer
        read, real = [], runtime.store.read_into
        sizes = {sp.key: math.prod(sp.shape) * sp.param.element_size() for sp in streamer.params.streamed.values()}

        def recording(key, *a, **kw):
            if key in sizes:
                read.append(key)
            return real(key, *a, **kw)

        runtime.store.read_into = recording
        streamer.reset_stats()
        x = batches(1)[0]
        trainer.backward(trainer(input_ids=x, labels=x).loss)  # one micro-batch, no optimizer step
        runtime.store.read_into = real
        s = streamer.stats()
        assert s["reads"] == len(read) == s["h2d_copies"] > 0
        assert s["h2d_bytes"] == sum(sizes[k] for k in read) == runtime.stats().h2d_bytes
        grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # fp32, untied
        assert runtime.stats().d2h_bytes == grads
        trainer.step()
        trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()  # the boundary: resident trainables refreshed from the store, counted as H2D
        refreshed = sum(p.numel() * p.element_size() for p in runtime.resident_trainables.values())
        assert refreshed > 0 and runtime.stats().h2d_bytes == streamer.stats()["h2d_bytes"] + refreshed


@pytest.mark.parametrize("name", ["llama", "peft-llama"])
def test_separate_device_checkpoint_round_trip(tmp_path, name):
    """Save after 2 steps in separate mode, continue 2 more; a fresh separate-mode trainer that loads
    the checkpoint continues identically (masters distinct from the module included)."""
    data = batches(8)
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with engine.initialize(MODELS[name](), config(tmp_path / "a", device="separate")) as trainer:
        train_steps(trainer, data[:4], 2)
        trainer.save_checkpoint(ckpt)
        losses = train_steps(trainer, data[4:], 2)
        expected = {n: trainer.parameter(n).clone() for n, p in trainer.module.named_parameters() if p.requires_grad}
    torch.manual_seed(123)
    fresh = MODELS[name]()
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(0.5)  # other values: the checkpoint must replace them
    with engine.initialize(fresh, config(tmp_path / "b", device="separate")) as trainer:
        trainer.load_checkpoint(ckpt)
        assert train_steps(trainer, data[4:], 2) == losses
        for n, v in expected.items():
            assert torch.equal(trainer.parameter(n), v), n


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_device_grad_norm_flags_what_the_fused_kernel_flags(bad):
    g = torch.randn(10_000)
    s, flagged = kernels.grad_stats(g)
    n = device_grad_norm(g).item()
    assert not flagged and math.isclose(n * n, s, rel_tol=1e-5)
    g[1234] = bad
    assert kernels.grad_stats(g)[1] and not math.isfinite(device_grad_norm(g).item())


def test_separate_device_with_the_flat_gradient_buffer_matches_torch_in_memory(tmp_path):
    """The flat ablation on a copying device: each gradient copied into the host buffer (and added
    to it over the accumulation window), its statistics on the host; fp32 within 1e-5 of torch."""
    ref, model = tiny_llama(), tiny_llama()
    data = batches(6)
    ref_losses = reference_run(ref, data, 3, lr=LR, ieee_sqrt=True)
    with engine.initialize(model, config(tmp_path, device="separate", grad_buffer="flat")) as trainer:
        assert trainer.runtime.gradients.grad_buffer == "flat"
        losses = train_steps(trainer, data, 3)
        helpers.assert_same_training(ref.named_parameters(), ref_losses, losses, trainer.parameter, nonempty=True)
        numel = sum(p.numel() for p in ref.parameters())
        assert trainer.memory_report()["d2h_bytes"] == 6 * numel * 4  # every micro-batch's fp32 gradients


def _offload(store, pool, shapes):
    specs = [ParamSpec(n, s) for n, s in shapes.items()]
    return GradientOffload(store, pool, specs, device=resolve_device("separate"))


def _counting_recounts(monkeypatch) -> list:
    calls: list = []
    original = GradientOffload._recount_from_store

    def counted(self, name):
        calls.append(name)
        original(self, name)
    monkeypatch.setattr(GradientOffload, "_recount_from_store", counted)
    return calls


def test_a_huge_finite_device_gradient_gets_the_exact_fp64_norm(tmp_path, monkeypatch):
    shapes = {"huge": (3000,), "normal": (500,), "big": (40, 25)}
    grads = {"huge": torch.full((3000,), 3e18), "normal": torch.randn(500), "big": torch.randn(40, 25) * 1e19}
    grads["huge"][7] = -1e20
    assert math.isinf(device_grad_norm(grads["huge"]).item())  # the fp32 sum of squares overflows
    recounts = _counting_recounts(monkeypatch)
    with PinnedPool(4 * MiB) as pool, TensorStore(str(tmp_path), pool=pool) as store:
        off = _offload(store, pool, shapes)
        off.begin_window()
        for n, g in grads.items():
            off.add(n, g, first=True, last=True)
        norm, bad = off.finish()
        expected = torch.cat([g.flatten() for g in grads.values()]).double().norm().item()
        assert not bad and math.isclose(norm, expected, rel_tol=1e-6)
        assert sorted(recounts) == ["big", "huge"]  # only the overflowed ones are read back
        off.begin_window()  # an ordinary window: nothing read back (no extra cost)
        for n, g in grads.items():
            off.add(n, torch.randn(g.shape), first=True, last=True)
        assert math.isfinite(off.finish()[0]) and len(recounts) == 2
        off.close()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_device_gradient_beside_a_huge_one_is_flagged(tmp_path, monkeypatch, bad):
    recounts = _counting_recounts(monkeypatch)
    with PinnedPool(MiB) as pool, TensorStore(str(tmp_path), pool=pool) as store:
        off = _offload(store, pool, {"a": (1000,), "b": (1000,), "c": (10,)})
        off.begin_window()
        a, b = torch.full((1000,), 1e19), torch.full((1000,), 1e19)
        b[3] = bad
        for n, g in (("a", a), ("b", b), ("c", torch.ones(10))):
            off.add(n, g, first=True, last=True)
        norm, flagged = off.finish()
        assert flagged and math.isinf(norm)
        # a NaN decides at once; an inf is told from an overflow by the host count of that gradient
        assert len(recounts) <= (0 if math.isnan(bad) else 2)
        off.close()


def test_huge_finite_gradients_are_clipped_in_separate_mode_as_on_the_cpu(tmp_path, monkeypatch):
    """A loss scaled by 1e20 (fp32): every gradient's norm is far above the fp32 sum of squares'
    range; the step must be taken and clipped exactly as the CPU path (fp64 kernel) takes it."""
    data = batches(3)
    recounts = _counting_recounts(monkeypatch)
    results = {}
    for device in ("cpu", "separate"):
        (tmp_path / device).mkdir()
        cfg = engine_config(tmp_path / device, lr=LR, gradient_clipping=1.0, device=device)
        with engine.initialize(tiny_llama(), cfg) as trainer:
            for x in data:
                out = trainer(input_ids=x, labels=x)
                trainer.backward(out.loss * 1e20)
                trainer.step()
                assert math.isfinite(trainer.runtime.last_grad_norm) and trainer.runtime.last_grad_norm > 1e19
            assert trainer.runtime.skipped_steps == 0 and trainer.runtime.global_steps == 3
            results[device] = {n: trainer.parameter(n).clone() for n, _ in trainable(trainer.module)}
    assert recounts  # the separate mode went through the device norms and read the overflowed ones back
    for n, want in results["cpu"].items():
        got = results["separate"][n]
        assert ((got - want).norm() / want.norm()).item() <= 1e-5, n


def _leaves(value):
    """Every tensor inside ``value``, at any depth."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)


def test_forward_moves_cpu_tensors_at_any_depth_keeping_container_types():
    from transformers import BatchEncoding
    from transformers.modeling_outputs import CausalLMOutputWithPast

    meta = torch.device("meta")
    Pair = collections.namedtuple("Pair", "left right")
    x, y = torch.ones(2), torch.zeros(3)
    be = BatchEncoding({"input_ids": x, "extra": [{"deep": (y, Pair(x, "tag"))}]})
    out = CausalLMOutputWithPast(loss=x, logits=y)
    od = collections.OrderedDict(a=[[[x]]], b=7)
    args, kwargs = inputs_to_device((be, Pair(left=x, right=[y]), od, 7, "s"),
                                    {"ids": y, "out": out, "nested": ({"deep": [x, None]},)}, meta)
    assert len(list(_leaves((args, kwargs)))) == 10
    assert all(t.is_meta for t in _leaves((args, kwargs)))
    moved_be, pair, moved_od = args[0], args[1], args[2]
    assert type(moved_be) is BatchEncoding and moved_be.input_ids.is_meta  # attribute access still works
    assert type(moved_be["extra"][0]["deep"][1]) is Pair and moved_be["extra"][0]["deep"][1].right == "tag"
    assert type(pair) is Pair and pair.left.is_meta and type(pair.right) is list
    assert type(moved_od) is collections.OrderedDict and list(moved_od) == ["a", "b"] and moved_od["b"] == 7
    assert type(kwargs["out"]) is CausalLMOutputWithPast and kwargs["out"].logits.is_meta
    assert kwargs["out"][1].is_meta  # a ModelOutput's positional view follows its fields
    assert kwargs["nested"][0]["deep"][1] is None and args[3:] == (7, "s")
    # the caller's containers are not changed
    assert be["input_ids"] is x and out.logits is y and od["a"][0][0][0] is x


def test_forward_inputs_with_nothing_to_move_are_passed_as_they_are():
    meta = torch.device("meta")
    m = torch.ones(2, device="meta")
    nested = {"a": [m, (1, "x")], "b": collections.OrderedDict(c=m)}
    args, kwargs = inputs_to_device((nested,), {"k": [m]}, meta)
    assert args[0] is nested and kwargs["k"][0] is m


def test_forward_inputs_a_mapping_that_cannot_be_rebuilt_becomes_a_dict_with_a_warning():
    meta = torch.device("meta")
    frozen = types.MappingProxyType({"ids": torch.ones(2), "n": 3})
    with pytest.warns(UserWarning, match="mappingproxy.*plain dict"):
        (moved,), _ = inputs_to_device((frozen,), {}, meta)
    assert type(moved) is dict and moved["ids"].is_meta and moved["n"] == 3


def test_forward_inputs_a_container_that_contains_itself_is_not_followed_forever():
    meta = torch.device("meta")
    loop: list = [torch.ones(1)]
    loop.append(loop)
    (moved,), _ = inputs_to_device((loop,), {}, meta)
    assert moved[0].is_meta and moved[1] is loop


def test_cuda_device_without_cuda_is_an_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(engine.errors.ConfigError, match="CUDA is not available"):
        engine.initialize(tiny_llama(), config(tmp_path, device="cuda"))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["llama", "peft-llama"])
def test_cuda_device_matches_torch_in_memory(tmp_path, name):
    report = parity(tmp_path, name, False, "cuda")
    assert report["device"].startswith("cuda")
    assert report["h2d_bytes"] > 0 and report["d2h_bytes"] > 0 and report["gpu_peak_allocated_bytes"] > 0
