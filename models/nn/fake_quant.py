"""Simulated low-bit training: symmetric per-group fake quantisation with a straight-through estimator.

Stable-SPAM's INT4 experiments (following Wortsman et al.'s "Stable and low-precision training")
quantise both the weights (groups of 256) and the input activations (groups of 64) of every linear
layer to 4-bit integers in the forward pass, while the backward pass treats the rounding as the
identity (the straight-through estimator, STE): x_q = x + (Q(x) − x).detach(). Quantisation is
symmetric absmax per contiguous group along the input dimension: scale = max|x|/(2^{b−1}−1),
Q(x) = clamp(round(x/scale), −2^{b−1}+1, 2^{b−1}−1)·scale, so zero stays exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fake_quantize(x: torch.Tensor, bits: int = 4, group_size: int = 64) -> torch.Tensor:
    """Q(x) in the forward pass, identity gradient in the backward pass; groups run along the last dim
    (a last dim not divisible by `group_size` is quantised as one group per row)."""
    if bits >= 16:
        return x
    levels = 2 ** (bits - 1) - 1
    last = x.shape[-1]
    size = group_size if group_size > 0 and last % group_size == 0 else last
    grouped = x.reshape(*x.shape[:-1], last // size, size)
    scale = grouped.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
    quantized = (grouped / scale).round().clamp(-levels, levels) * scale
    return x + (quantized.reshape(x.shape) - x).detach()


class QLinear(nn.Linear):
    """`nn.Linear` whose weight and input are fake-quantised to `bits` (INT4 by default) in the forward."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        weight_group: int = 256,
        act_group: int = 64,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.bits, self.weight_group, self.act_group = bits, weight_group, act_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize(self.weight, self.bits, self.weight_group)
        return F.linear(fake_quantize(x, self.bits, self.act_group), w, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, weight_group: int = 256, act_group: int = 64) -> QLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, weight_group, act_group)
        q.weight = linear.weight
        q.bias = linear.bias
        return q


def quantize_linears(
    model: nn.Module, bits: int = 4, weight_group: int = 256, act_group: int = 64, skip: tuple[str, ...] = ("lm_head",)
) -> nn.Module:
    """Swap every `nn.Linear` (except those whose name contains a `skip` entry) for a `QLinear` sharing its
    parameters, in place; the paper keeps the output head in full precision."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(s in full for s in skip):
                setattr(module, child_name, QLinear.from_linear(child, bits, weight_group, act_group))
    return model
