"""PPD's sparse candidate tree (§3.3) and hardware-aware size (§3.4): tree decoding reproduces greedy decoding token
for token for any tree and prompts; a chain's tree mask is the chain mask; a step accepts at most depth + 1 tokens;
every node's and prompt group's logits under the tree mask and positions equal a plain forward of its path; the
compacted KV cache equals the cache of the accepted path alone; the tree is the N most probable rank paths and is
closed under prefixes; the size selector maximises expected tokens per second for a given latency table."""

from __future__ import annotations

import itertools

import pytest
import torch

from models.llm.generation import SamplingParams, generate_tokens
from models.llm.model import build_model, llama_config
from models.llm.parallel_prompt import PromptTokens, greedy_rank_acceptance, ppd_generate
from models.llm.prompt_tree import (
    SparseTree,
    chain_tree,
    choose_tree_size,
    expected_accepted,
    keep_cache_rows,
    latency_envelope,
    measure_tree_latency,
    path_probability,
    sparse_tree,
    tree_mask,
    tree_positions,
)
from tests.unit.methods.test_ppd import chain_mask

torch.set_num_threads(1)
VOCAB = 256


@pytest.fixture(scope="module")
def model():
    return build_model(llama_config("micro", VOCAB), seed=0).eval()


def random_prompts(model, m: int, seed: int) -> PromptTokens:
    prompts = PromptTokens(m, model.config.hidden_size)
    with torch.no_grad():
        prompts.embeddings.copy_(
            torch.randn(m, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
        )
    return prompts


def random_rates(m: int, k: int, seed: int) -> torch.Tensor:
    """Per-offset rank acceptance rates: decreasing in the rank, each row summing to < 1."""
    raw = torch.rand(m, k, generator=torch.Generator().manual_seed(seed)).sort(dim=1, descending=True).values
    return raw / (raw.sum(1, keepdim=True) * 1.25)


def greedy(model, prefix: list[int], n: int) -> list[int]:
    return list(generate_tokens(model, prefix, SamplingParams(max_tokens=n, temperature=0.0), torch.Generator()))


def prefix_ids(seed: int, n: int = 12) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("nodes", [1, 3, 8, 20])
def test_tree_decoding_equals_greedy_and_accepts_at_most_depth_plus_one(model, nodes):
    tree = sparse_tree(random_rates(3, 4, nodes), nodes)
    assert tree.nodes == nodes
    for seed in range(3):
        prefix = prefix_ids(100 + seed)
        result = ppd_generate(model, random_prompts(model, 3, seed), prefix, 24, tree=tree)
        assert result.tokens == greedy(model, prefix, 24)
        assert all(1 <= a <= tree.depth + 1 for a in result.accepted)


def test_tree_accepts_guesses_beyond_the_first_rank(model):
    """Prompts steered to the token the base repeats: a wide tree still accepts, stays greedy, saves forwards."""
    prefix = prefix_ids(7)
    reference = greedy(model, prefix, 40)
    prompts = PromptTokens(3, model.config.hidden_size)
    with torch.no_grad():
        prompts.embeddings.copy_(model.get_input_embeddings().weight[reference[-1]].expand(3, -1))
    result = ppd_generate(model, prompts, prefix, 40, tree=sparse_tree(random_rates(3, 3, 1), 12))
    assert result.tokens == reference
    assert result.forwards <= len(result.tokens)


def test_chain_tree_mask_is_the_chain_mask():
    for cached, m in [(0, 3), (5, 2), (9, 0), (4, 4)]:
        tree = chain_tree(m)
        assert torch.equal(
            tree_mask(cached, tree.parents, m, torch.float32), chain_mask(cached, m + 1, m, torch.float32)
        )
    assert tree_positions(chain_tree(2).depths, 2) == [0, 1, 2, 1, 2, 2, 3, 3, 4]


def test_chain_tree_decodes_like_the_default_chain(model):
    prefix = prefix_ids(3)
    prompts = random_prompts(model, 3, 3)
    a = ppd_generate(model, prompts, prefix, 20)
    b = ppd_generate(model, prompts, prefix, 20, tree=chain_tree(3))
    assert a.tokens == b.tokens and a.accepted == b.accepted


def test_tree_step_logits_match_plain_forwards_of_each_path(model):
    """Under the tree mask and positions, node j's logits and its prompt group's logits equal the uncached forward
    of prefix + j's path (+ prompts)."""
    from transformers import DynamicCache

    m = 2
    prompts = random_prompts(model, m, 21)
    tree = SparseTree(((0,), (1,), (0, 0), (0, 1), (1, 0)))
    tokens = [7, 40, 41, 90, 91, 92]  # root, then the nodes in tree order
    prefix = torch.tensor([prefix_ids(22, 9)])
    embed = model.get_input_embeddings()
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prefix, cache=cache, use_cache=True)
        n = len(tokens)
        x = torch.cat([embed(torch.tensor([tokens])), prompts.embeddings.repeat(n, 1)[None]], dim=1)
        logits = model(
            inputs_embeds=x,
            cache=cache,
            use_cache=True,
            attention_mask=tree_mask(9, tree.parents, m, x.dtype),
            position_ids=torch.tensor([[9 + o for o in tree_positions(tree.depths, m)]]),
        ).logits[0]
        for j in range(n):
            path, a = [], j
            while a >= 0:
                path.insert(0, tokens[a])
                a = tree.parents[a]
            seq = embed(torch.cat([prefix, torch.tensor([path])], dim=1))
            assert torch.allclose(logits[j], model(inputs_embeds=seq).logits[0, -1], atol=1e-5)
            ref = model(inputs_embeds=torch.cat([seq, prompts.embeddings[None]], dim=1)).logits[0, -m:]
            assert torch.allclose(logits[n + j * m : n + (j + 1) * m], ref, atol=1e-5)
        # compaction to the accepted path root → (1,) → (1, 0) leaves exactly that path's keys and values
        keep_cache_rows(cache, 9, [0, 2, 5])
        plain = DynamicCache(config=model.config)
        model(input_ids=torch.cat([prefix, torch.tensor([[7, 41, 92]])], dim=1), cache=plain, use_cache=True)
        assert cache.get_seq_length() == 12
        for ours, ref in zip(cache.layers, plain.layers):
            assert torch.allclose(ours.keys, ref.keys, atol=1e-5) and torch.allclose(ours.values, ref.values, atol=1e-5)


def test_sparse_tree_keeps_the_most_probable_prefix_closed_paths():
    m, k = 3, 3
    rates = random_rates(m, k, 5)
    every = [p for d in range(1, m + 1) for p in itertools.product(range(k), repeat=d)]
    for nodes in (1, 4, 10, 39, 60):
        tree = sparse_tree(rates, nodes)
        assert tree.nodes == min(nodes, len(every))
        assert all(len(p) == 1 or p[:-1] in tree.paths for p in tree.paths)
        rest = [path_probability(p, rates) for p in every if p not in tree.paths]
        assert not rest or min(path_probability(p, rates) for p in tree.paths) >= max(rest) - 1e-12
    # a top-1 that dominates every other rank makes the best m-node tree the chain
    dominant = torch.tensor([[0.9, 0.05], [0.8, 0.1], [0.7, 0.1]])
    assert sparse_tree(dominant, 3) == chain_tree(3)
    a = dominant[:, 0]
    assert expected_accepted(chain_tree(3), dominant) == pytest.approx(1 + a[0] + a[0] * a[1] + a[0] * a[1] * a[2])


def test_sparse_tree_rejects_paths_without_their_prefix():
    with pytest.raises(ValueError):
        SparseTree(((0,), (1, 0)))


def test_tree_size_selector_maximises_expected_tokens_per_second():
    rates = random_rates(3, 4, 9)
    sizes = [1, 2, 4, 8, 16, 32, 64]
    flat = {n: 0.01 for n in sizes}  # latency independent of the size: the largest tree wins
    assert choose_tree_size(rates, flat)[0] == 64
    steep = {n: 0.01 * (n + 1) for n in sizes}  # latency linear in the tree: the smallest wins
    assert choose_tree_size(rates, steep)[0] == 1
    table = {1: 0.010, 2: 0.010, 4: 0.011, 8: 0.012, 16: 0.020, 32: 0.040, 64: 0.080}
    best, speed = choose_tree_size(rates, table)
    expected = {n: expected_accepted(sparse_tree(rates, n), rates) / s for n, s in table.items()}
    assert speed == pytest.approx(expected) and best == max(expected, key=expected.get)


def test_latency_is_measured_for_every_size(model):
    latency = measure_tree_latency(model, 3, [1, 4], context=16, repeats=1)
    assert set(latency) == {1, 4} and all(s > 0 for s in latency.values())


def test_latency_envelope_is_the_non_decreasing_lower_bound():
    assert latency_envelope({1: 0.015, 2: 0.010, 4: 0.012, 8: 0.011, 16: 0.02}) == {
        1: 0.010,
        2: 0.010,
        4: 0.011,
        8: 0.011,
        16: 0.02,
    }


def test_greedy_rank_acceptance_counts_ranks_along_the_greedy_continuation(model):
    """Brute force: at every point c of each prefix's greedy continuation, prompt token i's logits after seq[:c]
    ranked against the greedy token seq[c+1+i] (points c from the prefix's end to T - m, as `random_cuts` draws)."""
    m, k, new = 2, 4, 8
    prompts = random_prompts(model, m, 30)
    prefixes = torch.tensor([prefix_ids(31, 6), prefix_ids(32, 6)])
    rates = greedy_rank_acceptance(model, prompts, prefixes, new, k)
    hits, total = torch.zeros(m, k), 0
    embed = model.get_input_embeddings()
    with torch.no_grad():
        for p in prefixes.tolist():
            seq = p + greedy(model, p, new + m)  # the targets of the last points run past the continuation
            for c in range(len(p), len(p) + new - m + 1):
                x = torch.cat([embed(torch.tensor([seq[:c]])), prompts.embeddings[None]], dim=1)
                top = model(inputs_embeds=x).logits[0, -m:].topk(k, dim=-1).indices
                hits += (top == torch.tensor(seq[c + 1 : c + 1 + m])[:, None]).float()
                total += 1
    assert torch.allclose(rates, hits / total)
