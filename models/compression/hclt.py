"""The hidden Chow–Liu tree (HCLT): a probabilistic circuit over D discrete pixels with one latent per pixel.

    p(x) = Σ_z p(z_r) · Π_{i≠r} p(z_i | z_pa(i)) · Π_i p(x_i | z_i),     z_i ∈ {1..M}

on the Chow–Liu tree of the pixels (Liu & Van den Broeck, "Tractable Regularization of Probabilistic Circuits",
NeurIPS 2021; the compression paper's model). As a circuit, each tree node i holds M product nodes and, below
its parent, M sum nodes:

    P_i[m] = L_i[m] · Π_{c ∈ ch(i)} S_c[m]                 product: the leaf times the children's messages
    S_i[m] = Σ_{m'} p(z_i = m' | z_pa = m) · P_i[m']       sum: the message to the parent, in its state m
    p(x)   = Σ_m p(z_r = m) · P_r[m]                       the root sum

with leaves L_i[m] = p(x_i | z_i = m) when x_i is observed and 1 when it is marginalised (the circuit is smooth
and decomposable, so setting a leaf to 1 sums its variable out). Everything runs in log space; a sum node is a
log-matmul-exp (max-shifted). `log_likelihood` evaluates the circuit level by level (all nodes of one tree depth
at once), which is what training and the one-pass likelihood use.

Training is EM. The expected counts of every parameter are the circuit flows, obtained as the gradient of the
log-likelihood with respect to the log-parameters (∂ log p / ∂ log θ = θ · ∂ log p / ∂ θ = the posterior edge
probability); the M-step normalises counts + a pseudocount. Mini-batch EM (pyjuice's `mini_batch_em`) moves the
parameters a step η toward each batch's M-step solution: θ ← (1 − η)·θ + η·θ̂_batch; η = 1 on the full data set is
plain EM, which never lowers the training likelihood when the pseudocount is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from models.compression.chow_liu import RootedTree


def log_matmul_exp(log_values: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """out[..., l, m] = log Σ_k exp(log_weights[l, m, k] + log_values[..., l, k]), max-shifted for stability."""
    shift = log_values.amax(dim=-1, keepdim=True).detach().clamp_min(-1e30)
    mixed = torch.einsum("...lk,lmk->...lm", (log_values - shift).exp(), log_weights.exp())
    return mixed.log() + shift


def normalized_log(counts: torch.Tensor) -> torch.Tensor:
    return (counts / counts.sum(dim=-1, keepdim=True)).log()


@dataclass
class HCLT:
    """Parameters in log space: `log_root` [M], `log_trans` [D, M, M] (row: the parent's state, column: the
    child's; the root's row is unused) and `log_emit` [D, M, K]."""

    tree: RootedTree
    log_root: torch.Tensor
    log_trans: torch.Tensor
    log_emit: torch.Tensor

    @property
    def latents(self) -> int:
        return self.log_root.shape[0]

    @property
    def levels(self) -> int:
        return self.log_emit.shape[-1]

    @classmethod
    def random(cls, tree: RootedTree, latents: int, levels: int, generator: torch.Generator) -> HCLT:
        """Parameters drawn near uniform (U(0.5, 1.5) weights, normalised): EM needs asymmetry to start from."""

        def draw(*shape: int) -> torch.Tensor:
            return normalized_log((2.0 * torch.rand(*shape, generator=generator, dtype=torch.float64)).exp())

        return cls(tree, draw(latents), draw(tree.size, latents, latents), draw(tree.size, latents, levels))

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"log_root": self.log_root, "log_trans": self.log_trans, "log_emit": self.log_emit}

    def leaf_log_probs(self, x: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """[N, D, M]: log p(x_i | z_i = m) where observed, 0 (the leaf set to 1) where not."""
        d = self.tree.size
        leaves = self.log_emit.transpose(1, 2)[torch.arange(d), x.long().clamp_min(0)]
        return leaves if observed is None else torch.where(observed[..., None], leaves, torch.zeros_like(leaves))

    def log_likelihood(self, x: torch.Tensor, observed: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x_observed) per row of x ([N, D] symbols; `observed` [N, D] bool, default all), one upward pass."""
        return upward(self.tree, self.leaf_log_probs(x, observed), self.log_root, self.log_trans)

    def expected_counts(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """The batch's circuit flows per parameter (gradients of Σ log p w.r.t. the log-parameters) and Σ log p."""
        params = {k: v.detach().requires_grad_(True) for k, v in self.parameters().items()}
        d = self.tree.size
        leaves = params["log_emit"].transpose(1, 2)[torch.arange(d), x.long()]
        total = upward(self.tree, leaves, params["log_root"], params["log_trans"]).sum()
        grads = torch.autograd.grad(total, list(params.values()))
        return dict(zip(params, grads)), float(total.detach())

    def em_step(self, x: torch.Tensor, step_size: float = 1.0, pseudocount: float = 0.1) -> float:
        """One (mini-batch) EM update on x; returns the batch's log-likelihood before the update."""
        counts, total = self.expected_counts(x)
        for name, flow in counts.items():
            current = getattr(self, name).exp()
            smoothed = flow + pseudocount / flow.shape[-1]
            mass = smoothed.sum(dim=-1, keepdim=True)
            # rows no example reaches (the root's transition row) keep their values
            target = torch.where(mass > 0, smoothed / mass.clamp_min(1e-300), current)
            setattr(self, name, ((1.0 - step_size) * current + step_size * target).log())
        return total


@lru_cache(maxsize=16)
def level_plan(tree: RootedTree) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
    """Per tree depth, deepest first: the nodes' indices and, for each, its parent's position in the next level."""
    plan = []
    for depth_nodes, above in zip(tree.levels, tree.levels[1:] + ((),)):
        position = {node: j for j, node in enumerate(above)}
        parents = [position[tree.parents[node]] for node in depth_nodes] if above else None
        plan.append((torch.tensor(depth_nodes), torch.tensor(parents) if parents is not None else None))
    return tuple(plan)


def upward(tree: RootedTree, leaves: torch.Tensor, log_root: torch.Tensor, log_trans: torch.Tensor) -> torch.Tensor:
    """The circuit's value per row, evaluated one tree depth at a time (a node's children are one level deeper)."""
    n, _, m = leaves.shape
    messages, parent_pos = None, None
    for idx, next_parent_pos in level_plan(tree):
        products = leaves[:, idx]
        if messages is not None:
            products = products + torch.zeros(n, len(idx), m, dtype=leaves.dtype).index_add(1, parent_pos, messages)
        if next_parent_pos is None:  # the root's level
            return torch.logsumexp(log_root + products[:, 0], dim=-1)
        messages, parent_pos = log_matmul_exp(products, log_trans[idx]), next_parent_pos
    raise AssertionError("the levels end at the root")
