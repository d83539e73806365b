"""A training script written for DeepSpeed ZeRO-Infinity, run by the engine.

The one engine-specific line is the import: with ``import deepspeed`` instead, DeepSpeed runs it.

    python examples/deepspeed_script.py --deepspeed_config examples/ds_config.json \
        --steps 8 --save_dir /tmp/ckpt

(Set ``nvme_path`` in the JSON to a directory on your NVMe drive first.) The model is a tiny
Llama built from its config and the data random token ids, so the script runs anywhere in
seconds; put your own model and dataset in ``make_model`` / ``TokenDataset``.
"""
import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import engine.deepspeed_compat as deepspeed


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM samples: token ids used as inputs and labels."""

    def __init__(self, n: int = 64, seq_len: int = 16, seed: int = 1):
        self.tokens = torch.randint(0, 256, (n, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description="causal-LM fine-tuning with DeepSpeed")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=8, help="micro-batches to train")
    parser.add_argument("--save_dir", type=str, default=None)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    model = make_model()
    dataset = TokenDataset()
    model_engine, optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), training_data=dataset)

    model_engine.train()
    losses, lrs = [], []
    step = 0
    while step < args.steps:
        for batch in loader:
            loss = model_engine(**batch).loss
            model_engine.backward(loss)
            model_engine.step()
            losses.append(loss.item())
            lrs.append(model_engine.get_lr()[0])
            step += 1
            if step == args.steps:
                break
    if args.save_dir:
        model_engine.save_checkpoint(args.save_dir, client_state={"step": step})
    print(json.dumps({"losses": losses, "lrs": lrs, "global_steps": model_engine.global_steps}))


if __name__ == "__main__":
    main()
