"""FRUGAL: gradient splitting into a state-full subspace (Adam) and a state-free remainder (signSGD).

Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable
Training" (2024). For a projectable weight W with gradient G and a subspace projector P chosen every
T steps (Algorithm 1), the update is

    ΔW = −lr·s_proj·Pᵀ Adam(P G) − lr·s_proj·s_free·sign(G − Pᵀ P G),

plus decoupled weight decay; the Adam moments live only in the subspace (shape of P G) and are reset
whenever P changes. The projector is one of (Section 3, "state-full subspace selection"):

- `svd`: GaLore's top-r singular vectors of G, r = round(ρ·dim) on the smaller side;
- `columns` / `rows` / `randk`: a random fraction ρ of columns, rows or single coordinates;
- `block`: a fraction ρ of the projectable tensors get full Adam, the rest signSGD only.

Parameters that are not projectable (embeddings, norms, `lm_head`) get plain AdamW, as in the paper.
Checked against the reference implementation (`frugal/proj_optimizer_templates.py` of the FRUGAL
code): the inactive learning rate is lr·s_proj·s_free, ranks are rounded as there, coordinate counts
truncated as there, and the state is reset at every projector update. Our differences: one class for
all projector kinds; the projector is stored as tensors (a basis, indices, an `active` flag) so the
state dict round-trips through safetensors; random choices come from the optimizer's own seeded
generator, saved in the state dict, so a resumed run chooses the same subspaces.

Invariants (tests): with `block`/`columns`/`rows`/`randk` at ρ = 1 the update equals AdamW; at ρ = 0 it
is −lr·sign(G); the state-full and state-free parts of G are orthogonal and sum to G; state bytes
grow with ρ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from models.optim.moments import SubspaceOptimizer, adam_direction, decay_weights, evaluate_closure

Projection = Literal["svd", "block", "columns", "rows", "randk"]
StateFreeRule = Literal["sign_sgd", "sgd", "none"]
BlockOrder = Literal["descending", "ascending", "random"]
PROJECTIONS: tuple[str, ...] = ("svd", "block", "columns", "rows", "randk")
# How P acts, stored in the state as an int: torch's `load_state_dict` mangles string state values.
RIGHT, LEFT, COLUMNS, ROWS, RANDK, BLOCK = range(6)


# -- projectors: P G (down) and Pᵀ X (up), with P stored as tensors in the parameter's state --------


def choose_projector(
    grad: torch.Tensor, kind: Projection, density: float, generator: torch.Generator
) -> dict[str, Any]:
    """A new subspace for one matrix gradient, as state entries (tensors and strings only)."""
    rows, cols = grad.shape
    if kind == "svd":
        # GaLore's "std" side: project the larger dimension away, keep r directions of the smaller one
        side = RIGHT if rows >= cols else LEFT
        rank = round((cols if side == RIGHT else rows) * density)
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        basis = vh[:rank] if side == RIGHT else u[:, :rank]
        return {"side": side, "basis": basis.to(grad.dtype).contiguous()}
    side, total = {"columns": (COLUMNS, cols), "rows": (ROWS, rows), "randk": (RANDK, rows * cols)}[kind]
    indices = torch.randperm(total, generator=generator)[: int(total * density)].to(grad.device)
    return {"side": side, "indices": indices}


def project_down(grad: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
    side = state["side"]
    if side == RIGHT:
        return grad @ state["basis"].T
    if side == LEFT:
        return state["basis"].T @ grad
    if side == COLUMNS:
        return grad[:, state["indices"]]
    if side == ROWS:
        return grad[state["indices"]]
    return grad.reshape(-1)[state["indices"]]


def project_up(low: torch.Tensor, state: dict[str, Any], shape: torch.Size) -> torch.Tensor:
    side = state["side"]
    if side == RIGHT:
        return low @ state["basis"]
    if side == LEFT:
        return state["basis"] @ low
    full = low.new_zeros(shape)
    if side == COLUMNS:
        full[:, state["indices"]] = low
    elif side == ROWS:
        full[state["indices"]] = low
    else:
        full.view(-1)[state["indices"]] = low
    return full


def split_gradient(grad: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(state-full part Pᵀ P G, state-free part G − Pᵀ P G) of a projectable gradient."""
    if state.get("side") == BLOCK:
        return (grad.clone(), torch.zeros_like(grad)) if state["active"] else (torch.zeros_like(grad), grad.clone())
    full = project_up(project_down(grad, state), state, grad.shape)
    return full, grad - full


def projectable_param_groups(model: nn.Module, exclude: tuple[str, ...] = ("lm_head", "embed")) -> list[dict[str, Any]]:
    """The reference's split: weights of `nn.Linear` layers are projectable; everything else (biases,
    norms, embeddings, the output head named in `exclude`) is a regular AdamW parameter."""
    proj = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and not any(e in name for e in exclude)
    ]
    proj_ids = {id(p) for p in proj}
    regular = [p for p in model.parameters() if p.requires_grad and id(p) not in proj_ids]
    return [
        g
        for g in ({"params": regular, "is_proj_params": False}, {"params": proj, "is_proj_params": True})
        if g["params"]
    ]


class FRUGAL(SubspaceOptimizer):
    """FRUGAL over param groups flagged `is_proj_params` (see `projectable_param_groups`); a flat list of
    tensors treats every 2-D tensor as projectable."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float = 0.25,
        update_gap: int = 200,
        projection: Projection = "svd",
        state_free: StateFreeRule = "sign_sgd",
        proj_lr_scale: float = 1.0,
        free_lr_scale: float = 1.0,
        block_order: BlockOrder = "descending",
        seed: int = 0,
    ):
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {density}")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if update_gap < 1:
            raise ValueError("update_gap must be at least 1")
        params = list(params)
        if params and isinstance(params[0], torch.Tensor):
            params = [
                {"params": [p for p in params if p.ndim != 2], "is_proj_params": False},
                {"params": [p for p in params if p.ndim == 2], "is_proj_params": True},
            ]
            params = [g for g in params if g["params"]]
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            update_gap=update_gap,
            projection=projection,
            state_free=state_free,
            proj_lr_scale=proj_lr_scale,
            free_lr_scale=free_lr_scale,
            block_order=block_order,
            is_proj_params=False,
        )
        super().__init__(params, defaults, seed)
        for group in self.param_groups:
            group.setdefault("next_block", -1)

    # -- subspace selection (Algorithm 1, every T = update_gap steps) -------------------------------
    def _choose_subspaces(self, group: dict[str, Any]) -> None:
        params = group["params"]
        if group["projection"] == "block":
            for p, active in zip(params, self._active_blocks(group)):
                self.state[p].clear()
                self.state[p].update(side=BLOCK, active=active, step=0)
                if active:
                    self.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            return
        for p in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            projector = choose_projector(grad, group["projection"], group["density"], self._generator)
            low = project_down(grad, projector)
            self.state[p].clear()
            self.state[p].update(projector, step=0, exp_avg=torch.zeros_like(low), exp_avg_sq=torch.zeros_like(low))

    def _active_blocks(self, group: dict[str, Any]) -> list[bool]:
        n = len(group["params"])
        k = round(n * group["density"])
        if group["block_order"] == "random":
            chosen = set(torch.randperm(n, generator=self._generator)[:k].tolist())
        else:
            step = -1 if group["block_order"] == "descending" else 1
            start = group["next_block"] if group["next_block"] >= 0 else (n - 1 if step < 0 else 0)
            chosen = {(start + step * i) % n for i in range(k)}
            group["next_block"] = (start + step * k) % n
        return [i in chosen for i in range(n)]

    # -- updates --------------------------------------------------------------------------------
    def _projected_update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        state, grad = self.state[p], p.grad
        if state["side"] == BLOCK:
            if state["active"]:
                state["step"] += 1
                stateful = adam_direction(
                    grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["betas"], group["eps"]
                )
                return group["proj_lr_scale"] * stateful
            stateful, free = torch.zeros_like(grad), grad
        else:
            low = project_down(grad, state)
            state["step"] += 1
            direction = adam_direction(
                low, state["exp_avg"], state["exp_avg_sq"], state["step"], group["betas"], group["eps"]
            )
            stateful = project_up(direction, state, grad.shape)
            free = grad - project_up(low, state, grad.shape)
        update = group["proj_lr_scale"] * stateful
        rule = group["state_free"]
        if rule == "sign_sgd":
            update.add_(free.sign(), alpha=group["proj_lr_scale"] * group["free_lr_scale"])
        elif rule == "sgd":
            update.add_(free, alpha=group["proj_lr_scale"] * group["free_lr_scale"])
        return update

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            projected = group["is_proj_params"]
            if projected and group["step"] % group["update_gap"] == 0:
                self._choose_subspaces(group)
            group["step"] += 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FRUGAL does not support sparse gradients")
                if not projected:
                    self.adamw_update(p, group)
                    continue
                update = self._projected_update(p, group)
                decay_weights(p, group["lr"], group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss
