"""Token streams and batches from a text corpus (`stdlib-code` or an uploaded `text-corpus`).

A split becomes one stream: its documents' token ids joined by `<|endoftext|>`, as GPT-style
pre-training packs documents. Training draws random windows from the train stream with a
`torch.Generator` whose state goes into checkpoints (so a resumed run sees the same batches);
evaluation and calibration use fixed, non-overlapping windows so every model is scored on the same
tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from models.llm.tokenizer import encode_documents


def token_stream(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], max_tokens: int | None = None
) -> torch.Tensor:
    """The documents' ids joined by eos, as int64 [T]. With `max_tokens`, encodes only as many documents
    (in order) as are needed, so a calibration set does not pay for tokenizing the whole corpus."""
    eos = tokenizer.eos_token_id
    pieces: list[np.ndarray] = []
    total, chunk, start = 0, 16, 0
    while start < len(texts) and (max_tokens is None or total < max_tokens):
        step = len(texts) if max_tokens is None else chunk
        for ids in encode_documents(tokenizer, texts[start : start + step]):
            pieces.append(np.asarray([*ids, eos], dtype=np.int64))
            total += len(ids) + 1
        start += step
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(stream[:max_tokens] if max_tokens is not None else stream)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` windows of `seq_len` tokens at uniform random offsets: [B, seq_len]."""
    if len(stream) <= seq_len:
        raise ValueError(f"the token stream ({len(stream)} tokens) is shorter than one window of {seq_len}")
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def fixed_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the stream: [N, seq_len] (the tail is dropped)."""
    n = len(stream) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the token stream ({len(stream)} tokens) is shorter than one window of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len)


def split_windows(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], seq_len: int, n_windows: int
) -> torch.Tensor:
    """`n_windows` fixed windows from the first documents of a split (calibration and evaluation sets)."""
    return fixed_windows(token_stream(tokenizer, texts, max_tokens=seq_len * n_windows), seq_len, n_windows)


def sampled_stream(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], max_tokens: int, seed: int = 0
) -> torch.Tensor:
    """About `max_tokens` tokens from the split's documents in a seeded random order: a sample of the whole
    split, not its first (alphabetically ordered) files, so fine-tuning data matches the held-out distribution."""
    order = np.random.default_rng(seed).permutation(len(texts))
    return token_stream(tokenizer, [texts[i] for i in order], max_tokens=max_tokens)
