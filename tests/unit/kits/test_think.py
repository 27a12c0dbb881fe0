"""ThinK key-channel pruning: λ = 0 changes nothing, pruned channels add nothing to q·k (zeroed storage equals the
narrow layout), selection follows the queries, bytes count only kept channels, and channels and masked keys equal
kvpress 0.5.5's `ThinKPress` on the same tensors."""

from __future__ import annotations

import pytest
import torch

from models.llm.kv_cache.cache import dense_kv_bytes
from models.llm.kv_cache.evaluation import continuation_nll, prefill
from models.llm.kv_cache.press import prefill_queries
from models.llm.kv_cache.presses import SnapKV
from models.llm.kv_cache.think import ThinK, channel_scores, pruned_channels, zero_channels
from tests.unit.kits.test_kv_cache import CONTEXT

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def layer0(layer_inputs):
    """Layer 0's attention module, input, position embeddings, keys and values for the first CONTEXT tokens."""
    attn, captured, keys, values, _ = layer_inputs
    return attn, captured["hidden"], captured["pe"], keys, values


def test_ratio_zero_leaves_the_cache_and_the_continuation_unchanged(model, ids):
    dense = continuation_nll(model, ids, CONTEXT, None)
    assert continuation_nll(model, ids, CONTEXT, ThinK(0.0)).nll == pytest.approx(dense.nll, abs=1e-6)
    snap = continuation_nll(model, ids, CONTEXT, SnapKV(12, window=4))
    both = continuation_nll(model, ids, CONTEXT, ThinK(0.0, tokens=SnapKV(12, window=4)))
    assert both.nll == pytest.approx(snap.nll, abs=1e-6) and both.kv_bytes == snap.kv_bytes


def test_pruned_channels_contribute_nothing_to_attention(layer0):
    """Zeroed storage is the narrow layout: softmax(q·k_zeroed) equals softmax over the kept channels alone."""
    attn, hidden, pe, keys, _ = layer0
    queries = prefill_queries(attn, hidden, pe)
    press = ThinK(0.5, window=6, recent=0)
    out = press.compress(attn, keys, keys, None, queries=queries)
    channels = pruned_channels(channel_scores(queries[..., -6:, :], keys), 0.5)
    kept = torch.ones_like(keys[:, :, 0], dtype=torch.bool).scatter(-1, channels, False)  # [B, H, d]
    assert out.key_channels == keys.shape[-1] // 2 and int(kept[0, 0].sum()) == out.key_channels
    q = torch.randn(*queries.shape, generator=torch.Generator().manual_seed(3))
    full = (q @ out.keys.transpose(-1, -2)).softmax(-1)
    gather = kept.nonzero()[:, -1].view(*kept.shape[:2], -1)  # kept channel indices [B, H, d']
    narrow_q = q.gather(-1, gather.unsqueeze(2).expand(-1, -1, q.shape[2], -1))
    narrow_k = keys.gather(-1, gather.unsqueeze(2).expand(-1, -1, keys.shape[2], -1))
    assert torch.allclose(full, (narrow_q @ narrow_k.transpose(-1, -2)).softmax(-1), atol=1e-6)
    assert (out.keys.gather(-1, channels.unsqueeze(2).expand(-1, -1, keys.shape[2], -1)) == 0).all()


def test_selection_is_query_driven():
    """A channel with the largest keys but no query energy in the window is pruned; with equal keys the channels
    the window's queries ignore go first."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 10, 8, generator=g)
    keys[..., 3] *= 100
    queries = torch.randn(1, 2, 10, 8, generator=g)
    queries[:, :, -4:, 3] = 0
    assert (pruned_channels(channel_scores(queries[..., -4:, :], keys), 0.25) == 3).any(-1).all()


def test_recent_slots_keep_every_channel(layer0):
    attn, hidden, pe, keys, values = layer0
    out = ThinK(0.75, window=6, recent=5).compress(attn, keys, values, None, queries=prefill_queries(attn, hidden, pe))
    assert torch.equal(out.keys[:, :, -5:], keys[:, :, -5:]) and out.narrow_slots == CONTEXT - 5
    assert (out.keys[:, :, :-5] == 0).sum() >= keys.shape[0] * keys.shape[1] * (CONTEXT - 5) * 24


def test_bytes_count_only_kept_channels(model, ids):
    d, heads, layers = model.config.head_dim, model.config.num_key_value_heads, model.config.num_hidden_layers
    _, cache = prefill(model, ids[:, :CONTEXT], ThinK(0.5, window=4, recent=4))
    narrow = layers * 2 * heads * (CONTEXT - 4) * (d // 2) * 4
    assert cache.kv_bytes() == dense_kv_bytes(model.config, CONTEXT, batch=2) - narrow
    _, cache = prefill(model, ids[:, :CONTEXT], ThinK(0.5, window=4, recent=4, tokens=SnapKV(12, window=4)))
    assert cache.kv_bytes() == dense_kv_bytes(model.config, 12, batch=2) - layers * 2 * heads * 8 * (d // 2) * 4
    with torch.no_grad():  # decoding appends full-width keys, counted whole
        model(input_ids=ids[:, CONTEXT : CONTEXT + 1], cache=cache)
    assert cache.kv_bytes() == dense_kv_bytes(model.config, 13, batch=2) - layers * 2 * heads * 8 * (d // 2) * 4


def test_channels_and_masked_keys_match_kvpress(layer0):
    kvpress = pytest.importorskip("kvpress", reason="kvpress not installed (pip install --no-deps kvpress)")
    attn, hidden, pe, keys, values = layer0
    for ratio in (0.25, 0.5, 0.75):
        theirs, _ = kvpress.ThinKPress(key_channel_compression_ratio=ratio, window_size=6).compress(
            attn, hidden, keys.clone(), values, None, {"hidden_states": hidden, "position_embeddings": pe}
        )
        ours = ThinK(ratio, window=6, recent=0).compress(
            attn, keys, values, None, queries=prefill_queries(attn, hidden, pe)
        )
        assert torch.equal(theirs == 0, ours.keys == 0) and ours.key_channels == 32 - int(32 * ratio)
        assert torch.allclose(theirs, ours.keys, atol=1e-6)


def test_zero_channels_touches_only_the_leading_slots():
    keys = torch.ones(1, 1, 5, 4)
    out = zero_channels(keys, torch.tensor([[[1, 2]]]), 3)
    assert out[0, 0, :3, 1:3].abs().sum() == 0 and (out[0, 0, 3:] == 1).all() and (out[..., [0, 3]] == 1).all()
