"""Parameter streaming: HF models with weights streamed from the TensorStore match the in-memory model.

Every comparison runs the same model twice - in memory, and with its large weights
streamed from a store in ``tmp_path`` - from identical weights and inputs, and
checks logits, loss and every parameter's gradient (fp32; relative error <= 1e-6,
in practice bit-identical). Two steps are run so that the second one uses the
recorded execution order for prefetching.
"""
from __future__ import annotations

import copy
import errno
import functools
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from helpers import assert_close  # noqa: E402

from engine import AsyncIO, AsyncIOError, PinnedPool  # noqa: E402
from engine.offload import (  # noqa: E402
    ParameterStreamer,
    StagingExhaustedError,
    initialize_into_store,
    is_placeholder,
    open_streamer,
    plan_staging,
)
from engine.offload.grad_hooks import GradientHooks  # noqa: E402
from engine.storage import TensorStore  # noqa: E402

THRESHOLD = 1024  # bytes: norms (256 B) stay resident, every projection and embedding is streamed
CHECKPOINTING = ("none", "reentrant", "non_reentrant")

transformers.logging.set_verbosity_error()


# ---------------------------------------------------------------------- helpers
def make_config(arch: str, tied: bool, layers: int = 2):
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=64, tie_word_embeddings=tied)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=256, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied,
                                       bos_token_id=0, eos_token_id=0)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=64, tie_word_embeddings=tied)
    raise ValueError(arch)


def model_class(arch: str):
    return {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
            "qwen2": transformers.Qwen2ForCausalLM}[arch]


def build(arch: str, tied: bool, layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = model_class(arch)(make_config(arch, tied, layers)).float()
    model.train()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    return model


def enable_checkpointing(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 16), generator=g)


def run_step(model: nn.Module, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: (p.grad.detach().clone() if p.grad is not None else None) for name, p in model.named_parameters()}
    return out.logits.detach().clone(), out.loss.detach().clone(), grads


@functools.lru_cache(maxsize=None)
def reference(arch: str, tied: bool, ckpt: str, layers: int = 2):
    model = build(arch, tied, layers)
    enable_checkpointing(model, ckpt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, run_step(model, batch())


def assert_same_results(got, expected) -> None:
    logits, loss, grads = got
    ref_logits, ref_loss, ref_grads = expected
    assert_close(logits, ref_logits, "logits")
    assert_close(loss, ref_loss, "loss")
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert g is not None, name
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close(grads[name], g, f"grad of {name}")


def streamed_copy(arch, tied, ckpt, layers=2):
    state, expected = reference(arch, tied, ckpt, layers)
    model = build(arch, tied, layers, seed=123)  # different init: the state dict must win
    model.load_state_dict(state)
    enable_checkpointing(model, ckpt)
    return model, expected


# ---------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("ckpt", CHECKPOINTING)
@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_training_step_matches_in_memory(arch, tied, depth, ckpt, store):
    model, expected = streamed_copy(arch, tied, ckpt)
    with ParameterStreamer(model, store, prefetch_depth=depth, resident_threshold_bytes=THRESHOLD) as streamer:
        for _ in range(2):
            assert_same_results(run_step(model, batch()), expected)
        stats = streamer.stats()
        assert stats["bytes_read"] > 0 and stats["reads"] > 0
        assert stats["pool"]["grown_slots"] == 0
        if depth:
            assert stats["prefetches"] > 0 and stats["hits"] > stats["misses"]
        else:
            assert stats["prefetches"] == 0
        assert stats["order_changes"] == 0
    # detach(restore=True) gives the model its weights back
    state = reference(arch, tied, ckpt)[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_streamed_matches_in_memory(tied, store):
    model, expected = streamed_copy("qwen2", tied, "none")
    with ParameterStreamer(model, store, prefetch_depth=1, resident_threshold_bytes=THRESHOLD):
        for _ in range(2):
            assert_same_results(run_step(model, batch()), expected)


@pytest.mark.parametrize("buffer_pool,pinned_alloc",
                         [("uniform", "exact"), ("adaptive", "torch"), ("uniform", "torch")])
@pytest.mark.parametrize("ckpt", ["none", "non_reentrant"])
def test_ablations_give_identical_results(buffer_pool, pinned_alloc, ckpt, store):
    model, expected = streamed_copy("llama", False, ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamer = ParameterStreamer(model, store, prefetch_depth=1, resident_threshold_bytes=THRESHOLD,
                                     buffer_pool=buffer_pool, pinned_alloc=pinned_alloc)
    with streamer:
        for _ in range(2):
            assert_same_results(run_step(model, batch()), expected)
        pool = streamer.stats()["pool"]
        assert pool["mode"] == buffer_pool and pool["pinned_alloc"] == pinned_alloc
        if buffer_pool == "uniform":
            largest = max(sp.slot_nbytes for sp in streamer.params.streamed.values())
            assert set(pool["classes"]) == {largest}
        if pinned_alloc == "torch":
            assert "pinned_pool" not in streamer.stats()


def test_files_store_layout(tmp_path):
    model, expected = streamed_copy("gpt2", True, "none")
    streamer = open_streamer(model, tmp_path, store="files", prefetch_depth=1, resident_threshold_bytes=THRESHOLD)
    try:
        assert streamer.store.layout == "files"
        for _ in range(2):
            assert_same_results(run_step(model, batch()), expected)
    finally:
        streamer.close()


def test_open_streamer_direct_registers_pool(tmp_path):
    model, expected = streamed_copy("llama", True, "none")
    streamer = open_streamer(model, tmp_path, prefetch_depth=2, resident_threshold_bytes=THRESHOLD)
    try:
        assert streamer.store.layout == "direct"
        assert_same_results(run_step(model, batch()), expected)
        assert streamer.stats()["pinned_pool"]["capacity"] == max(streamer.plan.total_bytes, 4096)
    finally:
        streamer.close()


# ---------------------------------------------------------------------- placeholders and memory
def test_streamed_parameters_hold_no_memory(store):
    model, _ = streamed_copy("llama", True, "none")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shapes = {name: (p.shape, p.dtype) for name, p in model.named_parameters()}
    streamer = ParameterStreamer(model, store, resident_threshold_bytes=THRESHOLD).attach()
    try:
        streamed = 0
        for name, p in model.named_parameters():
            assert (p.shape, p.dtype) == shapes[name]
            if p.numel() * p.element_size() > THRESHOLD:
                assert is_placeholder(p.data), name
                assert p.untyped_storage().nbytes() <= p.element_size()
                assert streamer.is_streamed(p)
                streamed += 1
            else:
                assert not is_placeholder(p.data)
        assert streamed == len(streamer.params.streamed) > 0
        # tied weights and HF accessors keep working
        assert model.lm_head.weight is model.get_input_embeddings().weight
        assert model.get_input_embeddings().weight.shape == (256, 64)
        assert model.device == torch.device("cpu") and model.dtype == torch.float32
        resident = streamer.resident_bytes()
        assert resident == streamer.stats()["resident_bytes"]
        assert resident < 0.01 * total
        # and after a step the weights are placeholders again
        run_step(model, batch())
        assert all(is_placeholder(sp.param.data) for sp in streamer.params.streamed.values())
    finally:
        streamer.detach()


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_staging_memory_is_bounded_by_depth_not_model_size(depth, tmp_path):
    reserved = {}
    for layers in (2, 6):
        model, _ = streamed_copy("llama", False, "non_reentrant", layers=layers)
        plan = plan_staging(model, prefetch_depth=depth, resident_threshold_bytes=THRESHOLD)
        with TensorStore(tmp_path, grow_step="8MiB") as store, \
                ParameterStreamer(model, store, prefetch_depth=depth, resident_threshold_bytes=THRESHOLD) as streamer:
            for _ in range(2):
                run_step(model, batch())
            stats = streamer.stats()
            largest_unit = max(sum(sp.slot_nbytes for _, sp in u.params) for u in streamer.params.units)
            pool = stats["pool"]
            assert pool["reserved_bytes"] == plan.total_bytes  # nothing grown
            assert pool["peak_held_bytes"] <= (depth + 2) * largest_unit
            assert stats["pinned_pool"]["capacity"] == max(plan.total_bytes, 4096)
            reserved[layers] = pool["reserved_bytes"]
            if layers == 6:
                assert pool["reserved_bytes"] < stats["streamed_bytes"] / 2
    assert reserved[2] == reserved[6]


def test_adaptive_pool_is_smaller_than_uniform():
    model = build("llama", False, layers=4)
    adaptive = plan_staging(model, prefetch_depth=1, resident_threshold_bytes=THRESHOLD)
    uniform = plan_staging(model, prefetch_depth=1, resident_threshold_bytes=THRESHOLD, buffer_pool="uniform")
    assert adaptive.total_bytes < uniform.total_bytes
    assert uniform.classes == {max(adaptive.classes): adaptive.window_tensors + 1}
    explicit = plan_staging(model, prefetch_depth=1, resident_threshold_bytes=THRESHOLD, buffer_pool="uniform",
                            buffer_count=5)
    assert explicit.slots == 5


# ---------------------------------------------------------------------- meta device
@pytest.mark.parametrize("source", ["initializer", "state_dict"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_meta_model_initialized_into_store_equals_normal_model(source, tied, store):
    state, expected = reference("llama", tied, "none")
    with torch.device("meta"):
        model = model_class("llama")(make_config("llama", tied))
    model.train()
    assert all(p.device.type == "meta" for p in model.parameters())
    calls = []
    if source == "initializer":
        def initializer(name, shape):
            calls.append(name)
            if name in state:
                assert tuple(state[name].shape) == shape
                return state[name].clone()
            return None  # non-persistent buffers (rotary inv_freq): computed by the model's _init_weights
        summary = initialize_into_store(model, store, initializer, resident_threshold_bytes=THRESHOLD)
        names = [n for n, _ in model.named_parameters()]
        assert [c for c in calls if c in names] == names  # each parameter once (tied ones under one name)
    else:
        summary = initialize_into_store(model, store, state_dict=iter(state.items()),
                                        resident_threshold_bytes=THRESHOLD)
        assert summary["unexpected"] == []
    assert summary["streamed"] > 0 and summary["resident"] > 0
    assert not any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    normal = build("llama", tied)
    for name, buf in normal.named_buffers():
        assert torch.equal(model.get_buffer(name), buf), name
    with ParameterStreamer(model, store, prefetch_depth=1, resident_threshold_bytes=THRESHOLD,
                           restore_on_exit=True) as streamer:
        assert streamer.stats()["bytes_written"] == 0  # already in the store
        assert_same_results(run_step(model, batch()), expected)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_meta_initializer_errors(store):
    with torch.device("meta"):
        model = model_class("llama")(make_config("llama", False))
    with pytest.raises(ValueError, match="shape"):
        initialize_into_store(model, store, lambda name, shape: torch.zeros(3), resident_threshold_bytes=THRESHOLD)
    with torch.device("meta"):
        model = model_class("llama")(make_config("llama", False))
    with pytest.raises(ValueError, match="no value"):
        initialize_into_store(model, store, state_dict={}, resident_threshold_bytes=THRESHOLD)
    with torch.device("meta"):
        model = model_class("llama")(make_config("llama", False))
    with pytest.raises(ValueError, match="meta device"):
        ParameterStreamer(model, store, resident_threshold_bytes=THRESHOLD).attach()


# ---------------------------------------------------------------------- gradients hook
@pytest.mark.parametrize("wiring", ["on_grad", "gradient_hooks"])
def test_on_grad_receives_every_gradient_instead_of_param_grad(store, wiring):
    model, expected = streamed_copy("llama", True, "reentrant")
    received: dict[str, torch.Tensor] = {}

    def on_grad(name, grad):
        received[name] = received[name] + grad if name in received else grad.clone()

    # the streamer's on_grad argument, or the gradient path's hooks installed next to the streamer
    hooks = GradientHooks(model, on_grad).install() if wiring == "gradient_hooks" else None
    kwargs = dict(on_grad=on_grad) if wiring == "on_grad" else {}
    with ParameterStreamer(model, store, prefetch_depth=1, resident_threshold_bytes=THRESHOLD, **kwargs):
        logits, loss, grads = run_step(model, batch())
        assert all(g is None for g in grads.values())
    if hooks is not None:
        hooks.remove()
    ref_logits, ref_loss, ref_grads = expected
    assert_close(logits, ref_logits, "logits")
    assert received.keys() == {n for n, _ in model.named_parameters()}
    for name, g in ref_grads.items():
        assert_close(received[name], g, f"grad of {name}")


# ---------------------------------------------------------------------- unusual modules
class SharedLinearModel(nn.Module):
    """Tied embedding/head and a linear called several times per forward, in a switchable order."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 32)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32, bias=False)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 128, bias=False)
        self.head.weight = self.embed.weight
        self.swap = False

    def forward(self, ids):
        h = self.embed(ids)
        first, second = (self.b, self.a) if self.swap else (self.a, self.b)
        h = torch.tanh(first(h))
        h = second(h) + h
        h = torch.sigmoid(self.a(self.norm(h)))  # ``a`` again
        return self.head(h)


def _shared_step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("depth", [0, 2])
def test_modules_called_twice_tied_and_order_changes(depth, store):
    torch.manual_seed(0)
    ref = SharedLinearModel()
    model = copy.deepcopy(ref)
    ids = torch.randint(0, 128, (3, 7))
    expected = {swap: None for swap in (False, True)}
    for swap in expected:
        ref.swap = swap
        expected[swap] = _shared_step(ref, ids)
    with ParameterStreamer(model, store, prefetch_depth=depth, resident_threshold_bytes=1024) as streamer:
        assert model.head.weight is model.embed.weight
        for swap in (False, False, True, True, False, False):
            model.swap = swap
            assert_same_results(_shared_step(model, ids), expected[swap])
        stats = streamer.stats()
        # the recorded order was replaced when the order changed (to swapped and back)
        assert stats["order_changes"] == 2
        order = streamer.execution_order
        assert [name for kind, name in order if kind == "F"] == ["embed", "a", "b", "a", "head"]


class RootOwnsWeight(nn.Module):
    """The root module owns a streamed weight and calls a streamed child inside its own forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 48) / 6)
        self.lin = nn.Linear(48, 32)

    def forward(self, x):
        h = torch.tanh(x @ self.w)
        return (self.lin(h) * x).sum() + (h @ self.w.t()).pow(2).sum()


@pytest.mark.parametrize("depth", [0, 1])
def test_root_and_nested_units(depth, store):
    torch.manual_seed(0)
    ref = RootOwnsWeight()
    model = copy.deepcopy(ref)
    x = torch.randn(5, 32)
    ref(x).backward()
    with ParameterStreamer(model, store, prefetch_depth=depth, resident_threshold_bytes=1024) as streamer:
        assert [u.name for u in streamer.params.units] == ["", "lin"]
        for _ in range(2):
            model.zero_grad()
            out = model(x)
            out.backward()
            assert_close(out.detach(), ref(x).detach(), "output")
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                assert_close(p.grad, q.grad, name)


def test_gradient_accumulation_over_two_forwards(store):
    model, _ = streamed_copy("llama", False, "none")
    ref = build("llama", False)
    ref.load_state_dict(model.state_dict())
    ids1, ids2 = batch(1), batch(2)
    ref.zero_grad()
    ref(input_ids=ids1, labels=ids1).loss.backward()
    ref(input_ids=ids2, labels=ids2).loss.backward()
    loss_sum_ref = None
    with ParameterStreamer(model, store, prefetch_depth=1, resident_threshold_bytes=THRESHOLD):
        for _ in range(2):
            model.zero_grad()
            l1 = model(input_ids=ids1, labels=ids1).loss
            l2 = model(input_ids=ids2, labels=ids2).loss
            (l1 + l2).backward()
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                assert_close(p.grad, q.grad, name)
        # inference without grad also works and does not disturb the training order
        with torch.no_grad():
            loss_sum_ref = model(input_ids=ids1, labels=ids1).loss
    assert torch.isfinite(loss_sum_ref)


def test_inference_mode_then_training(store):
    model, expected = streamed_copy("llama", False, "none")
    with ParameterStreamer(model, store, prefetch_depth=2, resident_threshold_bytes=THRESHOLD) as streamer:
        with torch.inference_mode():
            logits = model(input_ids=batch()).logits
        assert_close(logits, expected[0], "inference logits")
        for _ in range(2):
            assert_same_results(run_step(model, batch()), expected)
        assert streamer.stats()["traces_recorded"] >= 1


# ---------------------------------------------------------------------- failures
def test_io_error_surfaces_and_streamer_recovers(tmp_path):
    model, expected = streamed_copy("llama", False, "none")
    with AsyncIO() as io, TensorStore(tmp_path, io=io, grow_step="8MiB") as store:
        streamer = ParameterStreamer(model, store, prefetch_depth=1, resident_threshold_bytes=THRESHOLD).attach()
        try:
            io.inject_fault(3, errno.EIO)
            with pytest.raises(AsyncIOError):
                run_step(model, batch())
            # the failed forward left no weight materialized, and the next step works
            assert all(is_placeholder(sp.param.data) for sp in streamer.params.streamed.values())
            assert_same_results(run_step(model, batch()), expected)
        finally:
            streamer.detach()


def test_too_small_pool_says_so(store):
    model, _ = streamed_copy("llama", False, "none")
    pool = PinnedPool(64 * 1024, lock=False)
    with pytest.raises(MemoryError):
        ParameterStreamer(model, store, pool, resident_threshold_bytes=THRESHOLD).attach()
    pool.close()


def test_uniform_pool_with_too_few_slots_says_so(store):
    model, _ = streamed_copy("llama", False, "non_reentrant")
    with ParameterStreamer(model, store, prefetch_depth=0, resident_threshold_bytes=THRESHOLD,
                           buffer_pool="uniform", buffer_count=1,
                           pool=PinnedPool(plan_staging(model, prefetch_depth=0, resident_threshold_bytes=THRESHOLD,
                                                        buffer_pool="uniform", buffer_count=1).total_bytes,
                                           lock=False)):
        # non-reentrant checkpointing recomputes a layer while backward still uses a weight: 2 slots needed
        with pytest.raises(StagingExhaustedError, match="no staging slot"):
            run_step(model, batch())


def test_bad_arguments(store):
    model = build("llama", False)
    with pytest.raises(ValueError):
        ParameterStreamer(model, store, buffer_pool="exact")
    with pytest.raises(ValueError):
        ParameterStreamer(model, store, pinned_alloc="cuda")
    with pytest.raises(ValueError):
        ParameterStreamer(model, store, prefetch_depth=-1)
    with pytest.raises(ValueError):
        ParameterStreamer(model, store, PinnedPool(4096, lock=False), pinned_alloc="torch")


# ---------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("ckpt", ["none", "non_reentrant"])
@pytest.mark.parametrize("depth", [0, 2])
def test_cuda_streaming_matches_in_memory(depth, ckpt, store):
    state, _ = reference("llama", True, ckpt)
    ref = build("llama", True).cuda()
    ref.load_state_dict(state)
    enable_checkpointing(ref, ckpt)
    ids = batch().cuda()
    expected = run_step(ref, ids)
    model = build("llama", True, seed=5)
    model.load_state_dict(state)
    enable_checkpointing(model, ckpt)
    with ParameterStreamer(model, store, prefetch_depth=depth, resident_threshold_bytes=THRESHOLD,
                           device="cuda") as streamer:
        assert model.device.type == "cuda"
        for _ in range(2):
            got = run_step(model, ids)
            torch.cuda.synchronize()
            assert_same_results(got, expected)
        assert streamer.stats()["pinned_pool"]["capacity"] > 0


def test_a_failed_attach_gives_the_model_its_weights_back(store):
    """A write fails part-way through attach (the third tensor moved to the store): the weights
    already made placeholders come back, so the in-memory model loses nothing and still runs."""
    model = build("llama", False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    streamer = ParameterStreamer(model, store, prefetch_depth=1, resident_threshold_bytes=THRESHOLD)
    assert len(streamer.params.streamed) > 3
    store._io.inject_fault(3, errno.EIO)
    with pytest.raises(AsyncIOError):
        streamer.attach()
    assert not streamer.attached
    for name, p in model.named_parameters():
        assert not is_placeholder(p.data) and type(p) is nn.Parameter, name
        assert torch.equal(p.detach(), before[name]), name
    model(batch()).logits.sum()  # runs on its own weights
