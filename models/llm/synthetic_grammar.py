"""A synthetic language with a known optimal loss: a layered, LL(1) probabilistic context-free grammar.

Liu et al. ("Same Pre-training Loss, Better Downstream: Implicit Bias Matters for Language Models", 2023,
Section 3) compare language models that all reach the *statistically optimal* pre-training loss (the
entropy of the generating distribution) on PCFG-generated text, and define downstream tasks on the
latent structure the generator used. That needs the optimal loss exactly, not as a Monte-Carlo guess.

Here every rule has the form A → t B₁…B_k (k ≤ 2: a terminal, then nonterminals), and no nonterminal has
two rules starting with the same terminal. The grammar is then LL(1): reading left to right with a stack,
the nonterminal on top and the next token fix the rule, so every string has exactly one derivation and
p(string) = p(derivation). Consequences:

- the optimal next-token distribution at each position is the rule distribution of the nonterminal on top
  of the stack (and `<eos>` with probability 1 once the stack is empty), so the optimal causal-LM loss per
  predicted token is H(derivation) / (E[len] + 1) — the `+ 1` is the end-of-sentence prediction, which the
  optimal model makes with zero loss;
- H(derivation) and E[len] follow exactly from the expected number of expansions of each nonterminal,
  n = (I − Mᵀ)⁻¹ e_S with M[A, B] the expected number of B's a single A-expansion creates:
  E[len] = Σ_A n_A (one terminal per expansion) and H = Σ_A n_A · H(rules of A);
- the downstream labels are exact functions of the prefix: the nonterminal that emitted each token
  (`parent`), the one that created that nonterminal (`grandparent`) and the number of nonterminals still
  pending on the stack after it (`depth`).

Nonterminals sit in levels (level ℓ only rewrites to level ℓ+1, the last level only emits a terminal),
which bounds the sentence length by 2^levels − 1 without truncating (and so without distorting) the
distribution. Terminals are shared between nonterminals, so `parent` is not readable from the token alone.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Rule:
    lhs: int
    terminal: int
    children: tuple[int, ...]
    prob: float


@dataclass(frozen=True)
class Parse:
    """One sentence's exact log-probability and, per token, the latent labels the downstream tasks use."""

    logprob: float
    parent: tuple[int, ...]  # the nonterminal whose rule emitted each token
    grandparent: tuple[int, ...]  # the nonterminal that created the parent (num_nonterminals for the start symbol)
    depth: tuple[int, ...]  # nonterminals pending on the stack after each token


class NotInLanguageError(ValueError):
    """A token sequence the grammar cannot generate."""


@dataclass(frozen=True)
class LL1Grammar:
    num_nonterminals: int
    num_terminals: int
    rules: tuple[Rule, ...]
    start: int = 0

    @cached_property
    def table(self) -> dict[tuple[int, int], Rule]:
        return {(r.lhs, r.terminal): r for r in self.rules}

    @cached_property
    def by_lhs(self) -> dict[int, list[Rule]]:
        out: dict[int, list[Rule]] = {a: [] for a in range(self.num_nonterminals)}
        for r in self.rules:
            out[r.lhs].append(r)
        return out

    def __post_init__(self) -> None:
        if len(self.table) != len(self.rules):
            raise ValueError("two rules of one nonterminal start with the same terminal: the grammar is not LL(1)")
        for a, rules in self.by_lhs.items():
            if not math.isclose(sum(r.prob for r in rules), 1.0, abs_tol=1e-9):
                raise ValueError(f"the rule probabilities of nonterminal {a} do not sum to 1")

    # -- exact quantities ---------------------------------------------------------------------------

    def expected_expansions(self) -> np.ndarray:
        """n_A: how often nonterminal A is expanded in one sentence, in expectation (solves n = e_S + Mᵀn)."""
        m = np.zeros((self.num_nonterminals, self.num_nonterminals))
        for r in self.rules:
            for b in r.children:
                m[r.lhs, b] += r.prob
        e = np.zeros(self.num_nonterminals)
        e[self.start] = 1.0
        return np.linalg.solve(np.eye(self.num_nonterminals) - m.T, e)

    def rule_entropy(self) -> np.ndarray:
        """H(rules of A) in nats, per nonterminal."""
        return np.array([-sum(r.prob * math.log(r.prob) for r in self.by_lhs[a]) for a in range(self.num_nonterminals)])

    def sentence_entropy(self) -> float:
        """H(sentence) = H(derivation) in nats (the grammar is unambiguous)."""
        return float(self.expected_expansions() @ self.rule_entropy())

    def expected_length(self) -> float:
        return float(self.expected_expansions().sum())

    def optimal_loss(self) -> float:
        """The optimal causal-LM loss per predicted token (each token and the final `<eos>`), in nats."""
        return self.sentence_entropy() / (self.expected_length() + 1.0)

    # -- sampling and parsing ----------------------------------------------------------------------

    @cached_property
    def _cumulative(self) -> dict[int, list[float]]:
        return {a: list(np.cumsum([r.prob for r in rules])) for a, rules in self.by_lhs.items()}

    def sample(self, rng: np.random.Generator) -> list[int]:
        """One sentence (terminal ids), drawn top-down, leftmost-first."""
        out: list[int] = []
        stack = [self.start]
        while stack:
            a = stack.pop()
            rules = self.by_lhs[a]
            r = rules[min(bisect.bisect_right(self._cumulative[a], rng.random()), len(rules) - 1)]
            out.append(r.terminal)
            stack.extend(reversed(r.children))
        return out

    def parse(self, sentence: list[int] | tuple[int, ...]) -> Parse:
        """The unique derivation of `sentence`: its exact log-probability and per-token latent labels."""
        stack = [(self.start, self.num_nonterminals)]  # (pending nonterminal, the nonterminal that created it)
        logprob, parent, grandparent, depth = 0.0, [], [], []
        for t in sentence:
            if not stack:
                raise NotInLanguageError("the sentence continues after its derivation is complete")
            a, creator = stack.pop()
            r = self.table.get((a, int(t)))
            if r is None:
                raise NotInLanguageError(f"nonterminal {a} has no rule starting with terminal {t}")
            logprob += math.log(r.prob)
            stack.extend((b, a) for b in reversed(r.children))
            parent.append(a)
            grandparent.append(creator)
            depth.append(len(stack))
        if stack:
            raise NotInLanguageError("the sentence ends before its derivation is complete")
        return Parse(logprob, tuple(parent), tuple(grandparent), tuple(depth))


def layered_grammar(
    levels: int = 5,
    per_level: int = 4,
    num_terminals: int = 16,
    rules_per_nonterminal: int = 4,
    child_probs: tuple[float, float, float] = (0.1, 0.4, 0.5),
    concentration: float = 1.0,
    seed: int = 0,
) -> LL1Grammar:
    """A random LL(1) grammar: one start symbol, then `levels − 1` levels of `per_level` nonterminals.

    Each nonterminal gets `rules_per_nonterminal` rules with distinct first terminals (shared across
    nonterminals) and Dirichlet(`concentration`) probabilities; a rule's number of children (0, 1 or 2,
    drawn from `child_probs`, from the next level) is 0 on the last level.
    """
    if rules_per_nonterminal > num_terminals:
        raise ValueError("rules_per_nonterminal cannot exceed num_terminals (first terminals must differ)")
    rng = np.random.default_rng(seed)
    level_of = [0] + [1 + i // per_level for i in range((levels - 1) * per_level)]
    members = {lv: [a for a, x in enumerate(level_of) if x == lv] for lv in range(levels)}
    rules = []
    for a, lv in enumerate(level_of):
        firsts = rng.choice(num_terminals, size=rules_per_nonterminal, replace=False)
        probs = rng.dirichlet([concentration] * rules_per_nonterminal)
        for t, p in zip(firsts, probs):
            k = 0 if lv == levels - 1 else int(rng.choice(3, p=child_probs))
            kids = tuple(int(b) for b in rng.choice(members.get(lv + 1, [0]), size=k))
            rules.append(Rule(a, int(t), kids, float(p)))
    # Dirichlet draws sum to 1 up to rounding; renormalise so the LL(1) check holds exactly
    total = {a: sum(r.prob for r in rules if r.lhs == a) for a in range(len(level_of))}
    rules = [Rule(r.lhs, r.terminal, r.children, r.prob / total[r.lhs]) for r in rules]
    return LL1Grammar(len(level_of), num_terminals, tuple(rules))
