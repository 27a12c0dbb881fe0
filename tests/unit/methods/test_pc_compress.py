"""pc-compress (Liu, Mandt & Van den Broeck, ICLR 2022): the HCLT's exact marginals, the path-only conditionals,
the rANS round trip, EM's monotonicity, and agreement with spflow's Chow–Liu tree."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models.compression import ans
from models.compression.chow_liu import (
    RootedTree,
    chow_liu_tree,
    maximum_spanning_tree,
    pairwise_mutual_information,
    rooted_at,
)
from models.compression.conditionals import ConditionalEvaluator
from models.compression.data import discrete_images
from models.compression.em import EMSchedule, fit_hclt, load_hclt
from models.compression.hclt import HCLT
from models.context import InMemoryRunContext
from models.datasets import load_builtin
from models.methods.generative.pc_compress import PCCompressParams
from models.registry import get_method

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    return discrete_images()


@pytest.fixture(scope="module")
def hclt(digits) -> HCLT:
    tree = chow_liu_tree(digits.train, digits.levels)
    start = HCLT.random(tree, 6, digits.levels, torch.Generator().manual_seed(0))
    return fit_hclt(InMemoryRunContext(), start, digits.train, EMSchedule(epochs=3), seed=0)


def tree_sample(n: int, size: int, levels: int, seed: int) -> tuple[torch.Tensor, RootedTree]:
    """Draws from a random tree-shaped Bayesian network with strong, distinct edge dependencies."""
    rng = np.random.default_rng(seed)
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, size)]
    x = np.zeros((n, size), dtype=np.int64)
    x[:, 0] = rng.integers(0, levels, n)
    for i in range(1, size):
        noise = rng.random(n) < 0.1 + 0.3 * rng.random()  # each edge its own strength
        x[:, i] = np.where(noise, rng.integers(0, levels, n), (x[:, parents[i]] + i) % levels)
    return torch.from_numpy(x), RootedTree(tuple(parents))


def test_decode_of_encode_is_the_test_set_as_one_stream(digits, hclt):
    words = ans.encode(ConditionalEvaluator(hclt), digits.test)
    assert torch.equal(ans.decode(ConditionalEvaluator(hclt), words, *digits.test.shape), digits.test)
    theoretical = -float(hclt.log_likelihood(digits.test).sum()) / math.log(2)
    assert theoretical <= 32 * len(words) <= 1.01 * theoretical + 64


def test_product_of_conditionals_is_the_one_pass_likelihood(digits, hclt):
    chain = ans.conditional_log_probs(ConditionalEvaluator(hclt), digits.test[:50])
    torch.testing.assert_close(chain, hclt.log_likelihood(digits.test[:50]), rtol=0, atol=1e-5)


def test_marginals_over_a_variables_values_sum_to_the_prefix_marginal(digits, hclt):
    x = digits.test[:20]
    evaluator = ConditionalEvaluator(hclt)
    evaluator.start(len(x))
    observed = torch.zeros_like(x, dtype=torch.bool)
    for var in evaluator.order[:12]:
        joint = evaluator.joint_log_probs(var)  # log p(x_<i, X_i = v), v = 0..K-1
        prefix = hclt.log_likelihood(x, observed)  # log p(x_<i) by an upward pass with later leaves at 1
        torch.testing.assert_close(torch.logsumexp(joint, dim=-1), prefix, rtol=0, atol=1e-9)
        evaluator.commit(var, x[:, var])
        observed[:, var] = True


def test_path_only_conditionals_equal_naive_ones_at_a_fraction_of_the_nodes(digits, hclt):
    x = digits.test[:16]
    path, naive = ConditionalEvaluator(hclt, "path"), ConditionalEvaluator(hclt, "naive")
    torch.testing.assert_close(
        torch.stack(ans.teacher_forced_pmfs(path, x)),
        torch.stack(ans.teacher_forced_pmfs(naive, x)),
        rtol=0,
        atol=1e-12,
    )
    m, size = hclt.latents, hclt.tree.size
    # top-down to the leaf (depth + 1 tree nodes, the root's sum node being one node), then bottom-up below the root
    assert path.node_evaluations == sum((2 * d + 1) * 2 * m for d in hclt.tree.depth) - size * (m - 1)
    assert naive.node_evaluations == size * (size * 2 * m - m + 1)


def test_a_full_batch_em_step_never_lowers_the_training_likelihood(digits):
    train = digits.train[:300]
    tree = chow_liu_tree(train, digits.levels)
    model = HCLT.random(tree, 5, digits.levels, torch.Generator().manual_seed(1))
    before = float(model.log_likelihood(train).sum())
    for _ in range(6):
        model.em_step(train, step_size=1.0, pseudocount=0.0)
        after = float(model.log_likelihood(train).sum())
        assert after >= before - 1e-8 * abs(before)
        before = after


def test_mutual_information_agrees_with_spflow():
    from spflow.zoo.hclt.mi import pairwise_mi_categorical

    x, _ = tree_sample(500, 9, 4, seed=0)
    ours = pairwise_mutual_information(x, 4, pseudocount=1.0)
    theirs = pairwise_mi_categorical(x, num_cats=4, pseudocount=1.0).fill_diagonal_(0.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_chow_liu_tree_has_the_edges_of_spflows_cltree():
    from spflow.modules.leaves.cltree import CLTree

    x, truth = tree_sample(3000, 10, 3, seed=2)
    reference = CLTree(list(range(10)), K=3, alpha=0.01)
    reference.fit_structure(x.double())
    theirs = {frozenset((c, p)) for c, p in enumerate(reference.parents.tolist()) if p >= 0}
    ours = {frozenset(e) for e in maximum_spanning_tree(pairwise_mutual_information(x, 3).numpy())}
    assert ours == theirs == {frozenset((c, p)) for c, p in enumerate(truth.parents) if p >= 0}


def test_hclt_with_identity_emissions_gives_spflows_chow_liu_marginals():
    """An HCLT whose latents copy their pixels (M = K, p(x_i | z_i) = 𝟙[x_i = z_i]) is a Chow–Liu tree: its
    marginals under missing pixels must be spflow's belief-propagation marginals."""
    from spflow.modules.leaves.cltree import CLTree

    levels, size = 3, 8
    x, _ = tree_sample(800, size, levels, seed=4)
    reference = CLTree(list(range(size)), K=levels, alpha=0.5)
    reference.maximum_likelihood_estimation(x.double())
    parents = reference.parents.tolist()
    cpt = reference.log_cpt.detach()[:, 0, 0].double()  # [i, x_i, x_parent]
    tree = RootedTree(tuple(parents))
    identity = torch.full((size, levels, levels), -math.inf, dtype=torch.float64)
    identity[:, torch.arange(levels), torch.arange(levels)] = 0.0
    model = HCLT(tree, cpt[tree.root, :, 0], cpt.transpose(1, 2).contiguous(), identity)
    evidence = x[:25].double()
    evidence[torch.rand(evidence.shape, generator=torch.Generator().manual_seed(0)) < 0.4] = math.nan
    observed = ~evidence.isnan()
    ours = model.log_likelihood(evidence.nan_to_num(0).long(), observed)
    theirs = reference.log_likelihood(evidence)[:, 0, 0, 0].double()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_rooting_keeps_the_edges_and_orders_parents_first():
    _, truth = tree_sample(10, 12, 2, seed=5)
    edges = [(p, c) for c, p in enumerate(truth.parents) if p >= 0]
    tree = rooted_at(edges, 12, root=7)
    assert tree.root == 7 and {frozenset((c, p)) for c, p in enumerate(tree.parents) if p >= 0} == set(
        map(frozenset, edges)
    )
    seen = set()
    for node in tree.preorder:
        assert tree.parents[node] in seen | {-1}
        seen.add(node)


def test_job_stores_a_stream_that_decodes_back_and_registers_the_hclt():
    ctx = InMemoryRunContext(dataset=load_builtin("digits"), seed=0)
    params = PCCompressParams(latents=4, epochs=2, ar_epochs=0)
    assert get_method("pc-compress").invoke(ctx, params)
    assert ctx.latest("roundtrip_ok") == 1.0
    assert {"test_set.ans", "codecs.json", "chow_liu_tree.png"} <= set(ctx.artifacts)
    codecs = {row["codec"] for row in json.loads(ctx.artifacts["codecs.json"][1])["codecs"]}
    assert codecs == {"hclt", "independent", "zlib", "lzma", "png"}
    model = load_hclt(ctx.load_model("hclt-digits"))
    assert model.latents == 4 and model.tree.size == 64
    assert ctx.latest("bits_per_dim") < ctx.latest("theoretical_bits_per_dim") * 1.01 + 0.01
