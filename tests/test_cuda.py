"""Training on a CUDA GPU (issue 14): parity with plain PyTorch in memory on the same GPU, every
weight streamed NVMe -> pinned pool -> GPU; GPU peak against the planner; the copy streams'
counters; the pinned pool registered with CUDA and copies from it asynchronous.

Every test here carries the ``cuda`` marker and is skipped without a GPU (``python -m pytest
-m cuda tests`` runs them; ``benchmarks/gpu_check.py`` does so on a GPU machine). The
test-only ``device="separate"`` mode runs the same copy logic on the CPU in every CI run.
"""
from __future__ import annotations

import time

import pytest
import torch
from helpers import ACCUMULATING, batches, engine_config, reference_run, tiny_llama, train_steps
from helpers import assert_same_training as assert_same

import engine
from engine.bench import init_value
from engine.memory.pool import PinnedPool
from engine.offload import gradients as gradients_module
from engine.offload.params import is_placeholder

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LR = 1e-3
# Every parameter of more than one element streams (threshold 0): nothing sits on the GPU for good.
ALL_STREAMED = dict(resident_threshold_bytes=0)
MiB = 1 << 20


@pytest.fixture(autouse=True)
def fp32_matmuls():
    """fp32 parity needs fp32 matmuls: with TF32 (a 10-bit mantissa) the reference itself would be
    1e-3 off what fp32 computes. Both sides run in this process, so both see this setting."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_config(tmp_path, **overrides) -> engine.Config:
    return engine_config(tmp_path, lr=LR, device="cuda", **{**ACCUMULATING, **ALL_STREAMED, **overrides})


def assert_everything_streamed(trainer) -> None:
    assert trainer.runtime.device.kind == "cuda"
    assert not trainer.runtime.streamer.params.resident, [n for n, _ in trainer.runtime.streamer.params.resident]
    assert trainer.runtime.streamer.params.streamed


# ---------------------------------------------------------------------- parity with torch on the GPU
@pytest.mark.parametrize("tied,checkpointing", [(False, False), (True, False), (False, True)])
def test_fp32_training_matches_torch_on_the_same_gpu(tmp_path, tied, checkpointing):
    """fp32 within 1e-5 (losses and every weight) of torch.optim.AdamW in memory on this GPU.
    The engine is given a CPU model and CPU batches: the runtime moves the batches (README)."""
    ref, model = tiny_llama(tied).cuda(), tiny_llama(tied)  # the same seed: the same weights
    if checkpointing:
        ref.gradient_checkpointing_enable()
        model.gradient_checkpointing_enable()
    data = batches(12)
    # ieee_sqrt: the reference's square root correctly rounded, as the fused CPU kernel's is,
    # whatever the backend's sqrt does (helpers.correctly_rounded_sqrt).
    ref_losses = reference_run(ref, [x.cuda() for x in data], 6, lr=LR, ieee_sqrt=True)
    with engine.initialize(model, cuda_config(tmp_path)) as trainer:
        assert_everything_streamed(trainer)
        losses = train_steps(trainer, data, 6)
        assert_same(((n, p.detach().cpu()) for n, p in ref.named_parameters()), ref_losses, losses,
                    lambda name: trainer.parameter(name).cpu(), nonempty=True)


# bf16 bound: bf16 keeps 8 significant bits, so each rounding is within u = 2^-9 relative. At step
# 0 the matmuls see the same bf16 weights on both sides (autocast casts the fp32 weights, the
# engine stores them in bf16); what differs is the rest: under autocast the residual stream, the
# norms' weights and the embeddings stay fp32, in the engine they are bf16 - about 6 extra
# roundings per layer, so with 2 layers and the lm_head ~13u ~ 2.5% relative on the logits in the
# worst case (errors add at most linearly); cross entropy over 256 classes moves by less than its
# logits' relative error times the loss. Later steps add the drift those differences cause in the
# updates (bounded, lr 3e-3 x 15 steps). 3% of the loss per step is that bound - the one the CPU
# bf16 test (tests/test_trainer.py) asserts and meets. PROVISIONAL: derived, not yet measured on
# a GPU; benchmarks/gpu_check.py runs this test there, and the bound is to be revisited with what
# it measures (tighten it if the measured gap is far below, never loosen it to pass).
BF16_LOSS_RTOL = 0.03


def test_bf16_training_follows_an_autocast_reference_on_the_same_gpu(tmp_path):
    ref, model = tiny_llama().cuda(), tiny_llama()
    x = batches(1)[0]
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.0)
    ref_losses = []
    xc = x.cuda()
    for _ in range(15):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ref(input_ids=xc, labels=xc).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    config = cuda_config(tmp_path, dtype="bf16", gradient_accumulation_steps=1,
                         optimizer=engine.AdamWConfig(lr=3e-3, weight_decay=0.0))
    with engine.initialize(model, config) as trainer:
        assert_everything_streamed(trainer)
        losses = train_steps(trainer, [x] * 15, 15, gas=1)
        assert losses[-1] < 0.7 * losses[0], losses
        for ours, theirs in zip(losses, ref_losses):
            assert abs(ours - theirs) <= BF16_LOSS_RTOL * theirs, (losses, ref_losses)
        assert trainer.parameter("lm_head.weight").dtype == torch.float32  # fp32 masters
        assert trainer.runtime.store.meta(("param", "lm_head.weight")).dtype == torch.bfloat16


# ---------------------------------------------------------------------- memory, copies, the pool
def _medium_model():
    """Big enough that weights, gradients and activations dominate the GPU figures (~12M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _init(name: str, shape: tuple[int, ...]):
    return None if name.endswith("inv_freq") else init_value(name, shape)  # the benchmarks' seeded weights


@pytest.fixture(scope="module")
def medium_run(tmp_path_factory):
    """Three bf16 steps of the medium model on the GPU (every weight streamed): the plan made
    beforehand (activations estimated from the batch shape), the GPU peak this run added to what
    was allocated before it, the memory report, and whether the runtime's pool was CUDA-registered."""
    tmp = tmp_path_factory.mktemp("medium")
    model = _medium_model()
    x = torch.randint(0, 8192, (4, 256), generator=torch.Generator().manual_seed(1))
    config = engine.Config(nvme_path=str(tmp), dtype="bf16", device="cuda", **ALL_STREAMED)
    plan = engine.plan(model, config, example_inputs=dict(input_ids=x, labels=x))
    # cuBLAS allocates a workspace per thread handle (this thread's, autograd's) on first use: make
    # them before the measurement, they are the process's, not the run's (the plan leaves them out)
    warm = torch.nn.Linear(64, 64, device="cuda")
    warm(torch.randn(8, 64, device="cuda")).sum().backward()
    del warm
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with engine.initialize(model, config, initializer=_init) as trainer:
        assert_everything_streamed(trainer)
        for _ in range(3):
            trainer.backward(trainer(input_ids=x, labels=x).loss)
            trainer.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        registered = trainer.runtime.pool.cuda_registered
        report = trainer.memory_report()
    return dict(plan=plan, peak=peak, report=report, registered=registered)


def test_gpu_peak_is_within_20_percent_of_the_plan(medium_run):
    predicted, measured = medium_run["plan"].gpu_peak_bytes, medium_run["peak"]
    assert predicted > 0
    assert abs(predicted - measured) <= 0.2 * measured, (predicted / MiB, measured / MiB)
    report = medium_run["report"]
    assert report["device"].startswith("cuda")
    assert report["gpu_peak_allocated_bytes"] >= measured  # the report's peak counts from before the run
    assert report["gpu_peak_reserved_bytes"] >= report["gpu_peak_allocated_bytes"]


def test_copies_are_counted_and_compute_mostly_does_not_wait_for_them(medium_run):
    """Weights went host -> GPU and gradients back, and the time compute waited for the H2D copies
    is below the forward + backward time (the copy stream runs beside compute)."""
    report = medium_run["report"]
    assert report["h2d_bytes"] > 0 and report["d2h_bytes"] > 0
    assert report["h2d_wait_s"] < report["forward_s"] + report["backward_s"], report
    assert report["d2h_wait_s"] >= 0


def test_the_runtime_pool_is_registered_with_cuda(medium_run):
    assert medium_run["registered"]
    assert medium_run["report"]["pool"]["cuda_registered"]


def test_a_non_blocking_copy_from_a_pool_tensor_returns_before_it_completes():
    """cudaHostRegister'ed pool memory makes ``non_blocking=True`` copies asynchronous: the call
    returns while the copy is still running. 256 MiB takes milliseconds over PCIe or NVLink-C2C
    (>= 4 ms at 64 GB/s); issuing it takes microseconds."""
    nbytes = 256 * MiB
    with PinnedPool(nbytes + MiB) as pool:
        assert pool.cuda_registered
        host = pool.alloc_tensor(nbytes, torch.uint8)
        host.fill_(7)
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            issued = time.perf_counter()
            start.record(stream)
            dev.copy_(host, non_blocking=True)
            done.record(stream)
            returned = time.perf_counter() - issued
            pending = not done.query()
        done.synchronize()
        copy_ms = start.elapsed_time(done)
        assert pending, f"the copy had completed when copy_ returned ({returned * 1e3:.3f} ms; copy {copy_ms:.3f} ms)"
        assert returned * 1e3 < copy_ms, (returned * 1e3, copy_ms)
        assert int(dev[-1]) == 7 and int(dev[0]) == 7
        del host


def test_close_with_restore_gives_a_cpu_model_back_on_the_cpu(tmp_path):
    """A model handed over on the CPU is on the CPU again after close(restore_weights=True), every
    parameter and buffer, with the trained values (never left whole on the GPU)."""
    model = tiny_llama()
    with engine.initialize(model, cuda_config(tmp_path)) as trainer:
        train_steps(trainer, batches(2 * ACCUMULATING["gradient_accumulation_steps"]), 2)
        trained = {name: trainer.weight(name).clone() for name, _ in model.named_parameters()}
        trainer.close(restore_weights=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), trained[name]), name


# ---------------------------------------------------------------------- a model handed over on the GPU
@pytest.mark.parametrize("threshold", [0, 4096], ids=["all-streamed", "norms-resident"])
def test_a_model_already_on_the_gpu_trains_as_torch_and_is_given_back_there(tmp_path, threshold):
    """Each weight is read from its device tensor (a D2H copy into the store) and the model's own
    device copies of the streamed weights are freed; resident parameters and buffers stay on the
    GPU; batches already there are used as they are. fp32 within 1e-5 of torch on this GPU, and
    close(restore_weights=True) puts every tensor back on the GPU with the trained values."""
    ref, model = tiny_llama().cuda(), tiny_llama().cuda()  # the same seed: the same weights
    data = [x.cuda() for x in batches(12)]
    ref_losses = reference_run(ref, data, 6, lr=LR, ieee_sqrt=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with engine.initialize(model, cuda_config(tmp_path, resident_threshold_bytes=threshold)) as trainer:
        params = trainer.runtime.streamer.params
        assert params.streamed and (bool(params.resident) == (threshold > 0))
        freed = before - torch.cuda.memory_allocated()
        # the streamed weights' blocks are gone; what initialize allocated there is one placeholder
        # scalar per dtype (one 512-byte block of the caching allocator)
        assert freed >= sum(sp.nbytes for sp in params.streamed.values()) - 512, freed
        assert all(p.device.type == "cuda" for _, p in params.resident)
        assert all(b.device.type == "cuda" for b in model.buffers())
        losses = train_steps(trainer, data, 6)
        assert_same(((n, p.detach().cpu()) for n, p in ref.named_parameters()), ref_losses, losses,
                    lambda name: trainer.parameter(name).cpu(), nonempty=True)
        trained = {name: trainer.weight(name).cpu().clone() for name, _ in model.named_parameters()}
        trainer.close(restore_weights=True)
    assert all(p.device.type == "cuda" and not is_placeholder(p.data) for p in model.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().cpu(), trained[name]), name


# ---------------------------------------------------------------------- PEFT on the GPU
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _peft_llama(device: str):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: give it values so both adapter paths train from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(device)


@pytest.mark.parametrize("given_on", ["cpu", "cuda"])
def test_peft_lora_on_the_gpu_matches_torch_on_the_gpu(tmp_path, given_on):
    """peft LoRA on a tiny Llama: the frozen base streamed read-only to the GPU, the adapters
    trained wherever the planner puts them; fp32 within 1e-5 of torch.optim.AdamW over the
    adapters on this GPU, for a model handed over on the CPU or already on the GPU."""
    ref, model = _peft_llama("cuda"), _peft_llama(given_on)
    data = batches(12)
    trainable = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    ref_losses = reference_run(ref, [x.cuda() for x in data], 6, lr=LR, params=[p for _, p in trainable],
                               ieee_sqrt=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and p.numel() > 1}
    with engine.initialize(model, cuda_config(tmp_path)) as trainer:
        assert trainer.runtime.device.kind == "cuda"
        assert frozen <= {sp.name for sp in trainer.runtime.streamer.params.streamed.values()}
        losses = train_steps(trainer, data if given_on == "cpu" else [x.cuda() for x in data], 6)
        assert_same(((n, p.detach().cpu()) for n, p in trainable), ref_losses, losses,
                    lambda name: trainer.parameter(name).cpu(), nonempty=True)
        assert trainer.memory_report()["h2d_bytes"] > 0


# ---------------------------------------------------------------------- fp16 loss scaling on the GPU
def _count_device_norms(monkeypatch) -> list:
    """The devices of the gradients whose statistics were taken by ``device_grad_norm``."""
    calls: list = []
    original = gradients_module.device_grad_norm

    def counted(grad: torch.Tensor) -> torch.Tensor:
        calls.append(grad.device)
        return original(grad)
    monkeypatch.setattr(gradients_module, "device_grad_norm", counted)
    return calls


def test_fp16_overflow_on_the_gpu_skips_the_step_and_lowers_the_scale(tmp_path, monkeypatch):
    """tests/test_trainer.py's CPU test on the GPU: the overflow flag comes from the gradients'
    statistics taken on the GPU (one-micro-batch windows), the step is skipped, the scale backs off."""
    norms = _count_device_norms(monkeypatch)
    model = tiny_llama()
    x = batches(1)[0]
    cfg = cuda_config(tmp_path, dtype="fp16", gradient_accumulation_steps=1, hysteresis=1, initial_scale_power=8)
    with engine.initialize(model, cfg) as trainer:
        trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()
        assert trainer.global_steps == 1 and trainer.loss_scale == 256.0
        assert norms and all(d.type == "cuda" for d in norms), norms
        before = {n: trainer.parameter(n).clone() for n, _ in model.named_parameters()}
        taken = len(norms)
        trainer.backward(trainer(input_ids=x, labels=x).loss * float("inf"))
        trainer.step()
        assert len(norms) == 2 * taken  # this window's statistics came from the GPU too
        assert trainer.skipped_steps == 1 and trainer.global_steps == 1 and trainer.loss_scale == 128.0
        for n, _ in model.named_parameters():
            after = trainer.parameter(n)
            assert torch.equal(after, before[n]) and torch.isfinite(after).all(), n
            for state in ("exp_avg", "exp_avg_sq"):
                assert torch.isfinite(trainer.runtime.store.get((state, n))).all(), (state, n)
        trainer.backward(trainer(input_ids=x, labels=x).loss)
        trainer.step()
        assert trainer.global_steps == 2


def test_fp16_a_huge_loss_scale_on_the_gpu_backs_off_until_a_step_is_taken(tmp_path, monkeypatch):
    """Scale 2**40: the scaled gradients overflow fp16 on the GPU; every such step is skipped
    with the weights untouched and the scale halved (hysteresis 1), until a step is taken."""
    norms = _count_device_norms(monkeypatch)
    model = tiny_llama()
    x = batches(1)[0]
    cfg = cuda_config(tmp_path, dtype="fp16", gradient_accumulation_steps=1, hysteresis=1, initial_scale_power=40)
    with engine.initialize(model, cfg) as trainer:
        initial = {n: trainer.parameter(n).clone() for n, _ in model.named_parameters()}
        scale = trainer.loss_scale
        assert scale == 2.0 ** 40
        for attempt in range(1, 41):
            trainer.backward(trainer(input_ids=x, labels=x).loss)
            trainer.step()
            if trainer.global_steps:
                break
            scale /= 2
            assert (trainer.skipped_steps, trainer.loss_scale) == (attempt, scale)
            assert all(torch.equal(trainer.parameter(n), v) for n, v in initial.items())
        assert trainer.global_steps == 1 and trainer.skipped_steps >= 1, (trainer.skipped_steps, trainer.loss_scale)
        assert all(d.type == "cuda" for d in norms)
        assert all(torch.isfinite(trainer.parameter(n)).all() for n in initial)
        assert any(not torch.equal(trainer.parameter(n), v) for n, v in initial.items())


# ---------------------------------------------------------------------- the flat gradient ablation
def test_the_flat_gradient_buffer_on_the_gpu_matches_torch(tmp_path, monkeypatch):
    """grad_buffer="flat" on CUDA: each gradient copied synchronously into the host buffer; the
    accumulation adds in pieces (made small here so the tiny model's gradients take several)."""
    monkeypatch.setattr(gradients_module, "_ADD_CHUNK", 1000)
    ref, model = tiny_llama().cuda(), tiny_llama()
    data = batches(6)
    ref_losses = reference_run(ref, [x.cuda() for x in data], 3, lr=LR, ieee_sqrt=True)
    with engine.initialize(model, cuda_config(tmp_path, grad_buffer="flat")) as trainer:
        assert_everything_streamed(trainer)
        losses = train_steps(trainer, data, 3)
        assert_same(((n, p.detach().cpu()) for n, p in ref.named_parameters()), ref_losses, losses,
                    lambda name: trainer.parameter(name).cpu(), nonempty=True)
        assert trainer.memory_report()["d2h_bytes"] == 6 * sum(p.numel() for p in ref.parameters()) * 4
