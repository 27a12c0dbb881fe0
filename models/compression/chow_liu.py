"""Chow–Liu trees: the maximum-mutual-information spanning tree over the variables (Chow & Liu, 1968).

    I(X_i; X_j) = Σ_{a,b} p̂_ij(a, b) · log( p̂_ij(a, b) / (p̂_i(a) p̂_j(b)) )

with p̂ the empirical pairwise distributions smoothed by a total pseudocount α spread uniformly over the K² cells
(so the singles, α/K per value, are the smoothed joint's marginals; ChowLiuTrees.jl's and spflow's convention).
The tree maximising Σ_edges I is the best tree-shaped Bayesian network in likelihood; Prim's algorithm finds it.

The hidden Chow–Liu tree puts one latent variable per pixel on this tree. Where it is rooted does not change the
model class, but it sets each variable's depth, and the path-only conditional evaluation costs one circuit layer
per ancestor, so the tree is rooted at its median: the vertex of least mean depth (ties: least height, lowest id).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F


def pairwise_mutual_information(x: torch.Tensor, levels: int, pseudocount: float = 1.0) -> torch.Tensor:
    """[D, D] mutual information (nats) of the columns of x ([N, D] symbols), diagonal 0, in float64."""
    n, d = x.shape
    onehot = F.one_hot(x.long(), levels).to(torch.float64).reshape(n, d * levels)
    total = n + pseudocount
    joint = ((onehot.T @ onehot).reshape(d, levels, d, levels).permute(0, 2, 1, 3) + pseudocount / levels**2) / total
    single = (onehot.sum(0).reshape(d, levels) + pseudocount / levels) / total
    log_single = single.clamp_min(1e-300).log()
    ratio = joint.clamp_min(1e-300).log() - log_single[:, None, :, None] - log_single[None, :, None, :]
    mi = (joint * ratio).sum(dim=(2, 3))
    mi.fill_diagonal_(0.0)
    return mi


def maximum_spanning_tree(weights: np.ndarray) -> list[tuple[int, int]]:
    """Prim's algorithm from vertex 0: the undirected edges (parent, child) of a maximum-weight spanning tree."""
    d = weights.shape[0]
    in_tree = np.zeros(d, dtype=bool)
    in_tree[0] = True
    best, best_from = weights[0].astype(np.float64).copy(), np.zeros(d, dtype=np.int64)
    edges = []
    for _ in range(d - 1):
        v = int(np.argmax(np.where(in_tree, -np.inf, best)))
        edges.append((int(best_from[v]), v))
        in_tree[v] = True
        closer = ~in_tree & (weights[v] > best)
        best[closer], best_from[closer] = weights[v][closer], v
    return edges


@dataclass(frozen=True)
class RootedTree:
    """A tree over D variables: `parents[i]` (−1 at the root) and the derived orders the circuit walks."""

    parents: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def root(self) -> int:
        return self.parents.index(-1)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in self.parents]
        for child, parent in enumerate(self.parents):
            if parent >= 0:
                kids[parent].append(child)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def preorder(self) -> tuple[int, ...]:
        """Depth-first from the root, children by index: parents before children (the coding order)."""
        order, stack = [], [self.root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(self.children[node]))
        return tuple(order)

    @cached_property
    def depth(self) -> tuple[int, ...]:
        depth = [0] * self.size
        for node in self.preorder:
            if self.parents[node] >= 0:
                depth[node] = depth[self.parents[node]] + 1
        return tuple(depth)

    @cached_property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        """Nodes grouped by depth, deepest level first (the order of a batched upward pass)."""
        by_depth: list[list[int]] = [[] for _ in range(max(self.depth) + 1)]
        for node, dep in enumerate(self.depth):
            by_depth[dep].append(node)
        return tuple(tuple(level) for level in reversed(by_depth))

    def path_to_root(self, node: int) -> tuple[int, ...]:
        path = [node]
        while self.parents[path[-1]] >= 0:
            path.append(self.parents[path[-1]])
        return tuple(path)


def rooted_at(edges: list[tuple[int, int]], size: int, root: int) -> RootedTree:
    """Orient undirected edges away from `root`."""
    neighbours: list[list[int]] = [[] for _ in range(size)]
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    parents, stack = [-2] * size, [root]
    parents[root] = -1
    while stack:
        node = stack.pop()
        for nb in neighbours[node]:
            if parents[nb] == -2:
                parents[nb] = node
                stack.append(nb)
    if -2 in parents:
        raise ValueError("the edges do not span the variables")
    return RootedTree(tuple(parents))


def median_rooted(edges: list[tuple[int, int]], size: int) -> RootedTree:
    """The tree rooted where the mean depth is least (then the height), for short leaf-to-root paths."""
    trees = [rooted_at(edges, size, r) for r in range(size)]
    return min(trees, key=lambda t: (sum(t.depth), max(t.depth)))


def chow_liu_tree(x: torch.Tensor, levels: int, pseudocount: float = 1.0) -> RootedTree:
    """The Chow–Liu tree of the data x ([N, D] symbols), rooted at its median."""
    mi = pairwise_mutual_information(x, levels, pseudocount)
    return median_rooted(maximum_spanning_tree(mi.numpy()), x.shape[1])
