"""Parameter-efficient fine-tuning: built-in LoRA and models wrapped by Hugging Face peft.

The frozen base streams read-only from NVMe (no gradient, no optimizer state, never
written back); the adapters train in memory with the fused CPU AdamW (the planner's
``trainable_placement``). ``frozen_dtype`` keeps the base in bf16/fp16 under fp32 adapters.

>>> model = engine.peft.apply_lora(model, engine.peft.LoraConfig(r=16, alpha=32,
...                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
>>> trainer = engine.initialize(model, engine.Config(frozen_dtype="bf16", ...))
>>> ...
>>> engine.peft.save_adapter(trainer, "adapter/")       # PeftModel.from_pretrained loads it
>>> engine.peft.merge_and_export(trainer, "merged/")     # transformers loads it
"""
from .adapters import AdapterLayer, base_model, is_peft_model, lora_layers, save_adapter
from .export import merge_and_export
from .lora import LoraConfig, LoraLinear, apply_lora

__all__ = ["AdapterLayer", "LoraConfig", "LoraLinear", "apply_lora", "base_model", "is_peft_model", "lora_layers",
           "merge_and_export", "save_adapter"]
