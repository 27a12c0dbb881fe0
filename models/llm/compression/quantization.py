"""Round-to-nearest (RTN) weight quantization: the baseline every LLM quantizer is compared with.

Asymmetric min–max quantization per output row, or per group of `group_size` consecutive input
weights of a row (as GPTQ/AWQ checkpoints store it): scale s = (max − min)/(2^b − 1), zero point
z = round(−min/s), q = clamp(round(w/s) + z, 0, 2^b − 1), ŵ = (q − z)·s. Every weight moves by at
most s/2 (min and max land within half a step of a grid point, so clamping never cuts more), which
a test pins. Weights are stored de-quantized ("fake quant"): this is the accuracy of a b-bit
model, not a b-bit kernel; `storage.py` accounts the bytes a packed format would need.

`symmetric=True` is the symmetric per-row variant (z = 0, s = max|w|/((2^b − 1)/2), codes in
[−2^(b−1), 2^(b−1) − 1]) that torchao's `Int8WeightOnlyConfig` uses for its real int8 CPU path;
a test checks our 8-bit symmetric RTN against torchao's de-quantized weights.
"""

from __future__ import annotations

import torch


def rtn_scales(
    weight: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero point, each shaped [rows, groups, 1]."""
    groups = _grouped(weight, group_size)
    if symmetric:  # torchao's choose_qparams_affine(SYMMETRIC): s = max|w| / ((q_max − q_min)/2), z = 0
        scale = (groups.abs().amax(dim=2, keepdim=True) / ((2**bits - 1) / 2)).clamp_min(1e-12)
        return scale, torch.zeros_like(scale)
    lo, hi = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    return scale, zero


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = weight.shape
    size = group_size or cols
    if cols % size:
        raise ValueError(f"{cols} input features do not split into groups of {size}")
    return weight.reshape(rows, cols // size, size)


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 0, symmetric: bool = False) -> torch.Tensor:
    """The de-quantized b-bit RTN approximation of `weight` (same shape and dtype)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    scale, zero = rtn_scales(weight, bits, group_size, symmetric)
    groups = _grouped(weight, group_size)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    q = torch.clamp(torch.round(groups / scale) + zero, low, high)
    return ((q - zero) * scale).reshape(weight.shape).to(weight.dtype)
