"""A TRL SFTTrainer + LoRA script, trained by the engine (frozen base weights streamed from NVMe).

The changes from the plain-TRL version are marked "engine:": the mixin class and the import.
The tokenizer is built in the script (a word-level vocabulary) so it runs offline.

    python examples/trl_sft.py --output-dir /tmp/sft-run
"""
from __future__ import annotations

import argparse
import os

import datasets
import peft
import torch
import trl
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engine.integrations.transformers import OffloadTrainerMixin  # engine


class OffloadSFTTrainer(OffloadTrainerMixin, trl.SFTTrainer):  # engine: the mixin before SFTTrainer
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    opts = parser.parse_args()

    words = [f"w{i}" for i in range(200)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(words[j] for j in torch.randint(0, 200, (24,), generator=g).tolist()) for _ in range(32)]
    train = datasets.Dataset.from_dict({"text": texts})

    args = trl.SFTConfig(output_dir=opts.output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         num_train_epochs=1, learning_rate=1e-3, max_length=32, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, bf16=False, disable_tqdm=True)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           lora_dropout=0.0, task_type="CAUSAL_LM")
    with OffloadSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                           peft_config=lora) as trainer:  # engine: `with` closes the engine at the end
        trainer.train()
        trainer.save_model(os.path.join(opts.output_dir, "adapter"))  # adapter_model.safetensors + config


if __name__ == "__main__":
    main()
