"""Tiny random-weight causal LMs of four architectures, saved as a user's Hugging Face folders would be.

Llama and Qwen2 (the Llama layout), GPT-NeoX (fused query_key_value, parallel residual) and GPT-2 (Conv1D
linears, learned positions), each two blocks of width 32 with the same 300-token byte-level BPE tokenizer;
built here with transformers in under a second, nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from models.llm.folder import save_folder
from models.llm.tokenizer import train_tokenizer
from tests.unit.service.test_deployments import CORPUS

ARCHITECTURES = ("llama", "qwen2", "gpt_neox", "gpt2")


def tiny_config(arch: str, vocab: int, eos: int, pad: int) -> PretrainedConfig:
    ids = {"vocab_size": vocab, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    shape["max_position_embeddings"] = 128
    if arch == "gpt_neox":
        return GPTNeoXConfig(**shape, **ids)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return config(num_key_value_heads=2, **shape, **ids)


def tiny_causal_folder(dest: Path, arch: str, seed: int = 0) -> Path:
    """A folder as `save_pretrained` writes it: config.json, model.safetensors, tokenizer files."""
    tok = train_tokenizer(CORPUS, vocab_size=300, model_max_length=128, min_frequency=1)
    config = tiny_config(arch, len(tok), tok.eos_token_id, tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float().eval()
    return save_folder(model, tok, dest)
