"""Optimizers any training job can name (`params.optimizer`), and the bytes their state holds.

`build_optimizer(name, target, lr=..., **kw)` takes a model (preferred: FRUGAL, GaLore and BAdam need
to know which weights are the transformer's linear layers) or an iterable of parameters, and returns
a `torch.optim.Optimizer`. Ours: `frugal` (`models/optim/frugal.py`) and `stable-spam`
(`models/optim/stable_spam.py`); baselines come from the libraries that keep them: torch
(`adamw`, `sgd`, `adafactor`), `pytorch_optimizer` (`spam`, `signsgd`), `galore-torch`
(`galore-adamw`) and `badam`. Each job reports `optimizer_state_bytes(opt)` as a metric, the number the
memory-efficient optimizers are about.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from torch import nn

from models.optim.frugal import FRUGAL, projectable_param_groups
from models.optim.stable_spam import StableSPAM

OptimizerName = Literal[
    "adamw", "sgd", "adafactor", "signsgd", "frugal", "stable-spam", "spam", "galore-adamw", "badam"
]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

__all__ = [
    "FRUGAL",
    "GALORE_SCALE",
    "OPTIMIZERS",
    "OptimizerName",
    "StableSPAM",
    "build_optimizer",
    "optimizer_state_bytes",
    "projectable_param_groups",
]


class UnknownOptimizerError(ValueError):
    """An optimizer name outside `OPTIMIZERS`."""


def _params(target: nn.Module | Iterable[Any]) -> list[Any]:
    return [p for p in target.parameters() if p.requires_grad] if isinstance(target, nn.Module) else list(target)


def _proj_groups(target: nn.Module | Iterable[Any]) -> list[dict[str, Any]]:
    if isinstance(target, nn.Module):
        return projectable_param_groups(target)
    params = _params(target)
    return [
        g
        for g in (
            {"params": [p for p in params if p.ndim != 2], "is_proj_params": False},
            {"params": [p for p in params if p.ndim == 2], "is_proj_params": True},
        )
        if g["params"]
    ]


GALORE_SCALE = 0.25  # α of GaLore's update, as in the GaLore paper's LLaMA pre-training runs


def _galore(
    target: nn.Module | Iterable[Any],
    lr: float,
    weight_decay: float,
    density: float = 0.25,
    update_gap: int = 200,
    scale: float = GALORE_SCALE,
    rank: int | None = None,
    **kw: Any,
) -> torch.optim.Optimizer:
    """GaLore-AdamW at rank round(ρ·min(m, n)) of the smallest projectable matrix (equal memory to FRUGAL ρ),
    or at `rank` when given.

    GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
    arXiv 2403.03507; https://github.com/jiaweizzhao/GaLore) projects each matrix gradient onto r directions
    refreshed from its SVD every `update_gap` steps, runs Adam there and applies α·Pᵀ·Adam(P G): `scale` is
    α, 0.25 by default as in the paper's LLaMA pre-training (whose scripts pair it with lr 0.01); 1 makes
    the projected step as large as Adam's."""
    from galore_torch import GaLoreAdamW

    groups = _proj_groups(target)
    for g in groups:
        if g.pop("is_proj_params"):
            r = rank if rank is not None else max(1, round(density * min(min(p.shape) for p in g["params"])))
            g.update(rank=r, update_proj_gap=update_gap, scale=scale, proj_type="std")
    return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, **kw)


def _badam(
    target: nn.Module | Iterable[Any],
    lr: float,
    weight_decay: float,
    update_gap: int = 100,
    block_order: str = "descending",
    **kw: Any,
) -> torch.optim.Optimizer:
    """BAdam (Luo et al. 2024): block coordinate descent with Adam on one transformer layer at a time; the
    embedding and the head/norms are blocks too, as needed when training from scratch."""
    from badam import BlockOptimizer

    class QuietBlockOptimizer(BlockOptimizer):
        """BAdam prints every block switch to stdout, which would corrupt a job's JSON output."""

        def step(self, *args: Any, **kwargs: Any) -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                super().step(*args, **kwargs)

    if not isinstance(target, nn.Module):
        raise TypeError("badam needs the model (it switches blocks by parameter name)")
    named = [(n, p) for n, p in target.named_parameters() if p.requires_grad]
    base = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay, **kw)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "expects fp16/bf16 weights": we train in fp32 on CPU on purpose
        return QuietBlockOptimizer(
            base,
            named,
            switch_block_every=update_gap,
            switch_mode=block_order,
            include_embedding=True,
            include_lm_head=True,
            verbose=0,
        )


def build_optimizer(
    name: str, target: nn.Module | Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, **kw: Any
) -> torch.optim.Optimizer:
    """The optimizer `name` over `target` (a model, or parameters/param groups); `kw` are its own options
    (e.g. FRUGAL's `density`, `projection`, `update_gap`; Stable-SPAM's `gamma1`, `reset_interval`; GaLore's
    `density`, `update_gap` and `scale`)."""
    if name == "adamw":
        return torch.optim.AdamW(_params(target), lr=lr, weight_decay=weight_decay, **kw)
    if name == "sgd":
        return torch.optim.SGD(_params(target), lr=lr, weight_decay=weight_decay, **kw)
    if name == "adafactor":
        return torch.optim.Adafactor(_params(target), lr=lr, weight_decay=weight_decay, **kw)
    if name == "frugal":
        return FRUGAL(_proj_groups(target), lr=lr, weight_decay=weight_decay, **kw)
    if name == "stable-spam":
        return StableSPAM(_params(target), lr=lr, weight_decay=weight_decay, **kw)
    if name == "spam":
        from pytorch_optimizer import SPAM

        return SPAM(_params(target), lr=lr, weight_decay=weight_decay, **kw)
    if name == "signsgd":
        from pytorch_optimizer import SignSGD

        return SignSGD(_params(target), lr=lr, weight_decay=weight_decay, momentum=kw.pop("momentum", 0.0), **kw)
    if name == "galore-adamw":
        return _galore(target, lr, weight_decay, **kw)
    if name == "badam":
        return _badam(target, lr, weight_decay, **kw)
    raise UnknownOptimizerError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def _tensor_bytes(node: Any, seen: set[int]) -> int:
    if isinstance(node, torch.Tensor):
        if id(node) in seen:
            return 0
        seen.add(id(node))
        return node.numel() * node.element_size()
    if isinstance(node, dict):
        return sum(_tensor_bytes(v, seen) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in node)
    if hasattr(node, "__dict__") and not isinstance(node, nn.Module):  # e.g. GaLore's projector object
        return sum(_tensor_bytes(v, seen) for v in vars(node).values())
    return 0


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps besides the parameters: moments, projectors, and for
    BAdam the fp32 master copies of the active block."""
    seen: set[int] = set()
    total = sum(_tensor_bytes(s, seen) for s in opt.state.values())
    base = getattr(opt, "base_optimizer", None)
    if base is not None:
        total += sum(_tensor_bytes(s, seen) for s in base.state.values())
        total += _tensor_bytes(list(getattr(opt, "param_idx2hp", {}).values()), seen)
    return total
