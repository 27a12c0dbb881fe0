"""Conditionals p(X_i = v | x_<i) of an HCLT, one variable at a time, for the entropy coder.

Coding the i-th variable (in the tree's pre-order π: parents before children) needs the marginals
p(x_<i, X_i = v) for every value v: the circuit with the leaves of x_<i observed, the leaf of X_i set to the
indicator of v and every later leaf set to 1. Their sum over v is p(x_<i), so one evaluation gives the
conditional; its running sum is the rANS interval [F(v − 1), F(v)) / p(x_<i) with F(v) = p(x_<i, X_i ≤ v).

Two evaluators, each counting the circuit nodes it evaluates (per tree node: M products and M sums, the root M
products and one sum):

- `naive`: a full upward pass per variable, with the leaf of X_i set to each of the K candidate values at once;
  O(D·|p|) for all D conditionals.
- `path`: the paper's scheme (Liu, Mandt & Van den Broeck, ICLR 2022, §3.2): node values are cached between
  variables and only the nodes whose value depends on X_i are evaluated, which in an HCLT are the products and
  sums on the tree path from i to the root. The circuit is linear in each leaf, so p(x_<i, X_i = v) =
  Σ_m g_i[m] · p(X_i = v | z_i = m), with g_i = ∂p/∂L_i the root's derivative with respect to i's leaf under the
  cached values. One top-down pass along the path gives g_i (at an ancestor a with path child c:
  ∂p/∂P_c = (∂p/∂P_a ⊙ L_a ⊙ Π_{o ≠ c} S_o) · T_c, T_c[m, m'] = p(z_c = m' | z_a = m)), which yields all K
  marginals; `commit` then re-evaluates the path below the root bottom-up with the coded value to refresh the
  cache. Both passes are counted: 2·depth(i) + 1 tree nodes per variable. PressedJuice instead re-evaluates the
  path once per step of a binary search over the K values (⌈log₂ K⌉ + 1 passes); the derivative gives the whole
  pmf, which constriction's categorical model takes, in two.

Node values are kept in scaled linear form — a vector divided by its largest entry, plus the log of that factor —
so a sum node is one matrix product and a rescale, with no exp/log over whole tensors. The encoder and the decoder
call the same evaluator in the same order, so they see bit-identical probabilities, which the coder needs.
"""

from __future__ import annotations

from typing import Literal

import torch

from models.compression.hclt import HCLT

Recompute = Literal["path", "naive"]


class ConditionalEvaluator:
    """Walks the variables of `hclt` in the tree's pre-order for a batch of N images at once.

    Node values are kept in scaled linear form — a vector divided by its largest entry, plus the log of that
    factor — so a sum node is one matrix product and a rescale, and no exp/log runs over [N, K, M] tensors."""

    def __init__(self, hclt: HCLT, recompute: Recompute = "path"):
        self.hclt, self.recompute = hclt, recompute
        tree = hclt.tree
        self.order = tree.preorder
        self.paths = [tree.path_to_root(i) for i in range(tree.size)]
        self.full_pass = tuple(reversed(tree.preorder))  # children before parents
        self.node_evaluations = 0
        self._emit = hclt.log_emit.exp().transpose(1, 2).contiguous()  # [D, K, M]: p(x_i = v | z_i = m)
        self._trans = hclt.log_trans.exp()  # [D, parent state, child state]
        self._root = hclt.log_root.exp()

    def nodes_per_tree_node(self, node: int) -> int:
        m = self.hclt.latents
        return m + (1 if node == self.hclt.tree.root else m)

    def start(self, n: int) -> None:
        """All leaves at 1: every product and sum is then 1 (the circuit's distributions are normalised)."""
        d, m = self.hclt.tree.size, self.hclt.latents
        self.leaves = torch.ones(n, d, m, dtype=torch.float64)
        self.messages = torch.ones(n, d, m, dtype=torch.float64)  # scaled: divided by their largest entry
        self.log_scales = torch.zeros(n, d, dtype=torch.float64)  # log of that factor
        self._pending: int | None = None

    def joint_log_probs(self, var: int) -> torch.Tensor:
        """[N, K]: log p(x_<var, X_var = v) for every value v, from the cached state."""
        self._pending = var
        return self._by_derivative(var) if self.recompute == "path" else self._by_full_pass(var)

    def pmf(self, var: int) -> torch.Tensor:
        """[N, K]: p(X_var = v | x_<var), normalised by Σ_v p(x_<var, X_var = v) = p(x_<var)."""
        return torch.softmax(self.joint_log_probs(var), dim=-1)

    def commit(self, var: int, values: torch.Tensor) -> None:
        """Observe X_var = values ([N]): set its leaf and, path-only, refresh the path's cached messages."""
        if self._pending != var:
            raise RuntimeError(f"commit({var}) without joint_log_probs({var}) first")
        self.leaves[:, var] = self._emit[var][values]
        if self.recompute == "path":
            for node in self.paths[var][:-1]:  # the root sends no message
                self.messages[:, node], self.log_scales[:, node] = self._message(node, *self._product(node, {}))
                self.node_evaluations += self.nodes_per_tree_node(node)
        self._pending = None

    # -- the two evaluations ----------------------------------------------------------------------
    def _by_derivative(self, var: int) -> torch.Tensor:
        """Top-down along the path: g = ∂p/∂(leaf of var), then p(x_<var, X_var = v) = g · p(X_var = v | z)."""
        n, path = self.leaves.shape[0], self.paths[var]
        grad, log_scale = self._root.expand(n, -1), torch.zeros(n, dtype=torch.float64)
        for above, below in zip(reversed(path), reversed(path[:-1])):  # root → var
            siblings, sibling_scale = self._product(above, {}, skip=below)
            grad = (grad * siblings) @ self._trans[below]
            grad, log_scale = _rescaled(grad, log_scale + sibling_scale)
            self.node_evaluations += self.nodes_per_tree_node(above)
        children, children_scale = self._product(var, {}, with_leaf=False)
        self.node_evaluations += self.nodes_per_tree_node(var)
        return ((grad * children) @ self._emit[var].T).log() + (log_scale + children_scale)[:, None]

    def _by_full_pass(self, var: int) -> torch.Tensor:
        """Every node, children first, the leaf of var K-wide: the circuit's K marginals from scratch."""
        tree = self.hclt.tree
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # node → (message [N, K|1, M], log scale [N, K|1])
        for node in self.full_pass:
            product, log_scale = self._product(node, fresh, candidates=var)
            self.node_evaluations += self.nodes_per_tree_node(node)
            if node == tree.root:
                return (product @ self._root).log() + log_scale
            fresh[node] = self._message(node, product, log_scale)
        raise AssertionError("every pass ends at the root")

    def _product(
        self,
        node: int,
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor]],
        skip: int | None = None,
        with_leaf: bool = True,
        candidates: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A product node's scaled value: its leaf (K-wide when node == candidates) times its children's
        messages (from `fresh`, else the cache), leaving out the child `skip`."""
        n = self.leaves.shape[0]
        wide = candidates is not None
        if node == candidates:
            product = self._emit[node][None].expand(n, -1, -1)
        elif with_leaf:
            product = self.leaves[:, node, None] if wide else self.leaves[:, node]
        else:
            product = torch.ones_like(self.leaves[:, node])
        log_scale = torch.zeros(n, 1, dtype=torch.float64) if wide else torch.zeros(n, dtype=torch.float64)
        for child in self.hclt.tree.children[node]:
            if child == skip:
                continue
            if child in fresh:
                message, child_scale = fresh[child]
            elif wide:
                message, child_scale = self.messages[:, child, None], self.log_scales[:, child, None]
            else:
                message, child_scale = self.messages[:, child], self.log_scales[:, child]
            product, log_scale = product * message, log_scale + child_scale
        return product, log_scale

    def _message(self, node: int, product: torch.Tensor, log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum node above `node`: S[m] = Σ_m' p(z_node = m' | z_pa = m) · P[m'], rescaled."""
        return _rescaled(product @ self._trans[node].T, log_scale)


def _rescaled(values: torch.Tensor, log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide by the largest entry of the last axis and add its log to the scale (keeps float64 in range)."""
    peak = values.amax(dim=-1, keepdim=True)
    return values / peak, log_scale + peak[..., 0].log()
