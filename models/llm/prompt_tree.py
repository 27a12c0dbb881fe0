"""PPD's sparse candidate tree and its hardware-aware size (Chen et al., "Hardware-Aware Parallel Prompt Decoding
for Memory-Efficient Acceleration of LLM Inference", 2024, §3.3–3.4).

- **Candidates.** After a step, prompt token i of the accepted node's group gives a distribution over the token at
  offset i+1 after the pending (already verified) token. A node of the tree is a *path of ranks* (r_0, …, r_d): the
  r_0-th most likely token of prompt 0, then the r_1-th of prompt 1, … ; the pending token is the root.
- **Sparse tree** (§3.3, the reference code's `find_optimal_sparse_tree`): with a_i(r) the measured probability that
  the base's greedy token at offset i is exactly prompt token i's r-th guess (held-out data, teacher forcing), a path
  is accepted with probability Π_d a_d(r_d) (offsets taken as independent, as the paper does). The tree keeps the N
  most probable paths; a path is never likelier than its prefix, so best-first search yields them in order and the
  set is closed under prefixes. The expected tokens per step is 1 + Σ_paths Π_d a_d(r_d) (the bonus token plus
  every accepted node).
- **Tree attention** (§3.3): the nodes, then one group of m prompt tokens per node (the next step's guesses come
  from the group of the last accepted node), in one forward. A node sees the cache and its ancestors; node j's
  prompt token i sees the cache, node j's ancestors and j, and its group's tokens 0…i. A node at depth d sits at
  position cached + d, its prompt token i at cached + d + 1 + i.
- **Hardware-aware size** (§3.4, the reference code's `get_throughput_results`): measure one verification
  forward's latency on the serving machine for each candidate size N and keep the N maximising expected tokens
  per step / latency, i.e. expected tokens per second.

Deviation from the paper: every node carries all m prompt tokens; the paper's *dynamic* allocation (fewer prompt
tokens on unlikely nodes, with trees per depth weighed by a stationary distribution) is not built.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Path = tuple[int, ...]


@dataclass(frozen=True)
class SparseTree:
    """Candidate nodes as rank paths (root excluded), every prefix present, sorted by (depth, ranks)."""

    paths: tuple[Path, ...]

    def __post_init__(self) -> None:
        known = set(self.paths)
        if len(known) != len(self.paths) or any(
            len(p) == 0 or (len(p) > 1 and p[:-1] not in known) for p in self.paths
        ):
            raise ValueError("a sparse tree's paths must be distinct, non-empty and closed under prefixes")
        object.__setattr__(self, "paths", tuple(sorted(self.paths, key=lambda p: (len(p), p))))

    @property
    def nodes(self) -> int:
        """Guessed nodes (the root, the pending token, is not counted)."""
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def width(self) -> int:
        """Top-k needed from each prompt token: the largest rank used, plus one."""
        return max((max(p) for p in self.paths), default=-1) + 1

    @cached_property
    def parents(self) -> list[int]:
        """Parent of every node, root included: index 0 is the root (parent -1), node i is index i + 1."""
        index = {p: i + 1 for i, p in enumerate(self.paths)}
        return [-1] + [index.get(p[:-1], 0) for p in self.paths]

    @cached_property
    def depths(self) -> list[int]:
        return [0] + [len(p) for p in self.paths]

    @cached_property
    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.parents]
        for i, parent in enumerate(self.parents[1:], start=1):
            kids[parent].append(i)
        return kids

    def truncated(self, depth: int) -> SparseTree:
        """The paths of at most `depth` guesses (a step near max_tokens)."""
        return SparseTree(tuple(p for p in self.paths if len(p) <= depth))


def chain_tree(m: int) -> SparseTree:
    """The top-1 guess at every offset: the chain of candidates."""
    return SparseTree(tuple((0,) * d for d in range(1, m + 1)))


def path_probability(path: Path, rates: torch.Tensor) -> float:
    """Π_d a_d(r_d): the estimated probability that every guess along the path is greedy's."""
    return math.prod(float(rates[d, r]) for d, r in enumerate(path))


def sparse_tree(rates: torch.Tensor, nodes: int) -> SparseTree:
    """The `nodes` most probable rank paths under `rates` [m, k] (ties: shallower, then lower ranks, first)."""
    m, k = rates.shape
    heap: list[tuple[float, int, Path]] = []

    def push_children(path: Path) -> None:
        if len(path) < m:
            for r in range(k):
                child = (*path, r)
                heapq.heappush(heap, (-path_probability(child, rates), len(child), child))

    push_children(())
    kept: list[Path] = []
    while heap and len(kept) < nodes:
        _, _, path = heapq.heappop(heap)
        kept.append(path)
        push_children(path)
    return SparseTree(tuple(kept))


def expected_accepted(tree: SparseTree, rates: torch.Tensor) -> float:
    """Expected tokens per decoding step: the bonus token plus each node's probability of being accepted."""
    return 1.0 + sum(path_probability(p, rates) for p in tree.paths)


def tree_attention(parents: Sequence[int], m: int) -> torch.Tensor:
    """[q, q] bool: which of the step's tokens each of them sees (the nodes, `parents[i]` with the root -1, then one
    group of m prompt tokens per node): a node sees itself and its ancestors; node j's prompt token i sees j and its
    ancestors and its group's tokens 0…i."""
    n = len(parents)
    q = n + n * m
    allowed = torch.zeros(q, q, dtype=torch.bool)
    for j in range(n):
        a = j
        while a >= 0:
            allowed[j, a] = True
            a = parents[a]
    own = torch.ones(m, m, dtype=torch.bool).tril()
    for j in range(n):
        rows = slice(n + j * m, n + (j + 1) * m)
        allowed[rows, :n] = allowed[j, :n]
        allowed[rows, rows] = own
    return allowed


def additive_mask(cached: int, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, q, cached + q]: the whole cache visible to every new token, then `allowed` among them."""
    full = torch.cat([torch.ones(allowed.shape[0], cached, dtype=torch.bool), allowed], dim=1)
    return torch.zeros(full.shape, dtype=dtype).masked_fill(~full, torch.finfo(dtype).min)[None, None]


def tree_mask(cached: int, parents: Sequence[int], m: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, q, cached + q] additive mask of one verification step (`tree_attention` after the cache)."""
    return additive_mask(cached, tree_attention(parents, m), dtype)


def tree_positions(depths: Sequence[int], m: int) -> list[int]:
    """Position offsets from the cache length: node depth d, then each node's prompt token i at d + 1 + i."""
    return [*depths, *(d + 1 + i for d in depths for i in range(m))]


def keep_cache_rows(cache, cached: int, rows: Sequence[int]) -> None:
    """Compact a DynamicCache to its first `cached` positions plus the step's `rows` (offsets after `cached`): the
    accepted path's keys and values; rejected nodes and every prompt token are dropped."""
    extra = cache.get_seq_length() - cached - len(rows)
    if list(rows) == list(range(len(rows))):  # a prefix of the step's tokens (always, for a chain): crop
        if extra > 0:
            cache.crop(-extra)
        return
    keep = torch.tensor([*range(cached), *(cached + r for r in rows)])
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            index = keep.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)


# -- hardware-aware tree size ----------------------------------------------------------------------

TREE_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # candidate node counts measured at load


@dataclass(frozen=True)
class TreeChoice:
    """The hardware-aware tree of one deployment: its size, the tree, and the measurements it was chosen from."""

    nodes: int
    tree: SparseTree
    latency: dict[int, float]  # seconds per verification forward, per size
    tokens_per_second: dict[int, float]  # expected tokens per step / latency, per size


def choose_tree_size(rates: torch.Tensor, latency: dict[int, float]) -> tuple[int, dict[int, float]]:
    """The size N maximising expected tokens per second, E[tokens/step of the best N-node tree] / latency(N), and
    that figure for every measured N (§3.4)."""
    if not latency:
        raise ValueError("no measured tree sizes to choose from")
    speed = {n: expected_accepted(sparse_tree(rates, n), rates) / seconds for n, seconds in sorted(latency.items())}
    return max(speed, key=lambda n: (speed[n], -n)), speed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_tree_latency(
    model: PreTrainedModel, m: int, sizes: Sequence[int], context: int = 64, repeats: int = 3
) -> dict[int, float]:
    """Seconds of one verification forward (N + 1 nodes, each with m prompt tokens, over a cache of `context`
    tokens) on this machine, for each N in `sizes`: the fastest of `repeats` after a warm-up round."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    embed, decoder, head = model.get_input_embeddings(), model.base_model, model.get_output_embeddings()
    ids = torch.arange(context, device=device)[None] % embed.weight.shape[0]
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True)
    steps = []
    for n in sizes:
        parents = [-1] + [0] * n  # the cost depends on the query count, not on the tree's shape
        q = (n + 1) * (m + 1)
        x = embed(torch.arange(q, device=device)[None] % embed.weight.shape[0])
        positions = torch.tensor([[context + o for o in tree_positions([0] + [1] * n, m)]], device=device)
        steps.append((n, q, x, tree_mask(context, parents, m, x.dtype).to(device), positions))
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for r in range(repeats + 1):  # round-robin over the sizes, so a busy spell of the machine hits them alike
        for n, q, x, mask, positions in steps:
            _sync(device)
            start = time.perf_counter()
            hidden = decoder(
                inputs_embeds=x, cache=cache, use_cache=True, attention_mask=mask, position_ids=positions
            ).last_hidden_state[0]
            head(hidden[: n + 1 + m])  # as decoding: the nodes' logits and one prompt group's
            _sync(device)
            if r:  # the first round warms up
                times[n].append(time.perf_counter() - start)
            cache.crop(-q)
    return {n: min(t) for n, t in times.items()}


def latency_envelope(measured: dict[int, float]) -> dict[int, float]:
    """The non-decreasing lower envelope of measured times: more query tokens never cost less, so a larger size's
    time bounds a smaller one's. Damps the noise of a busy machine (our addition; the paper uses the raw times)."""
    return {n: min(t for size, t in measured.items() if size >= n) for n in measured}


def hardware_aware_tree(
    model: PreTrainedModel,
    rates: torch.Tensor,
    sizes: Sequence[int] = TREE_SIZES,
    context: int = 128,
    repeats: int = 3,
) -> TreeChoice:
    """Measure the verification latency of every size (up to the number of rank paths `rates` allows) on this
    machine and keep the tree with the most expected tokens per second (§3.4), from the times'
    `latency_envelope`."""
    m, k = rates.shape
    possible = sum(k**d for d in range(1, m + 1))
    sizes = sorted({min(n, possible) for n in sizes if n >= 1})
    latency = latency_envelope(measure_tree_latency(model, m, sizes, context, repeats))
    best, speed = choose_tree_size(rates, latency)
    return TreeChoice(best, sparse_tree(rates, best), latency, speed)
