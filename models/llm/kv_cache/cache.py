"""A transformers `Cache` whose layers may hold fewer key/value slots than tokens seen: the one cache every KV
compression method (EMS and the kvpress-style eviction baselines, MatryoshkaKV's low-rank keys and values) writes.

Why a subclass rather than overwriting `DynamicCache` tensors the way kvpress does: after compression the number of
stored slots S is smaller than the number of tokens seen N, and transformers 5 derives both the next tokens'
positions (`get_seq_length`) and the causal mask (`get_mask_sizes`) from the cache. A plain `DynamicLayer` would
report S, so new tokens would get positions S, S+1, … (wrong RoPE) and a continued chunk's mask would let early
queries see later keys. `CompressedLayer` reports N as the sequence length and (S + q, N − S) as the mask's
(kv_length, kv_offset) — the same bookkeeping `DynamicSlidingWindowLayer` uses — so the stored slots sit at
positions before every new query and the new tokens keep exact causal order.

Head-wise variable budgets (AdaKV) pad each head to the longest one and carry a validity mask [B, H, S]; the layer
hands it to the attention call as the `kv_valid` keyword (through the `kwargs` dict the attention module passes to
`Cache.update`), and only `headwise_sdpa` (registered as `HEADWISE_ATTENTION`) applies it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

HEADWISE_ATTENTION = "sdpa-headwise"


class CompressedLayer(DynamicLayer):
    """One layer's keys/values [B, H, S, d_k] / [B, H, S, d_v] for N ≥ S tokens seen (d_k, d_v may be < head_dim
    for a projected cache). `compressed` is set once the prefill has been compressed (later chunks append)."""

    is_croppable = False

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.seen = 0
        self.valid: torch.Tensor | None = None
        self.compressed = False
        self.key_channels: int | None = None  # informative key channels of the first `narrow_slots` slots (ThinK)
        self.narrow_slots = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen += key_states.shape[-2]
        keys, values = super().update(key_states, value_states)
        if self.valid is not None:
            fresh = torch.ones(*key_states.shape[:-1], dtype=torch.bool, device=key_states.device)
            self.valid = torch.cat([self.valid, fresh], dim=-1)
            forward_kwargs = kwargs.get("kwargs")
            if isinstance(forward_kwargs, dict):
                forward_kwargs["kv_valid"] = self.valid
        return keys, values

    def replace(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor | None = None,
        key_channels: int | None = None,
        narrow_slots: int | None = None,
    ) -> None:
        """Swap in the compressed slots for the tokens seen so far (the count of tokens seen is unchanged).
        `key_channels` < d_k: the first `narrow_slots` slots' (all by default) other key channels are zeros a
        channel-pruned layout would not store."""
        self.keys, self.values = keys.contiguous(), values.contiguous()
        self.valid = None if valid is None or bool(valid.all()) else valid
        self.compressed = True
        self.key_channels = key_channels
        self.narrow_slots = 0 if key_channels is None else keys.shape[-2] if narrow_slots is None else narrow_slots

    def stored(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored()
        return stored + query_length, self.seen - stored

    def kv_bytes(self) -> int:
        """Bytes of the slots that hold information (a padded AdaKV slot costs nothing in a real ragged layout)."""
        if self.keys is None or self.keys.numel() == 0:
            return 0
        per_slot = self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()
        total = self._slots() * per_slot
        if self.key_channels is not None:  # the channel-pruned prefill slots store only their kept key channels
            total -= (
                self._slots(self.narrow_slots) * (self.keys.shape[-1] - self.key_channels) * self.keys.element_size()
            )
        return total

    def _slots(self, first: int | None = None) -> int:
        """Valid (batch, head, slot) entries among the first `first` slots (all slots by default)."""
        n = self.keys.shape[2] if first is None else first
        if self.valid is not None:
            return int(self.valid[..., :n].sum())
        return self.keys.shape[0] * self.keys.shape[1] * n


class CompressedCache(DynamicCache):
    """A `DynamicCache` made of `CompressedLayer`s (one per decoder layer, created lazily)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = CompressedLayer

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers if isinstance(layer, CompressedLayer))


def kv_bytes(cache: Any) -> int:
    """Bytes of keys and values a cache holds (any transformers cache; `CompressedCache` counts valid slots only)."""
    if isinstance(cache, CompressedCache):
        return cache.kv_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def dense_kv_bytes(config: Any, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes an uncompressed cache of `tokens` tokens takes for a model config (keys + values, every layer)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * batch * config.num_hidden_layers * heads * tokens * head_dim * element


def headwise_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    kv_valid: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA that also hides the padded slots of a head-wise variable-length cache (`kv_valid` [B, H_kv, S']).

    Layers of such a cache hold different numbers of slots while the model builds one mask from layer 0's sizes,
    so with `kv_valid` the mask is rebuilt here: causal over the stored slots then the new tokens, for unpadded
    batches (the evaluation's; a padded batch is not supported with head-wise budgets). `dropout` stays the sixth
    positional parameter, as in transformers' own attention functions: kvpress wraps every registered function
    and passes it positionally."""
    n, m = query.shape[-2], key.shape[-2]
    if kv_valid is not None:
        groups = query.shape[1] // key.shape[1]
        valid = kv_valid[..., -m:].repeat_interleave(groups, dim=1)[:, :, None, :]  # [B, H, 1, m]
        causal = torch.ones(n, m, dtype=torch.bool, device=query.device).tril(m - n)
        attention_mask = causal & valid
        kwargs["is_causal"] = False
    elif attention_mask is not None and attention_mask.shape[-1] != m:
        # an unpadded layer of a head-wise cache whose slot count differs from layer 0's (the mask's source)
        attention_mask = torch.ones(n, m, dtype=torch.bool, device=query.device).tril(m - n)
        kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


AttentionInterface.register(HEADWISE_ATTENTION, headwise_sdpa)
AttentionMaskInterface.register(HEADWISE_ATTENTION, sdpa_mask)
