"""A Hugging Face Trainer script, trained by the engine (parameters, gradients, Adam states on NVMe).

The only changes from the plain-Trainer version of this script are the import and the
Trainer class (marked "engine:"); everything else - the model, the dataset, TrainingArguments,
train/evaluate/save_model - is what a transformers user already writes.

    python examples/hf_trainer.py --output-dir /tmp/hf-run [--nvme-path /mnt/nvme]
"""
from __future__ import annotations

import argparse
import os

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from engine.integrations.transformers import OffloadTrainer  # engine: was `from transformers import Trainer`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--nvme-path", default=None, help="where the swap files go (default: a temporary directory)")
    opts = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (64, 32), generator=g).tolist()
    train = datasets.Dataset.from_dict({"input_ids": ids[:48], "labels": ids[:48]})
    held_out = datasets.Dataset.from_dict({"input_ids": ids[48:], "labels": ids[48:]})

    args = TrainingArguments(
        output_dir=opts.output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=2, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0,
        logging_steps=2, eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, report_to=[],
        use_cpu=True, optim="adamw_torch", disable_tqdm=True)

    trainer = OffloadTrainer(  # engine: was `Trainer(`
        model=model, args=args, train_dataset=train, eval_dataset=held_out,
        engine_config={"nvme_path": opts.nvme_path} if opts.nvme_path else None)
    trainer.train()
    print("eval:", trainer.evaluate())
    trainer.save_model(os.path.join(opts.output_dir, "final"))
    trainer.close()  # engine: releases the swap files and pinned memory (the engine's finalizer would too)


if __name__ == "__main__":
    main()
