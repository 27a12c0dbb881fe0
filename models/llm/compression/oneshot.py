"""One-shot compression of a whole model: prune or RTN-quantize every linear of every decoder block.

Blocks are processed in order with calibration statistics taken after the earlier blocks were
compressed (`calibration.compress_sequentially`), as SparseGPT's and Wanda's reference drivers do;
magnitude pruning and RTN need no data. Embeddings, norms and the LM head stay dense, as in the
papers. Returns what downstream steps need: the keep masks (SquareHead and EoRA keep them fixed)
and each linear's storage format (for packed bytes).
"""

from __future__ import annotations

import torch
from torch import nn

from models.llm.compression.calibration import InputStats, block_linears, compress_sequentially, weight_matrix
from models.llm.compression.pruning import PruneMethod, SparsityPattern, prune_weight
from models.llm.compression.quantization import rtn_quantize
from models.llm.compression.storage import LinearFormat
from models.llm.folder import decoder_layers, decoder_stack


def linear_name(layer: int, name: str, stack: str = "model.layers") -> str:
    """The full module name of a block's linear (`stack`: the decoder stack's path, `decoder_stack`'s first item)."""
    return f"{stack}.{layer}.{name}"


@torch.no_grad()
def prune_model(
    model: nn.Module, windows: torch.Tensor | None, pattern: SparsityPattern, method: PruneMethod, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Prune every block linear in place; {full module name: keep mask}."""
    masks: dict[str, torch.Tensor] = {}
    stack = decoder_stack(model)[0]

    def edit(layer: int, name: str, linear: nn.Module, stats: InputStats | None) -> None:
        weight = weight_matrix(linear).data
        pruned, keep = prune_weight(weight, pattern, method, None if stats is None else stats.gram)
        weight.copy_(pruned)
        masks[linear_name(layer, name, stack)] = keep

    if method == "magnitude":
        for layer, block in enumerate(decoder_layers(model)):
            for name, linear in block_linears(block).items():
                edit(layer, name, linear, None)
    else:
        if windows is None:
            raise ValueError(f"{method} pruning needs calibration windows")
        compress_sequentially(model, windows, edit, batch_size)
    return masks


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int = 0) -> dict[str, LinearFormat]:
    """RTN-quantize every block linear in place (de-quantized storage); {full module name: format}.
    A layer whose width `group_size` does not divide is quantized per row."""
    formats = {}
    stack, layers = decoder_stack(model)
    for layer, block in enumerate(layers):
        for name, linear in block_linears(block).items():
            weight = weight_matrix(linear).data
            group = group_size if group_size and weight.shape[1] % group_size == 0 else 0
            weight.copy_(rtn_quantize(weight, bits, group))
            formats[linear_name(layer, name, stack)] = LinearFormat(value_bits=bits, group_size=group)
    return formats


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero pruned weights (after an optimizer step, so sparse fine-tuning keeps its masks)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            weight = weight_matrix(modules[name])
            weight.mul_(keep.to(weight.dtype))
