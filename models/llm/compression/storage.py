"""Bytes a compressed model needs in a packed format — the "model bytes" column next to perplexity.

Weights here are stored de-quantized and with explicit zeros (so any HF tool loads them), which makes
the safetensors file as large as the dense one; the honest size is what a packed format would take:

- dense: 16-bit values (the fp16/bf16 a deployment would use);
- b-bit RTN: b bits per value plus a 16-bit scale and zero point per group;
- N:M sparse: the N kept values per group plus ⌈log₂ M⌉ index bits each (2:4 → 2 bits, as the
  NVIDIA sparse tensor-core format stores it);
- unstructured sparse: the kept values plus a 1-bit-per-weight bitmap.

Everything outside the decoder blocks' linears (embeddings, norms) counts as dense 16-bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from models.llm.compression.pruning import SparsityPattern

DENSE_BITS = 16


@dataclass(frozen=True)
class LinearFormat:
    value_bits: int = DENSE_BITS
    group_size: int = 0  # quantization group (0: one per row); only with value_bits < 16
    pattern: SparsityPattern | None = None


def linear_bytes(weight_shape: tuple[int, int], fmt: LinearFormat) -> float:
    rows, cols = weight_shape
    numel = rows * cols
    kept = numel if fmt.pattern is None else numel * (1.0 - fmt.pattern.sparsity)
    bits = kept * fmt.value_bits
    if fmt.value_bits < DENSE_BITS:
        bits += rows * (cols // (fmt.group_size or cols)) * 2 * DENSE_BITS
    if fmt.pattern is not None and fmt.pattern.is_nm:
        bits += kept * math.ceil(math.log2(fmt.pattern.m))
    elif fmt.pattern is not None and fmt.pattern.sparsity > 0:
        bits += numel
    return bits / 8


def packed_bytes(model: nn.Module, formats: Mapping[str, LinearFormat]) -> int:
    """Model bytes with the named modules (full module names) in their formats, all else dense 16-bit."""
    total, seen = 0.0, set()
    modules = dict(model.named_modules())
    for name, fmt in formats.items():
        weight = modules[name].weight
        seen.add(id(weight))
        total += linear_bytes(tuple(weight.shape), fmt)
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * DENSE_BITS / 8
    return int(math.ceil(total))
