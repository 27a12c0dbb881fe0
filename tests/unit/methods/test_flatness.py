"""Invariants of the flatness measure (`models/hessian.py`), the synthetic language
(`models/llm/synthetic_grammar.py`) and the `flatness` job (`models/methods/llm_training/flatness.py`)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from models.context import InMemoryRunContext
from models.hessian import gradient_graph, hessian_vector_product, hutchinson_trace
from models.llm.synthetic_grammar import LL1Grammar, NotInLanguageError, Rule, layered_grammar
from models.methods.llm_training.flatness import (
    FlatnessParams,
    HeldOut,
    encode,
    fresh_model,
    grammar_of,
    hessian_trace,
    run,
    token_features,
)

torch.set_num_threads(1)


# -- Hutchinson's estimator -------------------------------------------------------------------------


def test_hutchinson_is_exact_in_expectation_for_a_quadratic():
    """For L = ½θᵀAθ every vᵀHv is vᵀAv; averaged over all 2ⁿ Rademacher vectors it is tr(A) exactly."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = b + b.T
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    grads = gradient_graph(0.5 * theta @ a @ theta, [theta])
    quads = []
    for signs in itertools.product((-1.0, 1.0), repeat=6):
        v = torch.tensor(signs, dtype=torch.float64)
        quads.append(float(v @ hessian_vector_product(grads, [theta], [v])[0]))
    assert np.mean(quads) == pytest.approx(float(torch.trace(a)), abs=1e-10)
    assert np.var(quads) > 0  # single probes are noisy: only the average is exact


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_problem() -> tuple[TinyMLP, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyMLP().double()
    x = torch.randn(32, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))
    return model, x, y


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full Hessian of the loss in the flattened parameters, by `torch.autograd.functional.hessian`."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        chunks, i = {}, 0
        for name, shape in zip(names, shapes):
            chunks[name] = theta[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return nn.functional.cross_entropy(functional_call(model, chunks, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat)


def test_hutchinson_matches_the_exact_hessian_trace_of_a_tiny_mlp():
    model, x, y = mlp_problem()
    exact = float(torch.trace(exact_hessian(model, x, y)))
    est = hutchinson_trace(
        lambda: nn.functional.cross_entropy(model(x), y),
        list(model.parameters()),
        800,
        torch.Generator().manual_seed(1),
    )
    assert abs(est.mean - exact) <= 4 * est.stderr
    assert est.stderr < 0.1 * abs(exact)  # the test has power: 4σ is a small fraction of the trace


def test_hessian_vector_products_agree_with_torch_autograd_functional_hvp():
    model, x, y = mlp_problem()
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    ours = hessian_vector_product(gradient_graph(nn.functional.cross_entropy(model(x), y), params), params, v)
    names = [n for n, _ in model.named_parameters()]

    def loss_of(*ps: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y)

    _, reference = torch.autograd.functional.hvp(loss_of, tuple(p.detach() for p in params), tuple(v))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e3])
def test_trace_scales_linearly_with_the_loss(scale: float):
    """Tr ∇²(cL) = c Tr ∇²L, probe by probe for the same Rademacher draws."""
    model, x, y = mlp_problem()
    base = hutchinson_trace(
        lambda: nn.functional.cross_entropy(model(x), y), list(model.parameters()), 5, torch.Generator().manual_seed(3)
    )
    scaled = hutchinson_trace(
        lambda: scale * nn.functional.cross_entropy(model(x), y),
        list(model.parameters()),
        5,
        torch.Generator().manual_seed(3),
    )
    np.testing.assert_allclose(scaled.samples, np.array(base.samples) * scale, rtol=1e-9)
    assert scaled.mean == pytest.approx(scale * base.mean, rel=1e-9)


def test_hessian_trace_of_a_llama_is_finite_and_leaves_sdpa_in_place():
    grammar = grammar_of(FlatnessParams())
    model = fresh_model(grammar, "micro", seed=0)
    batch = encode([grammar.sample(np.random.default_rng(0)) for _ in range(4)])
    est = hessian_trace(model, batch, probes=2, seed=0)
    assert math.isfinite(est.mean) and len(est.samples) == 2
    assert model.config._attn_implementation == "sdpa"


# -- the synthetic language -----------------------------------------------------------------------


def derivations(grammar: LL1Grammar, stack: tuple[int, ...]):
    """Every (sentence, probability) the grammar derives from `stack`, by exhaustive expansion."""
    if not stack:
        yield (), 1.0
        return
    for r in grammar.by_lhs[stack[0]]:
        for rest, p in derivations(grammar, r.children + stack[1:]):
            yield (r.terminal, *rest), r.prob * p


def test_exact_entropy_and_length_equal_their_enumerated_values_on_a_small_grammar():
    grammar = layered_grammar(levels=3, per_level=2, num_terminals=4, rules_per_nonterminal=2, seed=5)
    language = list(derivations(grammar, (grammar.start,)))
    probs = np.array([p for _, p in language])
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert len({s for s, _ in language}) == len(language)  # one derivation per sentence: unambiguous
    assert grammar.sentence_entropy() == pytest.approx(float(-(probs * np.log(probs)).sum()), abs=1e-10)
    assert grammar.expected_length() == pytest.approx(sum(p * len(s) for s, p in language), abs=1e-10)
    for s, p in language:
        assert grammar.parse(s).logprob == pytest.approx(math.log(p), abs=1e-12)


def test_optimal_loss_equals_the_sampled_cross_entropy_of_the_generator():
    grammar = grammar_of(FlatnessParams())
    rng = np.random.default_rng(0)
    sents = [grammar.sample(rng) for _ in range(4000)]
    nll = np.array([-grammar.parse(s).logprob for s in sents])
    tokens = np.array([len(s) + 1 for s in sents])  # every terminal and the final <eos> are predicted
    ratio = nll.sum() / tokens.sum()
    # standard error of a ratio estimator (delta method)
    stderr = np.std(nll - ratio * tokens) / (tokens.mean() * math.sqrt(len(sents)))
    assert abs(ratio - grammar.optimal_loss()) <= 4 * stderr
    assert 4 * stderr < 0.02


def test_empirical_sentence_frequencies_match_parse_probabilities():
    grammar = layered_grammar(levels=3, per_level=2, num_terminals=4, rules_per_nonterminal=2, seed=5)
    rng = np.random.default_rng(1)
    n = 20000
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n):
        s = tuple(grammar.sample(rng))
        counts[s] = counts.get(s, 0) + 1
    for s, c in sorted(counts.items(), key=lambda kv: -kv[1])[:5]:
        p = math.exp(grammar.parse(s).logprob)
        assert abs(c / n - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_latent_labels_and_rejection_of_sentences_outside_the_language():
    grammar = grammar_of(FlatnessParams())
    s = grammar.sample(np.random.default_rng(2))
    parse = grammar.parse(s)
    assert parse.parent[0] == grammar.start and parse.depth[-1] == 0 and all(d > 0 for d in parse.depth[:-1])
    assert parse.grandparent[0] == grammar.num_nonterminals  # the start symbol has no creator
    assert parse.grandparent[1] == grammar.start  # the second token comes from a child of the start symbol
    with pytest.raises(NotInLanguageError):
        grammar.parse(s + s)
    with pytest.raises(NotInLanguageError):
        grammar.parse(s[:-1]) if len(s) > 1 else grammar.parse([])


def test_a_grammar_with_two_rules_on_one_first_terminal_is_refused():
    with pytest.raises(ValueError, match="LL\\(1\\)"):
        LL1Grammar(1, 2, (Rule(0, 0, (), 0.5), Rule(0, 0, (), 0.5)))


# -- the job ----------------------------------------------------------------------------------------


def test_token_features_line_up_with_the_latent_labels():
    params = FlatnessParams(probe_train_sentences=3, probe_test_sentences=3, eval_sentences=16, hessian_sentences=2)
    grammar = grammar_of(params)
    held = HeldOut.draw(grammar, params)
    z, labels = token_features(fresh_model(grammar, "micro", 0), grammar, held.probe_train)
    assert z.shape == (sum(map(len, held.probe_train)), 64)
    assert all(len(v) == len(z) for v in labels.values())


def test_the_job_logs_loss_gap_trace_and_probe_accuracy_at_each_measurement():
    params = FlatnessParams(
        measure_at=[3, 6],
        batch_size=4,
        warmup_steps=2,
        eval_sentences=16,
        hessian_sentences=4,
        hessian_probes=2,
        probe_train_sentences=10,
        probe_test_sentences=10,
    )
    ctx = InMemoryRunContext(seed=0)
    run(ctx, params)
    assert [s for s, _ in ctx.history("hessian_trace")] == [3, 6]
    assert ctx.latest("optimal_loss") == pytest.approx(grammar_of(params).optimal_loss())
    assert 0.0 <= ctx.latest("downstream") <= 1.0 and ctx.latest("loss_gap") > 0
    assert {"measurements.json", "curves.png"} <= set(ctx.artifacts)
