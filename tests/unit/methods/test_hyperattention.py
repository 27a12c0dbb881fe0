"""HyperAttention invariants: lse merging is exact over disjoint key sets; one block (b ≥ T) is exact causal
attention; rows are convex combinations of V; the registered AttentionInterface function at full budget gives
the tiny Llama's SDPA logits. The tiles path (float32, the default; through SDPA's fused CPU kernel or
FlexAttention) is exact with one block to 1e-5 and computes the pure-torch path's function (same draws, same key
sets and weights); FlexAttention's anchor recovers the log-sum-exp exactly, falling back to exact attention on the
rows it cannot resolve."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from models.llm.attention import flex
from models.llm.attention.hyperattention import (
    HyperConfig,
    gray_rank,
    hyper_attention,
    hyper_attention_path,
    recursion_plan,
    register_hyperattention,
)
from models.llm.attention.kit import attention_with_lse, merge_lse, prefill_path
from models.llm.model import build_model, llama_config
from models.registry import get_method

torch.set_num_threads(1)


def qkv(t: int, d: int = 16, heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, t, d, generator=g, dtype=torch.float64) for _ in range(3))  # type: ignore


def test_lse_merge_over_disjoint_key_sets_equals_attention_over_union() -> None:
    q, k, v = qkv(40)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    a, b = perm[:13], perm[13:]
    o1, l1 = attention_with_lse(q, k[..., a, :], v[..., a, :], 0.25)
    o2, l2 = attention_with_lse(q, k[..., b, :], v[..., b, :], 0.25)
    merged, lse = merge_lse(o1, l1, o2, l2)
    exact, exact_lse = attention_with_lse(q, k, v, 0.25)
    torch.testing.assert_close(merged, exact)
    torch.testing.assert_close(lse, exact_lse)
    torch.testing.assert_close(exact, F.scaled_dot_product_attention(q, k, v, scale=0.25))


def test_merge_with_an_empty_set_is_the_identity() -> None:
    q, k, v = qkv(8)
    o, lse = attention_with_lse(q, k, v, 0.3)
    empty_o, empty_lse = attention_with_lse(q, k, v, 0.3, bias=torch.full((8, 8), float("-inf"), dtype=q.dtype))
    assert torch.all(empty_o == 0) and torch.all(torch.isneginf(empty_lse))
    merged, merged_lse = merge_lse(o, lse, empty_o, empty_lse)
    torch.testing.assert_close(merged, o)
    torch.testing.assert_close(merged_lse, lse)


def test_gray_rank_orders_buckets_so_neighbours_differ_in_one_bit() -> None:
    codes = torch.arange(128)
    ranks = gray_rank(codes, 7)
    assert sorted(ranks.tolist()) == list(range(128))
    by_rank = codes[torch.argsort(ranks)]
    flips = (by_rank[1:] ^ by_rank[:-1]).tolist()
    assert all(bin(x).count("1") == 1 for x in flips)


@pytest.mark.parametrize("t", [64, 100])
def test_one_block_is_exact_causal_attention(t: int) -> None:
    q, k, v = qkv(t)
    config = HyperConfig(block_size=t, sample_size=32, min_seq_len=8)  # recursion runs, every block is whole
    out = hyper_attention(q, k, v, 0.25, config)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25, is_causal=True))


def test_small_blocks_approximate_and_rows_are_convex_combinations_of_v() -> None:
    q, k, v = qkv(256, seed=3)
    config = HyperConfig(block_size=16, sample_size=16, lsh_bits=4, min_seq_len=32)
    out = hyper_attention(q, k, v, 0.25, config)
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.25, is_causal=True)
    assert not torch.allclose(out, exact)  # the approximation is really in use
    # convexity: with V = one-hot columns, rows are probability vectors
    eye = torch.eye(256, dtype=q.dtype).expand(1, 2, 256, 256)
    weights = hyper_attention(q, k, eye, 0.25, config)
    assert weights.min() >= -1e-12
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 256, dtype=q.dtype))
    # causal: no weight on future keys
    assert weights.triu(1).abs().max() < 1e-12
    torch.testing.assert_close(out, weights @ v)


def test_lsh_sorting_finds_the_large_entries_on_clustered_data() -> None:
    """Queries and keys in 8 tight clusters (peaked attention): sortLSH blocks + samples approximate exact
    attention better than uniform attention and than the same blocks taken in the unsorted order (0 hyperplanes)."""
    g = torch.Generator().manual_seed(3)
    t = 256
    centres = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1) * 3
    label = torch.randint(0, 8, (1, 2, t), generator=g)
    q = centres[label] + 0.1 * torch.randn(1, 2, t, 16, generator=g, dtype=torch.float64)
    k = centres[label] + 0.1 * torch.randn(1, 2, t, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, t, 16, generator=g, dtype=torch.float64)
    exact = F.scaled_dot_product_attention(q, k, v, scale=1.0, is_causal=True)
    lsh = hyper_attention(q, k, v, 1.0, HyperConfig(block_size=32, sample_size=32, lsh_bits=4, min_seq_len=32))
    unsorted = hyper_attention(q, k, v, 1.0, HyperConfig(block_size=32, sample_size=32, lsh_bits=0, min_seq_len=32))
    uniform = v.cumsum(-2) / torch.arange(1, t + 1, dtype=q.dtype).view(1, 1, -1, 1)
    error = (lsh - exact).norm()
    assert error < 0.7 * (unsorted - exact).norm() and error < 0.5 * (uniform - exact).norm()


def test_noncausal_one_block_is_exact() -> None:
    q, k, v = qkv(48)
    out = hyper_attention(q, k, v, 0.25, HyperConfig(block_size=64, sample_size=8), causal=False)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25))


def test_registered_function_at_full_budget_matches_sdpa_logits() -> None:
    config = llama_config("micro", vocab_size=128)
    model = build_model(config, seed=0).eval()
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    name = register_hyperattention(
        HyperConfig(block_size=128, sample_size=16, min_seq_len=16), name="hyperattention-test-full"
    )
    model.set_attn_implementation(name)
    prefill_path(name, clear=True)
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert prefill_path(name) == "sdpa-tiles"  # the default path on CPU, recorded for serving's usage
    torch.testing.assert_close(full, reference, atol=2e-5, rtol=1e-4)
    model.set_attn_implementation(
        register_hyperattention(
            HyperConfig(block_size=16, sample_size=16, min_seq_len=16), name="hyperattention-test-sparse"
        )
    )
    with torch.no_grad():
        sparse = model(input_ids=ids).logits
        generated = model.generate(ids[:1, :40], max_new_tokens=4, do_sample=False)
    assert not torch.allclose(sparse, reference, atol=1e-4)
    assert math.isfinite(sparse.abs().max().item()) and generated.shape == (1, 44)


def qkv32(t: int, heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, heads, t, 16, generator=g) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("kernel", ["sdpa-tiles", "flex"])
@pytest.mark.parametrize("t", [64, 100])
def test_tiles_path_with_one_block_is_exact(t: int, kernel: str) -> None:
    """float32 through either tile kernel, to 1e-5: one block (b ≥ T) is exact causal and non-causal attention."""
    q, k, v = qkv32(t)
    out, path = hyper_attention_path(
        q, k, v, 0.25, HyperConfig(block_size=t, sample_size=32, min_seq_len=8), path=kernel
    )
    assert path == kernel
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.25, is_causal=True)
    torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)
    out = hyper_attention(q, k, v, 0.25, HyperConfig(block_size=128, sample_size=8), causal=False, path=kernel)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["sdpa-tiles", "flex"])
@pytest.mark.parametrize(
    ("t", "config", "causal"),
    [
        (256, HyperConfig(16, 16, 4, min_seq_len=32), True),
        (300, HyperConfig(32, 32, min_seq_len=40), True),  # uneven halves and leaves, a padded last block
        (200, HyperConfig(32, 16), False),
        (90, HyperConfig(8, 0, 3, min_seq_len=20), True),  # no samples
    ],
)
def test_tiles_path_computes_the_pure_torch_paths_function(
    t: int, config: HyperConfig, causal: bool, kernel: str
) -> None:
    q, k, v = qkv32(t, heads=3, seed=t)
    tiled = hyper_attention(q, k, v, 0.25, config, causal=causal, path=kernel)
    plain = hyper_attention(q, k, v, 0.25, config, causal=causal, path="gather")
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)
    assert hyper_attention_path(q, k, v, 0.25, config, causal)[1] == "sdpa-tiles"  # the CPU default
    assert hyper_attention_path(q.double(), k.double(), v.double(), 0.25, config, causal)[1] == "gather"


def test_recursion_plan_is_the_recursions_leaves_and_splits() -> None:
    leaves, splits = recursion_plan(300, 40)
    assert [s for s, _ in leaves] == list(itertools.accumulate([0] + [n for _, n in leaves][:-1]))
    assert sum(n for _, n in leaves) == 300 and max(n for _, n in leaves) <= 40
    assert splits[-1] == (0, 150, 300, 0) and splits[0] == (0, 37, 75, 2)  # post-order: the deepest first


def test_anchor_lse_is_exact_and_unresolved_rows_fall_back() -> None:
    """Tiles with a causal mask, a bias and a reserved anchor column: o and lse equal exact attention's; a row that
    sees no key gets o = 0, lse = −inf; a row whose anchor sits ~200 nats below its lse (p underflows) and one
    whose anchor is far above it are recomputed exactly."""
    g = torch.Generator().manual_seed(0)
    n, heads, l_q, l_k, d = 3, 2, 16, 32, 8
    q_t, k_t, v_t = flex.lse_tiles(n, heads, l_q, l_k, d, d, torch.float32, torch.device("cpu"))
    q_t[..., :d], k_t[..., :d], v_t[..., :d] = (torch.randn(x[..., :d].shape, generator=g) for x in (q_t, k_t, v_t))
    key_pos = torch.arange(l_k, dtype=torch.int32).expand(n, heads, l_k).clone()
    key_pos[..., 20:] = flex.NEVER
    key_pos[..., 20] = flex.ALWAYS  # the anchor column
    query_pos = torch.arange(l_q, dtype=torch.int32).expand(n, heads, l_q).clone()
    query_pos[0, 0, 3] = -5  # sees nothing
    bias = torch.randn(n, heads, l_k, generator=g)
    allowed = (key_pos.unsqueeze(-2) <= query_pos.unsqueeze(-1)) & (torch.arange(l_k) != 20)
    exact_o, exact_lse = attention_with_lse(
        q_t[..., :d], k_t[..., :d], v_t[..., :d], 0.5, bias=bias.unsqueeze(-2).masked_fill(~allowed, -math.inf)
    )
    anchor = exact_lse.nan_to_num(0.0, neginf=0.0) - 1.0  # a lower bound, as the callers' Jensen bounds are
    anchor[1, 1, 5], anchor[2, 0, 7] = exact_lse[1, 1, 5] - 200.0, exact_lse[2, 0, 7] + 30.0
    o, lse = flex.tile_attention_lse(q_t, k_t, v_t, 0.5, key_pos, query_pos, anchor, 20, key_bias=bias)
    torch.testing.assert_close(o, exact_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(o[0, 0, 3] == 0) and lse[0, 0, 3] == -math.inf


def test_job_reports_perplexity_against_exact_and_timing() -> None:
    from models.context import InMemoryRunContext
    from models.llm.base import base_model_name
    from models.methods.llm_inference.hyperattention import HyperAttentionParams

    ctx = InMemoryRunContext()
    params = HyperAttentionParams(
        model=base_model_name(smoke=True),
        block_size=16,
        sample_size=16,
        min_seq_len=16,
        seq_len=64,
        eval_windows=2,
        timing_length=256,
    )
    assert get_method("hyperattention").invoke(ctx, params)
    assert list(ctx.models) == [base_model_name(smoke=True)]  # the name resolved to the smoke base itself
    names = {p.name for p in ctx.metrics}
    assert {"val_ppl", "val_ppl_exact", "delta_ppl", "speedup"} <= names
    assert all(math.isfinite(p.value) for p in ctx.metrics)


def test_held_out_blocks_are_consecutive_disjoint_windows() -> None:
    """Block 0 is the windows every job evaluates; block b the next `n` windows, so seeds see disjoint sets."""
    from models.context import InMemoryRunContext
    from models.datasets import load_builtin
    from models.llm.attention.measure import held_out_block
    from models.llm.base import base_model
    from models.llm.data import split_windows
    from models.llm.folder import load_folder

    tokenizer = load_folder(base_model(InMemoryRunContext(), smoke=True)).tokenizer
    texts = load_builtin("stdlib-code").val["text"]
    first, second = (held_out_block(tokenizer, texts, 32, 3, block) for block in (0, 1))
    assert torch.equal(first, split_windows(tokenizer, texts, 32, 3))
    assert torch.equal(torch.cat([first, second]), split_windows(tokenizer, texts, 32, 6))
    with pytest.raises(ValueError, match="fewer than block"):
        held_out_block(tokenizer, ["def f():\n    return 1\n"], 8, 2, 5)
