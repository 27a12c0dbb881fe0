"""Tiny Llama-style causal LMs: Hugging Face `LlamaForCausalLM` configs named by size.

Building on the stock HF class (not a home-grown GPT) is what lets everything downstream treat the
tiny model as a real one: peft LoRA, torchao, `AttentionInterface`, `generate`, and loading any
local Llama folder through the same path. Sizes (µ for unit tests, tiny for CPU reproductions, small
where a method needs more capacity):

| size  | d   | layers | heads × dim | FFN | context | params (vocab 4096, tied) |
|-------|-----|--------|-------------|-----|---------|---------------------------|
| micro | 64  | 2      | 2 × 32      | 172 | 256     | ≈0.36M — unit tests       |
| tiny  | 128 | 4      | 4 × 32      | 344 | 512     | ≈1.3M — reproductions on CPU |
| small | 256 | 4      | 4 × 64      | 688 | 1024    | ≈4.2M                     |

Input and output embeddings are tied: at this width the vocabulary would otherwise hold most of the
parameters. FFN widths are ≈ 8/3·d rounded to a multiple of 4 as in Llama.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SizeName = Literal["micro", "tiny", "small"]


@dataclass(frozen=True)
class LlamaSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int


SIZES: dict[str, LlamaSize] = {
    "micro": LlamaSize(64, 2, 2, 172, 256),
    "tiny": LlamaSize(128, 4, 4, 344, 512),
    "small": LlamaSize(256, 4, 4, 688, 1024),
}


def llama_config(size: SizeName, vocab_size: int, *, eos_token_id: int = 0, pad_token_id: int = 1) -> LlamaConfig:
    """The HF config of a named size; bos = eos = `<|endoftext|>` as the tokenizer defines it."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    shape = asdict(SIZES[size])
    return LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=shape["num_attention_heads"],
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attention_bias=False,
        mlp_bias=False,
        **shape,
    )


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model whose weights depend only on `seed` (HF init draws from torch's RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
