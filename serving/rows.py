"""Per-row KV caches and the attention that reads them: how one forward serves many sequences exactly.

A decode batch of continuous batching holds sequences of different lengths that joined at different steps.
The usual layout (one padded `[batch, heads, time, dim]` cache, an attention mask, position ids) makes a
row's attention sum over padded slots in a kernel whose blocking depends on the longest row, so a row's
logits change in the last bits with its neighbours, and a near-tie argmax can flip. Here every sequence
owns its cache (`RowKV`: left-aligned, preallocated to prompt + max_tokens, so it never moves), the model's
forward gets a `StepCache` that writes each row's new keys and values into its own cache, and the attention
registered as `ROWS_ATTENTION` runs SDPA row by row over exactly that row's tokens — the same call, on the
same numbers, whatever else is in the batch.

The linear layers are batched (that is where batching pays). MKL's GEMM gives a row the same bits for
the same number of rows M and different bits for another M, so the scheduler runs every decode step with
a fixed M (the deployment's `max_batch_size`, padding rows that compute nothing anyone reads).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

ROWS_ATTENTION = "crucible-rows"
# transformer families whose attention calls `cache.update(k, v, layer_idx)` and then the registered attention
# over every cached position (no sliding window, no linear layers): they can share a decode batch
BATCHABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class RowKV:
    """One sequence's keys and values, every layer: `[1, kv_heads, capacity, head_dim]` buffers, `length` filled."""

    def __init__(self, config: Any, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        shape = (1, heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's `k`, `v` (`[1, heads, q, dim]`) after the cached tokens; views of everything so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class StepCache:
    """The cache one forward sees: row i of the batch reads and writes `rows[i]` (None: a padding row).

    It stands in for a transformers `Cache` (the model calls only `update`); `update` hands the attention
    lists of per-row views, which only `ROWS_ATTENTION` knows how to read."""

    def __init__(self, rows: Sequence[RowKV | None]) -> None:
        self.rows = list(rows)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: Any) -> Any:
        keys: list[torch.Tensor | None] = []
        values: list[torch.Tensor | None] = []
        for i, row in enumerate(self.rows):
            k, v = (None, None) if row is None else row.write(layer_idx, key_states[i : i + 1], value_states[i : i + 1])
            keys.append(k)
            values.append(v)
        return keys, values

    def advance(self, tokens: int) -> None:
        """After the forward: every real row now holds `tokens` more."""
        for row in self.rows:
            if row is not None:
                row.length += tokens


def rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    keys: list[torch.Tensor | None],
    values: list[torch.Tensor | None],
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for each row over its own keys (GQA heads shared as SDPA's `enable_gqa` does); a query of q tokens sits
    at the end of its row, so position j of it sees keys up to `length - q + j` (causal with an offset).

    A forward that is not the scheduler's (plain tensors from a transformers cache: a caller that used the model
    without its lock while a step had this attention selected) gets transformers' SDPA, so it is never wrong."""
    if not isinstance(keys, list):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, keys, values, attention_mask, scaling=scaling, dropout=dropout, **_
        )
    batch, heads, q, dim = query.shape
    out = query.new_zeros(batch, q, heads, values[0].shape[-1] if values[0] is not None else dim)
    for i, (k, v) in enumerate(zip(keys, values)):
        if k is None:
            continue
        mask = None
        if q > 1:
            seen = k.shape[2] - q
            mask = torch.ones(q, k.shape[2], dtype=torch.bool, device=k.device).tril(diagonal=seen)
        gqa = k.shape[1] != heads
        row = scaled_dot_product_attention(query[i : i + 1], k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[i] = row[0].transpose(0, 1)
    return out, None


_registered: list[str] = []


def register() -> str:
    """Register `rows_attention` with transformers, once per process."""
    if not _registered:
        from models.llm.attention.kit import register_attention

        register_attention(ROWS_ATTENTION, rows_attention)  # with SDPA's mask builder, for the fallback's masks
        _registered.append(ROWS_ATTENTION)
    return ROWS_ATTENTION


def batchable(model: Any) -> str | None:
    """None when the model's layers can share a decode batch, else why not (the response's `usage` says it)."""
    config = model.config
    kind = getattr(config, "model_type", "")
    if kind not in BATCHABLE_TYPES:
        return f"model type {kind!r} decodes per request (batched: {', '.join(BATCHABLE_TYPES)})"
    if getattr(config, "sliding_window", None) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or []
    ):
        return "sliding-window layers decode per request"
    return None


@contextmanager
def rows_attention_on(model: Any) -> Iterator[None]:
    """The model attends through `ROWS_ATTENTION` inside the block (the caller holds the model's lock, so no
    per-request generation sees the switch); its own attention again after."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = register()
    try:
        yield
    finally:
        config._attn_implementation = before


def forward(model: Any, cache: StepCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits of the last position of each row for `ids` (`[rows, q]`) at `positions`; the rows' caches grow by q.

    The 4-D mask is a placeholder: transformers returns a prepared mask as it is (no mask is built for the
    padded batch), and `rows_attention` makes each row's own."""
    placeholder = torch.ones(ids.shape[0], 1, ids.shape[1], 1, dtype=torch.bool, device=ids.device)
    out = model(
        input_ids=ids, position_ids=positions, attention_mask=placeholder, cache=cache, use_cache=True, logits_to_keep=1
    )
    cache.advance(ids.shape[1])
    return out.logits[:, -1]
