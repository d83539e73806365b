"""A meta-device model's initializer gives weights only; buffers are computed as the model computes them."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import engine
from engine.errors import InitializationError
from engine.offload.materialize import initialize_into_store

CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)


def weight(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A deterministic per-name weight, as DeepSpeed users write for ``zero.Init``. Scale 0.2, not
    0.02: at 0.02 attention of this tiny model is so flat that noise in the rotary frequencies
    does not change the fp32 loss (measured: 4.851992607 either way; 4.85645 vs 4.85492 at 0.2)."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.2


def engine_config(tmp_path, **overrides) -> engine.Config:
    return engine.Config(nvme_path=str(tmp_path), optimizer=engine.AdamWConfig(lr=1e-3),
                         resident_threshold_bytes=4096, **overrides)


def in_memory_model() -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weight(name, tuple(p.shape)))
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))


def test_weights_only_initializer_gives_the_in_memory_first_loss_exactly(tmp_path):
    x = batch()
    ref = in_memory_model()
    expected = ref(input_ids=x, labels=x).loss
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**CONFIG))
    asked: list[str] = []

    def init(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        asked.append(name)
        return weight(name, shape)

    params = {n for n, _ in meta.named_parameters()}
    buffers = {n for n, _ in meta.named_buffers()}
    assert {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} <= buffers
    with engine.initialize(meta, engine_config(tmp_path), initializer=init) as trainer:
        assert set(asked) == params and not set(asked) & buffers  # never called with a buffer name
        for name, buf in ref.named_buffers():
            assert torch.equal(meta.get_buffer(name), buf), name  # computed as the model's __init__ does
        loss = trainer(input_ids=x, labels=x).loss
    assert torch.equal(loss.detach(), expected.detach()), (loss.item(), expected.item())


def test_buffer_initializer_opts_in_to_buffers(tmp_path):
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(**CONFIG))
    seen: list[str] = []

    def buffers(name: str, shape: tuple[int, ...]):
        seen.append(name)
        if name.endswith(".inv_freq"):
            assert shape == (CONFIG["hidden_size"] // CONFIG["num_attention_heads"] // 2,)
            return torch.full(shape, 0.5)
        return None  # computed by the model

    with engine.initialize(meta, engine_config(tmp_path), initializer=weight, buffer_initializer=buffers):
        assert sorted(seen) == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
        assert torch.equal(meta.get_buffer("model.rotary_emb.inv_freq"),
                           torch.full_like(meta.get_buffer("model.rotary_emb.inv_freq"), 0.5))
        ref = in_memory_model()
        assert torch.equal(meta.get_buffer("model.rotary_emb.original_inv_freq"),
                           ref.get_buffer("model.rotary_emb.original_inv_freq"))


class Scaled(nn.Module):
    """A plain module whose buffer is computed in ``__init__``: nothing can recompute it from meta."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        # device named explicitly: transformers' meta-init patches torch.linspace for a while, and if
        # torch's device-context cache is first filled then, linspace ignores `with torch.device("meta")`
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8, device=self.linear.weight.device),
                             persistent=False)

    def forward(self, x):
        return self.linear(x) * self.scale


class NoBufferInit(Scaled):
    """Has an ``_init_weights`` that does not compute the buffer: left untouched would be garbage."""

    def _init_weights(self, module: nn.Module) -> None:
        pass


@pytest.mark.parametrize("cls", [Scaled, NoBufferInit])
def test_a_meta_buffer_nothing_computes_is_an_error_naming_it(cls, tmp_path):
    with torch.device("meta"):
        model = cls()
    calls: list[str] = []

    def init(name, shape):
        calls.append(name)
        return torch.zeros(shape)

    with pytest.raises(InitializationError, match=r"(?s)buffer.*\bscale\b.*buffer_initializer"):
        initialize_into_store(model, store=None, initializer=init, resident_threshold_bytes=1 << 20)
    assert "scale" not in calls


def test_buffer_initializer_fills_a_plain_module(tmp_path):
    with torch.device("meta"):
        model = Scaled()
    summary = initialize_into_store(model, store=None, initializer=lambda n, s: torch.zeros(s),
                                    buffer_initializer=lambda n, s: torch.linspace(0.5, 1.5, 8),
                                    resident_threshold_bytes=1 << 20)
    assert summary["buffers"] == 1
    assert torch.equal(model.scale, torch.linspace(0.5, 1.5, 8))
