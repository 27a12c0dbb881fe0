"""The KV-cache kit and the kvpress-baseline presses: a compressed cache keeps positions and causal order exact,
padded head-wise slots are invisible, bytes are counted, and our presses agree with kvpress's own scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.llm.kv_cache.cache import dense_kv_bytes, headwise_sdpa
from models.llm.kv_cache.evaluation import continuation_nll, prefill
from models.llm.kv_cache.press import prefill_attention
from models.llm.kv_cache.presses import (
    H2O,
    AdaKV,
    SnapKV,
    StreamingLLM,
    adakv_keep_mask,
    observed_attention_scores,
    snapkv_scores,
)
from models.llm.model import build_model, llama_config

torch.set_num_threads(1)
VOCAB, T, CONTEXT = 256, 40, 30


@pytest.fixture(scope="module")
def model():
    return build_model(llama_config("micro", VOCAB), seed=0).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


def test_uncompressed_cache_reproduces_the_plain_forward(model, ids):
    with torch.no_grad():
        full = model(input_ids=ids).logits
        last, cache = prefill(model, ids[:, :CONTEXT], None)
        rest = model(input_ids=ids[:, CONTEXT:], cache=cache).logits
    assert torch.allclose(last, full[:, CONTEXT - 1], atol=1e-5)
    assert torch.allclose(rest, full[:, CONTEXT:], atol=1e-5)
    assert cache.get_seq_length() == T
    assert cache.kv_bytes() == dense_kv_bytes(model.config, T, batch=2)


def test_evicted_cache_equals_masking_the_evicted_tokens_from_later_queries(model, ids):
    """StreamingLLM drops the same tokens in every layer and head, so reading the continuation through the compressed
    cache must equal a full forward where continuation queries cannot see those tokens (positions kept exact)."""
    budget, sinks = 12, 2
    with torch.no_grad():
        _, cache = prefill(model, ids[:, :CONTEXT], StreamingLLM(budget, sinks=sinks))
        assert cache.layers[0].keys.shape[2] == budget and cache.get_seq_length() == CONTEXT
        rest = model(input_ids=ids[:, CONTEXT:], cache=cache).logits
        visible = torch.ones(T, T, dtype=torch.bool).tril()
        dropped = torch.arange(sinks, CONTEXT - (budget - sinks))
        visible[CONTEXT:, dropped] = False
        mask = torch.zeros(T, T).masked_fill(~visible, float("-inf"))[None, None].expand(2, 1, T, T)
        reference = model(input_ids=ids, attention_mask=mask).logits[:, CONTEXT:]
    assert torch.allclose(rest, reference, atol=1e-4)


def test_budget_at_least_the_context_changes_nothing(model, ids):
    dense = continuation_nll(model, ids, CONTEXT, None)
    for press in (StreamingLLM(CONTEXT), H2O(CONTEXT), SnapKV(CONTEXT), AdaKV(CONTEXT)):
        assert continuation_nll(model, ids, CONTEXT, press).nll == pytest.approx(dense.nll, abs=1e-6)


def test_padded_headwise_slots_are_invisible():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g) for _ in range(3))
    clean = F.scaled_dot_product_attention(q, k, v, is_causal=False)
    garbage = torch.randn(1, 2, 2, 8, generator=g) * 10
    k_pad, v_pad = torch.cat([garbage, k], dim=2), torch.cat([garbage, v], dim=2)
    valid = torch.tensor([[[False, False, True, True, True]] * 2])
    # the 3 queries are the last 3 tokens of a sequence whose 3 keys are visible: decode-style (no causal cut)
    out, _ = headwise_sdpa(torch.nn.Module(), q[:, :, -1:], k_pad, v_pad, None, kv_valid=valid)
    assert torch.allclose(out.transpose(1, 2), F.scaled_dot_product_attention(q[:, :, -1:], k, v), atol=1e-6)
    assert clean.shape == (1, 2, 3, 8)


def test_adakv_spends_the_layer_budget_and_keeps_a_floor_per_head():
    scores = torch.rand(2, 4, 50, generator=torch.Generator().manual_seed(0))
    scores[:, 0] *= 100  # one head dominates
    keep = adakv_keep_mask(scores, budget=10, alpha=0.2)
    assert (keep.sum((-1, -2)) == 40).all()
    assert (keep.sum(-1) >= 2).all()
    assert (keep[:, 0].sum(-1) > 10).all()


def test_adakv_cache_has_padding_bytes_excluded(model, ids):
    with torch.no_grad():
        _, cache = prefill(model, ids[:, :CONTEXT], AdaKV(8, window=4))
    layer = cache.layers[0]
    heads, head_dim = layer.keys.shape[1], layer.keys.shape[-1]
    assert cache.kv_bytes() == len(cache.layers) * 2 * heads * 8 * 2 * head_dim * 4


# -- parity with kvpress's own presses (kvpress 0.5 pins transformers < 5.3; its scoring code still imports) ------


def _kvpress():
    return pytest.importorskip("kvpress", reason="kvpress not installed (pip install --no-deps kvpress)")


def _ratio(t: int, budget: int) -> float:
    from kvpress.utils import compute_n_kept

    ratio = (t - budget) / t
    while compute_n_kept(t, ratio) < budget:
        ratio -= 1e-9
    return ratio


@pytest.fixture(scope="module")
def layer_inputs(model, ids):
    """Layer 0's input, keys, values and prefill attention for the first CONTEXT tokens."""
    captured = {}

    def hook(module, args, kwargs, output):
        captured.update(hidden=kwargs["hidden_states"], pe=kwargs["position_embeddings"])

    attn = model.model.layers[0].self_attn
    handle = attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        _, cache = prefill(model, ids[:, :CONTEXT], None)
    handle.remove()
    keys, values = cache.layers[0].keys, cache.layers[0].values
    attention = prefill_attention(attn, captured["hidden"], keys, captured["pe"])
    return attn, captured, keys, values, attention


def test_observed_attention_scores_match_kvpress(layer_inputs):
    kvpress = _kvpress()
    attn, cap, keys, values, attention = layer_inputs
    theirs = kvpress.ObservedAttentionPress(0.5).score(attn, cap["hidden"], keys, values, attention, {})
    assert torch.allclose(observed_attention_scores(attention, keys.shape[1]), theirs, atol=1e-6)


def test_snapkv_scores_and_selection_match_kvpress(layer_inputs):
    kvpress = _kvpress()
    attn, cap, keys, values, attention = layer_inputs
    press = kvpress.SnapKVPress(_ratio(CONTEXT, 12), window_size=6, kernel_size=5)
    kwargs = {"position_embeddings": cap["pe"]}
    theirs = press.score(attn, cap["hidden"], keys, values, None, kwargs)  # kvpress recomputes the window attention
    assert torch.allclose(snapkv_scores(attention, 6, 5, keys.shape[1]), theirs, atol=1e-5)
    k_theirs, _ = press.compress(attn, cap["hidden"], keys, values, None, kwargs)
    ours = SnapKV(12, window=6, kernel=5).compress(attn, keys, values, attention)
    assert torch.allclose(ours.keys.sort(dim=2).values, k_theirs.sort(dim=2).values, atol=1e-6)


def test_streaming_llm_selection_matches_kvpress(layer_inputs):
    kvpress = _kvpress()
    attn, cap, keys, values, attention = layer_inputs
    k_theirs, v_theirs = kvpress.StreamingLLMPress(_ratio(CONTEXT, 10), n_sink=3).compress(
        attn, cap["hidden"], keys, values, None, {}
    )
    ours = StreamingLLM(10, sinks=3).compress(attn, keys, values, None)
    assert torch.equal(ours.keys.sort(dim=2).values, k_theirs.sort(dim=2).values)
    assert torch.equal(ours.values.sort(dim=2).values, v_theirs.sort(dim=2).values)


def test_adakv_kept_tokens_match_kvpress(layer_inputs):
    kvpress = _kvpress()
    attn, cap, keys, values, attention = layer_inputs
    budget = 10
    press = kvpress.AdaKVPress(kvpress.SnapKVPress(_ratio(CONTEXT, budget), window_size=6), alpha_safeguard=0.2)
    press.compress(attn, cap["hidden"], keys, values, attention, {"position_embeddings": cap["pe"]})
    batch, head, seq = attn.masked_key_indices
    theirs = torch.ones(keys.shape[:3], dtype=torch.bool)
    theirs[batch, head, seq] = False
    attn.masked_key_indices = None
    ours = adakv_keep_mask(snapkv_scores(attention, 6, 5, keys.shape[1]), budget, 0.2)
    assert torch.equal(ours, theirs)
