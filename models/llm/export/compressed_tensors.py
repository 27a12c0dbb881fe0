"""A Hugging Face folder as a compressed-tensors checkpoint: what vLLM and llm-compressor load.

Format (https://github.com/neuralmagic/compressed-tensors, its docs and `QuantizationConfig`): the folder keeps
its config.json, tokenizer and layout; config.json gains a `quantization_config` with `quant_method:
compressed-tensors`, the `config_groups` (which modules, and each one's `QuantizationArgs`), the storage `format`
and the `ignore` list; a quantized linear's `weight` becomes `weight_packed` (int32 words holding 32/b codes each),
`weight_scale` and `weight_shape`. We write the two schemes vLLM serves as weight-only kernels, as llm-compressor's
W8A16 and W4A16 presets store them:

- `int8`: 8-bit symmetric, one scale per output channel (`strategy: channel`);
- `int4`: 4-bit symmetric, one scale per group of 128 input weights (`strategy: group`), or, where the in-features
  do not split into 128 (the tiny test models), the largest divisor of them all below 128;
- `dense`: the folder as it is, weights byte for byte (a plain folder any Hugging Face tool loads).

Every `nn.Linear` but the output head is quantized (the head, like llm-compressor's recipes, stays dense). Scales
are symmetric min–max, s = max|w| / ((2^b − 1)/2), the rule of `models.llm.compression.quantization.rtn_scales`
and of llm-compressor's default observer; the codes are the package's own `quantize` (q = clamp(round(w/s))), so
the package's `decompress` gives back q·s exactly. The packing is the package's `PackedQuantizationCompressor`
and the config is written by its `ModelCompressor.update_config`, so nothing of the format is re-implemented.

Sparsity. A model a pruning job made (its lineage names a `sparsity`, `nm_ff` or `nm_attn`) is recorded as
`sparsity_config` in compressed-tensors' own terms (`DenseSparsityConfig`: format `dense`, the weights kept with
their explicit zeros, `sparsity_structure` and `global_sparsity`), but only what the weights show is claimed:
`2:4` when every quantized linear has at most two non-zeros in each group of four consecutive inputs (true of the
sparser N:M patterns too), `unstructured` when the zeros reach the claimed fraction, and nothing, with a note, when
the weights do not bear the lineage out (e.g. a pruned model fine-tuned without its mask). `global_sparsity` is
the fraction of zeros over the quantized linears. Symmetric quantization maps 0 to the code 0, so the zeros
survive quantization. EoRA's RTN branch carries an unused `sparsity` default, so `compression: rtn` claims none.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.llm.compression.pruning import SparsityPattern
from models.llm.compression.quantization import rtn_scales
from models.llm.export.base import ExportError, ExportResult, Quantization, read_tensors
from models.llm.folder import read_config, read_lineage

BITS = {"int8": 8, "int4": 4}
INT4_GROUP = 128  # llm-compressor's W4A16 preset and the group Marlin kernels are tuned for
PACKED_FORMAT = "pack-quantized"  # what llm-compressor writes for weight-only int schemes (W8A16, W4A16)
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json")


def linear_layout(config: Mapping[str, Any]) -> tuple[list[str], list[str], dict[str, int]]:
    """(quantized linears, ignored modules, in-features by linear) of the model the config builds: every
    `nn.Linear` but the output head, found on the meta device without loading a weight."""
    from models.llm.folder import meta_model

    model = meta_model(config)
    head = model.get_output_embeddings()
    linears, ignored, fan_in = [], [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is head:
            ignored.append(name)
        else:
            linears.append(name)
            fan_in[name] = module.in_features
    return linears, ignored, fan_in


def int4_group(in_features: Iterable[int]) -> int:
    """128, or the largest divisor of every layer's in-features below it (one scheme covers all the linears)."""
    common = math.gcd(*in_features)
    return max(d for d in range(1, min(common, INT4_GROUP) + 1) if common % d == 0)


def weight_args(quantization: Quantization, group: int) -> Any:
    """The package's `QuantizationArgs` of a weight-only symmetric int scheme."""
    from compressed_tensors.quantization import QuantizationArgs

    if quantization == "int8":
        return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)


def weight_scale(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric min–max scales shaped as the format stores them: [out, 1] per channel, [out, in/group] per group
    (computed in fp32, kept in the weight's dtype as llm-compressor keeps them)."""
    scale, _ = rtn_scales(weight.float(), bits, group, symmetric=True)
    return scale.reshape(weight.shape[0], -1).to(weight.dtype)


def claimed_sparsity(lineage: Mapping[str, Any]) -> list[SparsityPattern]:
    """The sparsity patterns the job that made the model says it applied (see the module docstring)."""
    params = lineage.get("params") or {}
    if params.get("compression") == "rtn":
        return []
    return [SparsityPattern.parse(params[k]) for k in ("sparsity", "nm_ff", "nm_attn") if params.get(k)]


def is_two_four(weight: torch.Tensor) -> bool:
    """At most two non-zeros in every group of four consecutive inputs of each row (NVIDIA's 2:4 layout)."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight.reshape(rows, cols // 4, 4) != 0).sum(dim=2) <= 2).all())


def sparsity_config(
    weights: Mapping[str, torch.Tensor], lineage: Mapping[str, Any], ignore: list[str]
) -> tuple[dict[str, Any] | None, list[str]]:
    """The `sparsity_config` the weights bear out (None when none), and a note when the lineage claims more."""
    from compressed_tensors.config import DenseSparsityConfig

    claims = claimed_sparsity(lineage)
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / max(1, sum(w.numel() for w in weights.values()))
    if weights and all(is_two_four(w) for w in weights.values()):
        structure = "2:4"
    elif claims and zeros >= min(c.sparsity for c in claims) - 0.01:
        structure = "unstructured"
    else:
        said = ", ".join(map(str, claims))
        notes = [f"the lineage claims {said} sparsity but {zeros:.1%} of the weights are zero: none recorded"]
        return None, notes if claims else []
    config = DenseSparsityConfig(
        global_sparsity=round(zeros, 4), sparsity_structure=structure, targets=["Linear"], ignore=ignore
    )
    return config.model_dump(), []


def compress_linears(
    tensors: dict[str, torch.Tensor], linears: list[str], quantization: Quantization, group: int
) -> dict[str, torch.Tensor]:
    """The checkpoint with each linear's `weight` replaced by the package's packed codes, scale and shape."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(quantization, group), format=PACKED_FORMAT)
    packer = BaseCompressor.get_value_from_registry(PACKED_FORMAT)
    out = dict(tensors)
    for name in linears:
        weight = out.pop(f"{name}.weight")
        scale = weight_scale(weight, BITS[quantization], group if quantization == "int4" else 0)
        local = {
            "weight": weight,
            "weight_scale": scale,
            "weight_zero_point": torch.zeros_like(scale, dtype=torch.int8),
        }
        out.update({f"{name}.{key}": t.contiguous() for key, t in packer.compress(local, scheme).items()})
    return out


def write_config(dest: Path, config: Mapping[str, Any], quantization_config: Any, sparsity: dict | None) -> None:
    """config.json with the package's `quantization_config` (written by `ModelCompressor.update_config`)."""
    from compressed_tensors.compressors import ModelCompressor

    (dest / "config.json").write_text(json.dumps(dict(config), indent=2), encoding="utf-8")
    ModelCompressor(quantization_config=quantization_config).update_config(str(dest))
    if sparsity is not None:  # the package writes an empty one ("sparsity is removed for now"); ours is measured
        written = json.loads((dest / "config.json").read_text(encoding="utf-8"))
        written["quantization_config"]["sparsity_config"] = sparsity
        (dest / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True), encoding="utf-8")


def copy_companions(folder: Path, dest: Path, weights_too: bool) -> None:
    """The folder's top-level files but config.json (tokenizer, generation config, lineage), and its
    safetensors when `weights_too`."""
    weights = {p.name for pattern in WEIGHT_FILES for p in folder.glob(pattern)}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != "config.json" and (weights_too or path.name not in weights):
            shutil.copy2(path, dest / path.name)


def write_compressed_tensors(
    folder: Path, dest: Path, quantization: Quantization, lineage: Mapping[str, Any] | None = None
) -> ExportResult:
    """Write `folder` as a compressed-tensors checkpoint into the new folder `dest` (see the module docstring)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    folder, dest = Path(folder), Path(dest)
    config = read_config(folder)
    lineage = read_lineage(folder) if lineage is None else lineage
    linears, ignore, fan_in = linear_layout(config)
    if quantization != "dense" and not linears:
        raise ExportError(
            "quantization",
            f"{config.get('model_type')} keeps its projections in no nn.Linear layers (e.g. GPT-2's Conv1D), "
            "which compressed-tensors' weight-only schemes target",
            "export it with quantization=dense, or export a Llama-family model quantized",
        )
    tensors = read_tensors(folder)
    sparsity, notes = sparsity_config({n: tensors[f"{n}.weight"] for n in linears}, lineage, ignore)
    dest.mkdir(parents=True)
    copy_companions(folder, dest, weights_too=quantization == "dense")
    if quantization == "dense":
        groups: dict[str, Any] = {}
        stored = "dense"
    else:
        group = int4_group(fan_in.values())
        if quantization == "int4" and group != INT4_GROUP:
            notes.append(f"int4 groups of {group}: the in-features do not all split into {INT4_GROUP}")
        from safetensors.torch import save_file

        save_file(
            compress_linears(tensors, linears, quantization, group), str(dest / "model.safetensors"), {"format": "pt"}
        )
        scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(quantization, group), format=PACKED_FORMAT)
        groups, stored = {"group_0": scheme}, PACKED_FORMAT
    if groups or sparsity is not None:  # a dense folder without sparsity stays a plain folder
        qconfig = QuantizationConfig(
            config_groups=groups, format=stored, quantization_status="compressed", ignore=ignore
        )
        write_config(dest, config, qconfig, sparsity)
    else:
        shutil.copy2(folder / "config.json", dest / "config.json")
    return ExportResult(dest, notes)
