"""HiP invariants: k ≥ T is exact causal attention; every query block gets exactly K_b distinct causal key
blocks; sink and window are always attended; k = 0 leaves StreamingLLM's sink + window; the tree search finds a
planted high-score region and selects what the straightforward search selects; the registered AttentionInterface
function at k ≥ T gives SDPA's logits. The FlexAttention path (float32, the default) is exact in the exact
regimes to 1e-5, equals the pure-torch path, and its tiles' mask is exactly the search's selection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.llm.attention import flex
from models.llm.attention.hip import (
    HiPConfig,
    causal_block_counts,
    hip_attention,
    hip_attention_path,
    hip_tiles,
    key_sets,
    register_hip,
    search_rounds,
    tree_search,
)
from models.llm.attention.kit import prefill_path
from models.llm.model import build_model, llama_config
from models.registry import get_method

torch.set_num_threads(1)


def qkv(t: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, t, d, generator=g, dtype=torch.float64) for _ in range(3))  # type: ignore


def test_budget_at_least_t_is_exact_causal_attention() -> None:
    q, k, v = qkv(100)
    out = hip_attention(q, k, v, 0.25, HiPConfig(top_k=100, block_q=8, block_k=2, window=4, sink=2))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.25, is_causal=True))


def test_every_query_block_gets_exactly_kb_distinct_causal_blocks() -> None:
    q, k, _ = qkv(128, seed=1)
    config = HiPConfig(top_k=16, block_q=8, block_k=2, window=4, sink=2)
    blocks = tree_search(q, k, config)
    counts = causal_block_counts(128, config)
    for i, n_i in enumerate(counts.tolist()):
        chosen = blocks[..., i, :]
        for row in chosen.reshape(-1, config.key_blocks):
            picked = row[row >= 0]
            assert len(set(picked.tolist())) == len(picked) == min(config.key_blocks, n_i)
            assert picked.max() < n_i


def test_sink_and_window_are_always_attended_and_k0_is_streaming_llm() -> None:
    q, k, _ = qkv(96, seed=2)
    for top_k in (0, 16):
        config = HiPConfig(top_k=top_k, block_q=8, block_k=2, window=8, sink=3)
        index, allowed = key_sets(q, k, config)
        for i in range(index.shape[-2]):
            for r in range(8):
                pos = i * 8 + r
                seen = set(index[0, 0, i][allowed[0, 0, i, r]].tolist())
                must = set(range(min(3, pos + 1))) | set(range(max(0, i * 8 - 8), pos + 1))
                assert must <= seen and max(seen) <= pos
                if top_k == 0:
                    assert seen == must


def test_tree_search_finds_a_planted_high_score_region() -> None:
    q, k, _ = qkv(256, seed=3)
    direction = torch.nn.functional.normalize(torch.ones(16, dtype=q.dtype), dim=0)
    q[..., 192:, :] += 4 * direction
    k[..., 40:72, :] += 4 * direction  # 16 key blocks of 2, far outside sink and window
    config = HiPConfig(top_k=32, block_q=16, block_k=2, window=16, sink=2)
    blocks = tree_search(q, k, config)[..., 12:, :]  # query blocks 12..15 (positions 192..255)
    planted = set(range(20, 36))
    found = [len(planted & set(row.tolist())) / len(planted) for row in blocks.reshape(-1, 16)]
    assert min(found) >= 0.75


def test_registered_function_at_full_budget_matches_sdpa_logits() -> None:
    model = build_model(llama_config("micro", vocab_size=128), seed=0).eval()
    ids = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        model.set_attn_implementation(
            register_hip(HiPConfig(top_k=80, block_q=16, block_k=2, window=8, sink=2), name="hip-test-full")
        )
        full = model(input_ids=ids).logits
        model.set_attn_implementation(
            register_hip(HiPConfig(top_k=8, block_q=16, block_k=2, window=8, sink=2), name="hip-test-sparse")
        )
        sparse = model(input_ids=ids).logits
    torch.testing.assert_close(full, reference, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(sparse, reference, atol=1e-4)


def reference_tree_search(q: torch.Tensor, k: torch.Tensor, config: HiPConfig) -> torch.Tensor:
    """The search written plainly: every query block in every round until no branch is wider than one block."""
    kb, t = config.key_blocks, q.shape[-2]
    pad = (-t) % config.block_q, (-t) % config.block_k
    q_blocks = F.pad(q, (0, 0, 0, pad[0])).unflatten(-2, (-1, config.block_q))
    k_blocks = F.pad(k, (0, 0, 0, pad[1])).unflatten(-2, (-1, config.block_k))
    lead, n_q = q.shape[:-2], q_blocks.shape[-3]
    n_i = causal_block_counts(t, config).view(n_q, 1)
    j = torch.arange(kb)
    lo = (j * n_i).div(kb, rounding_mode="floor").expand(*lead, n_q, kb)
    hi = ((j + 1) * n_i).div(kb, rounding_mode="floor").expand(*lead, n_q, kb)
    while (hi - lo).max() > 1:
        mid = lo + (hi - lo + 1) // 2
        cand_lo, cand_hi = torch.cat([lo, mid], dim=-1), torch.cat([mid, hi], dim=-1)
        rep = ((cand_lo + cand_hi - 1) // 2).clamp(min=0)
        keys = torch.gather(
            k_blocks.unsqueeze(-4).expand(*lead, n_q, *k_blocks.shape[-3:]),
            -3,
            rep[..., None, None].expand(*rep.shape, *k_blocks.shape[-2:]),
        )
        score = torch.einsum("...qd,...ckd->...cqk", q_blocks, keys).amax(dim=(-1, -2))
        keep = score.masked_fill(cand_hi <= cand_lo, float("-inf")).topk(kb, dim=-1).indices
        lo, hi = torch.gather(cand_lo, -1, keep), torch.gather(cand_hi, -1, keep)
    return torch.where(hi > lo, lo, -1)


def test_vectorised_search_selects_what_the_plain_search_selects() -> None:
    """Rounds skip the query blocks whose branches are all one block wide (`search_rounds`), and the representative
    keys come by row index: neither changes a selection."""
    for t, config in (
        (300, HiPConfig(16, 8, 2, 8, 2)),
        (1000, HiPConfig(64, 32, 2, 32, 4)),
        (517, HiPConfig(24, 16, 3)),
    ):
        q, k, _ = qkv(t, seed=t)
        ours, plain = tree_search(q, k, config), reference_tree_search(q, k, config)
        assert torch.equal(ours.sort(-1).values, plain.sort(-1).values)
        widest = causal_block_counts(t, config).div(config.key_blocks).ceil()
        assert torch.equal(search_rounds(t, config), torch.log2(widest.clamp(min=1)).ceil().long())


def qkv32(t: int, heads: int = 2, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, heads, t, d, generator=g) for _ in range(3))  # type: ignore[return-value]


def test_flex_path_is_exact_in_the_exact_regimes() -> None:
    """float32 through FlexAttention, to 1e-5: every causal block selected (k ≥ T), or a window covering everything
    (k = 0, window ≥ T), is exact causal attention."""
    q, k, v = qkv32(100)
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.25, is_causal=True)
    for config in (HiPConfig(top_k=100, block_q=8, block_k=2, window=4, sink=2), HiPConfig(0, 16, 2, 128, 0)):
        out, path = hip_attention_path(q, k, v, 0.25, config)
        assert path == "flex"
        torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)


def test_flex_path_equals_the_pure_torch_path() -> None:
    q, k, v = qkv32(300, heads=3, seed=4)
    for config in (HiPConfig(32, 16, 2, 16, 4), HiPConfig(16, 8, 4, 0, 0)):
        flexed = hip_attention(q, k, v, 0.25, config, path="flex")
        torch.testing.assert_close(flexed, hip_attention(q, k, v, 0.25, config, path="gather"), atol=1e-5, rtol=1e-5)
    assert hip_attention_path(q.double(), k.double(), v.double(), 0.25, HiPConfig(16, 8))[1] == "gather"


def test_flex_mask_is_exactly_the_selected_blocks_sink_and_window() -> None:
    """The mask FlexAttention applies — the BlockMask over each tile and the mask_mod on its keys, mapped back
    through the tile's key positions — admits for query i exactly the search's K_b blocks, the sinks and the window
    (its own block included), causally."""
    config = HiPConfig(top_k=16, block_q=8, block_k=2, window=8, sink=3)
    q, k, _ = qkv32(96, seed=5)
    blocks = tree_search(q, k, config)  # [B, H, n_q, K_b]
    tiles = hip_tiles(q, k, config)
    assert tiles.index.shape[-1] % tiles.kv_block == 0 and tiles.index.shape[-1] // tiles.kv_block == 1
    mask = flex.dense_mask(tiles.key_pos, tiles.query_pos)  # [B·n_q, H, b_q, L_k]
    n_q = blocks.shape[-2]
    for b in range(2):
        for h in range(2):
            for i in range(n_q):
                chosen = {int(c) * 2 + o for c in blocks[b, h, i] if c >= 0 for o in range(2)}
                for r in range(8):
                    pos = i * 8 + r
                    seen = set(tiles.index[b * n_q + i, h][mask[b * n_q + i, h, r]].tolist())
                    window = set(range(max(0, i * 8 - 8), pos + 1))
                    assert seen == {p for p in chosen | set(range(3)) | window if p <= pos}


def test_registered_function_takes_the_flex_path_and_records_it() -> None:
    model = build_model(llama_config("micro", vocab_size=128), seed=0).eval()
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        name = register_hip(HiPConfig(top_k=80, block_q=16, block_k=2, window=8, sink=2), name="hip-test-flex")
        model.set_attn_implementation(name)
        prefill_path(name, clear=True)
        full = model(input_ids=ids).logits
    assert prefill_path(name) == "flex"
    torch.testing.assert_close(full, reference, atol=2e-5, rtol=1e-4)


def test_job_reports_dense_hip_and_streaming() -> None:
    import math

    from models.context import InMemoryRunContext
    from models.llm.base import base_model_name
    from models.methods.llm_inference.hip_attention import HiPParams

    ctx = InMemoryRunContext()
    params = HiPParams(
        model=base_model_name(smoke=True),
        top_k=8,
        block_q=8,
        window=8,
        sink=2,
        seq_len=64,
        eval_windows=2,
        passkey_per_depth=1,
    )
    assert get_method("hip-attention").invoke(ctx, params)
    values = {p.name: p.value for p in ctx.metrics}
    assert {"ppl_dense", "ppl_hip", "ppl_streaming_llm", "passkey_hip"} <= set(values)
    assert all(math.isfinite(v) for v in values.values())
