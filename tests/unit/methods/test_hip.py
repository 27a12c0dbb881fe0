"""HiP invariants: k ≥ T is exact causal attention; every query block gets exactly K_b distinct causal key
blocks; sink and window are always attended; k = 0 leaves StreamingLLM's sink + window; the tree search finds a
planted high-score region; the registered AttentionInterface function at k ≥ T gives SDPA's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.llm.attention.hip import HiPConfig, causal_block_counts, hip_attention, key_sets, register_hip, tree_search
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
