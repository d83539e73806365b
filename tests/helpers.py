"""Scaffolding shared by the test files (plain functions; the fixtures are in conftest.py).

Imported as ``from helpers import ...``: pytest puts tests/ on ``sys.path`` (rootdir
conftest, no ``__init__.py``). It holds what several test files used to copy: tiny
Hugging Face models and their batches, engine configs, the in-memory PyTorch reference
run a trained engine is compared against (and the comparison), tolerance checks, and
the environment and runners of child processes. Each test file keeps its own defaults
(learning rate, shapes, tolerances) in thin wrappers, so what a test asserts is unchanged.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import pytest
import torch

import engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAS = 2  # gradient accumulation of the trainer and LoRA training comparisons


# ---------------------------------------------------------------------- child processes
def child_env(**extra: str) -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH, so a child imports this tree's engine."""
    path = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=path, **extra)


# torchrun's variables: a child launched as one rank gets exactly the ones rank_env sets.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: Optional[int] = None, world: int = 1, port: str = "", **extra: str) -> dict[str, str]:
    """:func:`child_env` on the CPU with one thread, as rank ``rank`` of ``world`` (torchrun's
    environment, without its agent; ``rank=None``: a single process, no torchrun variables)."""
    env = {k: v for k, v in child_env(MEMASCEND_AUTO_DEVICE="cpu", OMP_NUM_THREADS="1").items()
           if k not in TORCHRUN_VARS}
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    env.update(extra)
    return env


def run_python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python ARGS...`` (e.g. ``"-c", code, argv...``) in a child with :func:`child_env`; output captured."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=child_env())


def run_unprivileged(code: str, drop: str) -> subprocess.CompletedProcess:
    """Runs Python ``code`` in a child that lacks the capabilities in ``drop``
    (e.g. ``"cap_ipc_lock"``), so root-only bypasses do not hide the failure paths."""
    if os.geteuid() == 0:
        capsh = shutil.which("capsh")
        if capsh is None:
            pytest.skip("running as root and capsh (libcap2-bin) is missing: cannot drop capabilities")
        script = f"{sys.executable} -c {_quote(textwrap.dedent(code))}"
        cmd = [capsh, f"--drop={drop}", "--", "-c", script]
    else:
        cmd = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


# ---------------------------------------------------------------------- tiny models and data
def tiny_llama_config(*, vocab: int = 256, hidden: int = 64, inter: int = 128, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, positions: int = 64, tied: bool = False, **extra):
    """A ``LlamaConfig`` of a model small enough to train in a test (defaults: the trainer tests' shape)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                       tie_word_embeddings=tied, **extra)


def tiny_llama(tied: bool = False, layers: int = 2, **shape):
    """A fp32 ``LlamaForCausalLM`` of :func:`tiny_llama_config`, initialized from torch seed 0."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(tied=tied, layers=layers, **shape)).float()


LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def peft_llama(targets: Sequence[str] = tuple(LORA_TARGETS)):
    """A tiny Llama wrapped by Hugging Face peft LoRA, with non-zero B so both adapter paths train from step 1."""
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=list(targets)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def batches(n: int, seed: int = 1, vocab: int = 256, shape: tuple[int, int] = (2, 16)) -> list[torch.Tensor]:
    """``n`` seeded batches of token ids (each used as input and labels)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


def engine_config(tmp_path, *, lr: float, weight_decay: float = 0.1, **fields) -> engine.Config:
    """``engine.Config`` swapping to ``tmp_path`` with AdamW(lr, weight_decay); ``fields`` win over both."""
    base = dict(nvme_path=str(tmp_path), optimizer=engine.AdamWConfig(lr=lr, weight_decay=weight_decay))
    base.update(fields)
    return engine.Config(**base)


# The step settings the training comparisons share (accumulation, clipping, what stays resident).
ACCUMULATING = dict(gradient_accumulation_steps=GAS, gradient_clipping=1.0, resident_threshold_bytes=4096)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------- reference runs
@contextlib.contextmanager
def correctly_rounded_sqrt() -> Iterator[None]:
    """``Tensor.sqrt`` correctly rounded (IEEE), as the fused AdamW kernel's, inside the block.

    This torch build computes Tensor.sqrt with MKL's vector math, which is not correctly
    rounded (1 ulp off on ~20% of inputs; see tests/test_optim.py). In fp32 that stays below
    1e-5, but over a bf16 base a 1-ulp difference in an adapter's update flips bf16 roundings of
    the next forward's activations (2^-8 relative each) and the trajectories part: measured on
    the peft-wrapped bf16 model, torch.optim.AdamW with MKL's sqrt vs the same with this sqrt,
    adapters rel 9.3e-5 after 4 steps (2-core AVX2 EPYC; 3.1e-5 / 1.0e-5 were seen on an
    AVX-512 BF16 EPYC). That measures MKL, not the engine: with this sqrt torch's AdamW equals
    the engine bit for bit. The fp32 sqrt of an fp32 value through float64 and back is correctly
    rounded (53 >= 2*24 + 2 bits, so the double rounding is innocuous)."""
    mkl_sqrt = torch.Tensor.sqrt
    calls = 0

    def sqrt(self: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return mkl_sqrt(self.double()).to(self.dtype)

    torch.Tensor.sqrt = sqrt
    try:
        yield
    finally:
        torch.Tensor.sqrt = mkl_sqrt
    assert calls, "torch.optim.AdamW no longer calls Tensor.sqrt: the reference kept MKL's sqrt"


def reference_run(model: torch.nn.Module, data: Sequence[torch.Tensor], steps: int, *, lr: float, wd: float = 0.1,
                  clip: float = 1.0, params: Optional[Iterable[torch.nn.Parameter]] = None, adamw: bool = True,
                  seed: Optional[int] = None, ieee_sqrt: bool = False, gas: int = GAS,
                  param_groups: Optional[list[dict]] = None,
                  lr_lambda: Optional[Callable[[int], float]] = None) -> list[float]:
    """Plain PyTorch in memory: ``steps`` optimizer steps of ``gas`` micro-batches each over
    ``params`` (default: all of the model's; or ``param_groups``, torch's list of dicts),
    torch.optim.AdamW (or Adam), the gradient norm clipped to ``clip`` (0: not clipped), a
    ``LambdaLR(lr_lambda)`` stepped after each optimizer step when given; ``seed`` seeds torch's
    RNG first (dropout); ``ieee_sqrt``: the optimizer's square root correctly rounded
    (:func:`correctly_rounded_sqrt`). Returns every micro-batch's loss."""
    opt_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    if param_groups is not None:
        opt = opt_cls(param_groups, lr=lr, weight_decay=wd, foreach=False)
        params = [p for g in param_groups for p in g["params"]]
    else:
        params = list(model.parameters() if params is None else params)
        opt = opt_cls(params, lr=lr, weight_decay=wd, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    losses = []
    for i in range(steps):
        for m in range(gas):
            x = data[i * gas + m]
            out = model(input_ids=x, labels=x)
            (out.loss / gas).backward()
            losses.append(out.loss.item())
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        with correctly_rounded_sqrt() if ieee_sqrt else contextlib.nullcontext():
            opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return losses


def train_steps(trainer, data: Sequence[torch.Tensor], steps: int, *, seed: Optional[int] = None,
                gas: int = GAS, start: int = 0, lr_scheduler: Any = None) -> list[float]:
    """The engine's side of :func:`reference_run`: the same micro-batches through ``trainer``
    (forward, backward, step - which steps at the accumulation boundary), optimizer steps
    ``start`` .. ``steps - 1``, ``lr_scheduler.step()`` after each; returns the losses."""
    if seed is not None:
        torch.manual_seed(seed)
    losses = []
    for i in range(start, steps):
        for m in range(gas):
            x = data[i * gas + m]
            out = trainer(input_ids=x, labels=x)
            trainer.backward(out.loss)
            trainer.step()
            losses.append(out.loss.item())
        if lr_scheduler is not None:
            lr_scheduler.step()
    return losses


def assert_same_training(ref_params: Iterable[tuple[str, torch.Tensor]], ref_losses: Sequence[float],
                         losses: Sequence[float], weight_of: Callable[[str], torch.Tensor], rtol: float = 1e-5,
                         *, nonempty: bool = False) -> None:
    """Losses within ``rtol`` each; every tensor of ``ref_params`` (name, reference value) within
    ``rtol`` in relative L2 norm of ``weight_of(name)`` (``nonempty``: there must be some).

    Not bit-exact against torch.optim.AdamW: this torch build takes Tensor.sqrt from MKL's
    vector math, which is not correctly rounded (it differs from the IEEE square root on ~20%
    of inputs), while the fused kernel's sqrt is IEEE; Adam amplifies those 1-ulp differences
    on near-zero gradients. Bit-exactness of the offload machinery itself is asserted against
    the same kernel in memory (test_offload_is_bit_identical_to_the_same_optimizer_in_memory)."""
    assert len(losses) == len(ref_losses)
    for a, b in zip(losses, ref_losses):
        assert math.isclose(a, b, rel_tol=rtol), (losses, ref_losses)
    ref_params = list(ref_params)
    if nonempty:
        assert ref_params
    for name, p in ref_params:
        got = weight_of(name).view(p.shape)
        rel = ((got - p.detach()).norm() / p.detach().norm()).item()
        assert rel <= rtol, (name, rel)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, *, finite: bool = False) -> None:
    """Same shape, and max abs error <= 1e-6 x the expected's max magnitude (``finite``: no inf/nan either)."""
    assert actual.shape == expected.shape, what
    if finite:
        assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= 1e-6 * max(scale, 1e-30), f"{what}: max error {err:g} (scale {scale:g})"
