"""Calibration statistics of every linear layer's inputs, gathered block by block.

Post-training compression (SparseGPT, Frantar & Alistarh 2023, §3; Wanda, Sun et al. 2024, Eq. 1;
EoRA, Liu et al. 2024, Eq. 4) needs, per linear layer, the Gram matrix of its inputs
G = Σ_t x_t x_tᵀ over calibration tokens: SparseGPT's Hessian is 2G, Wanda's feature norms are
‖X_j‖₂ = √G_jj and EoRA's covariance is C = G / T. As in the reference implementations, blocks are
compressed in order and the statistics of block l are taken with blocks < l already compressed (and
block l itself still dense), so each block corrects for the error its predecessors introduced
("sequential" calibration). `compress_sequentially` runs that loop for pruning; EoRA, whose input is
an already-compressed model, restores block l's dense weights before calling `block_input_stats`.

Statistics come from forward pre-hooks on a full model forward that is cut short (by an exception
raised after block l) — slower than caching each block's inputs, but independent of the signature of
a given architecture's decoder-layer forward, so it works for any decoder stack `decoder_stack` finds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from models.llm.folder import decoder_layers


@dataclass
class InputStats:
    """Σ x xᵀ (float64) and the number of tokens it sums over, for one linear layer."""

    gram: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.gram += x.T @ x
        self.count += x.shape[0]

    @property
    def covariance(self) -> torch.Tensor:
        """C = E[x xᵀ] (uncentred, as EoRA uses it)."""
        return self.gram / max(self.count, 1)

    @property
    def feature_norms(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature (Wanda's activation norm)."""
        return self.gram.diagonal().clamp_min(0).sqrt()


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Every linear map inside one decoder block, by its name in the block (`self_attn.q_proj`, `mlp.down_proj`,
    GPT-2's `attn.c_attn`, …): `nn.Linear`s and GPT-2's `Conv1D`s, which are linears stored transposed. Read and
    write their weights through `weight_matrix`, which gives both as [out, in]."""
    return {name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def weight_matrix(linear: nn.Module) -> torch.Tensor:
    """The weight of a linear as [out, in] (a view: writing into it writes the layer). A `Conv1D` computes
    x W + b with W [in, out], the transpose of `nn.Linear`'s x Wᵀ + b, so every rule stated on [out, in] rows
    (a pruning pattern along the input, a group of quantization, EoRA's ΔW) applies to both alike."""
    return linear.weight.T if isinstance(linear, Conv1D) else linear.weight


def in_features(linear: nn.Module) -> int:
    return weight_matrix(linear).shape[1]


class _StopForward(Exception):
    pass


@torch.no_grad()
def block_input_stats(
    model: nn.Module, windows: torch.Tensor, layer: int, batch_size: int = 8
) -> dict[str, InputStats]:
    """Input statistics of each linear of decoder block `layer`, from the model as it is now."""
    block = decoder_layers(model)[layer]
    linears = block_linears(block)
    device = next(model.parameters()).device
    stats = {
        name: InputStats(torch.zeros(in_features(lin), in_features(lin), dtype=torch.float64, device=device))
        for name, lin in linears.items()
    }
    handles = [
        lin.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0])) for name, lin in linears.items()
    ]

    def stop(*_: object) -> None:
        raise _StopForward

    handles.append(block.register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


LinearEdit = Callable[[int, str, nn.Module, InputStats], None]


def compress_sequentially(
    model: nn.Module,
    windows: torch.Tensor,
    edit: LinearEdit,
    batch_size: int = 8,
    on_block: Callable[[int, int], None] | None = None,
) -> None:
    """For each block in order: gather its linears' input statistics, then `edit(layer, name, linear, stats)`
    each linear in place (prune, quantize, compensate)."""
    layers = decoder_layers(model)
    for index in range(len(layers)):
        stats = block_input_stats(model, windows, index, batch_size)
        for name, linear in block_linears(layers[index]).items():
            edit(index, name, linear, stats[name])
        if on_block:
            on_block(index + 1, len(layers))
