"""Saves a small randomly initialised Llama with transformers' save_pretrained, sharded, and prints the
SHA-256, dtype and shape of every tensor of its state dict as JSON."""
import hashlib
import json
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def main(folder: str) -> None:
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="200KB", safe_serialization=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        raw = tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        tensors[name] = {"dtype": str(tensor.dtype), "shape": list(tensor.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "tensors": tensors}))


if __name__ == "__main__":
    main(sys.argv[1])
