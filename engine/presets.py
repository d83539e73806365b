"""Named Llama-style model shapes for the CLI (``plan``, ``bench``, ``train``'s default).

``tiny`` is the embedded default of ``python -m engine train`` (byte-level vocabulary);
``125m`` / ``125m-deep`` / ``350m`` / ``1b`` / ``tinyllama-1.1b`` are the benchmark presets;
``llama-7b`` / ``llama-13b`` / ``llama-70b`` are Llama-2's shapes and ``llama3-8b`` Llama-3-8B's,
for planning (and the pinned-pool benchmark's tensor mix). Building on the meta
device allocates nothing, so even 70B is instant.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4),
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12),
    "125m-deep": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=24,
                      num_attention_heads=12, num_key_value_heads=12),
    "350m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=32),
    # TinyLlama-1.1B's shapes (grouped-query attention, 22 layers): bench_streaming's ~1B model.
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "llama-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8),
}


def llama_config(name: str, max_positions: int = 4096):
    """A ``transformers.LlamaConfig`` for preset ``name``; ValueError names the known presets."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)} (or a path to a config.json)")
    return LlamaConfig(**PRESETS[name], max_position_embeddings=max_positions, tie_word_embeddings=False)


def load_hf_config(path: str):
    """A transformers config from a ``config.json`` path or a model directory holding one."""
    from transformers import AutoConfig

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(2, f"no model config at {path!r} (expected a config.json or a directory with one)",
                                path)
    try:
        with open(file) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{file!r} is not a Hugging Face model config (no \"model_type\")")
    try:
        return AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(file)))
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{file!r}: {exc}") from None


def build_model(source: str, device: str = "meta", max_positions: int = 4096) -> nn.Module:
    """A causal LM from a preset name or a config.json / model directory, on ``device``
    (``"meta"``: shapes only, nothing allocated)."""
    from transformers import AutoModelForCausalLM

    looks_like_path = os.sep in source or source.endswith(".json") or os.path.exists(source)
    config = load_hf_config(source) if looks_like_path else llama_config(source, max_positions)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config)
