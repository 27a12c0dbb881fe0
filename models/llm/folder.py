"""Standard Hugging Face model folders: save a causal LM with its tokenizer, and load any local one.

A folder is what `save_pretrained` writes: `config.json`, `model.safetensors` (or shards with an
index) and the tokenizer files, plus `generation_config.json`. Loading goes through
`AutoModelForCausalLM` with `local_files_only=True`, `use_safetensors=True` and no remote code, so
the same path serves the tiny Llama trained here and a real Llama copied to disk, and never
unpickles anything. A folder that cannot be served raises a `ModelFolderError` subclass naming the
field and the fix, for the service to map to a 4xx problem body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

LINEAGE_FILE = "crucible-lineage.json"


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; `field` names the offending part, `fix` says what to do."""

    status_code = 422

    def __init__(self, field: str, message: str, fix: str):
        self.field, self.fix = field, fix
        super().__init__(f"{field}: {message}. {fix}")


class MissingConfigError(ModelFolderError):
    """No readable `config.json`."""


class MissingWeightsError(ModelFolderError):
    """No `*.safetensors` weights (pickled `.bin`/`.pt` weights are refused, never loaded)."""


class WeightsMismatchError(ModelFolderError):
    """Safetensors whose tensors are not the ones the config's model has (missing, or of another shape)."""


class MissingTokenizerError(ModelFolderError):
    """No tokenizer files `AutoTokenizer` can read (`field` names the file to add)."""


class UnsupportedArchitectureError(ModelFolderError):
    """Not a causal LM transformers knows, or not the decoder layout a compression job needs."""


@dataclass
class CausalLM:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path

    @property
    def lineage(self) -> dict[str, Any]:
        return read_lineage(self.path)


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingConfigError(
            "config.json", f"no config.json in {folder}", "point at a folder written by save_pretrained"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise MissingConfigError("config.json", f"unreadable ({exc})", "write a valid JSON model config") from exc


def check_folder(folder: Path) -> dict[str, Any]:
    """Validate a folder without loading weights; its config on success."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingConfigError("path", f"{folder} is not a folder", "give the path of a model folder")
    config = read_config(folder)
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {', '.join(pickled)}, which are pickles and never loaded)" if pickled else ""
        raise MissingWeightsError(
            "model.safetensors",
            f"no safetensors weights in {folder}{found}",
            "save the model with save_pretrained(safe_serialization=True)",
        )
    check_causal_config(config)
    check_tokenizer_files(folder)
    return config


# Families whose causal-LM class is an encoder with a language-model head bolted on: a checkpoint of theirs is a
# causal LM only when its config says `is_decoder` (a BERT trained for masked LM would generate noise).
_ENCODER_FAMILIES = frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def check_causal_config(config: Mapping[str, Any]) -> str:
    """The class `AutoModelForCausalLM` builds for this config (it picks by `model_type`, not by `architectures`);
    `UnsupportedArchitectureError` listing the accepted model types when it builds none, or when `architectures`
    names a model of another kind (a masked LM, a classifier) whose causal head would start from random weights."""
    model_type = config.get("model_type")
    architectures = [str(a) for a in config.get("architectures") or []]
    known = ", ".join(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitectureError(
            "config.json:model_type",
            f"model_type {model_type!r} is not a causal language model transformers' AutoModelForCausalLM builds",
            f"upload a causal LM of one of these model types: {known}",
        )
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    if model_type in _ENCODER_FAMILIES and not config.get("is_decoder") and causal not in architectures:
        raise UnsupportedArchitectureError(
            "config.json:architectures",
            f"{', '.join(architectures) or model_type} is an encoder ({model_type} without is_decoder: true), "
            "not a causal language model",
            f"upload a decoder-only causal LM ({causal} with is_decoder: true, or a model type such as llama, "
            "qwen2, gpt_neox, gpt2)",
        )
    if architectures and not any(a == causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise UnsupportedArchitectureError(
            "config.json:architectures",
            f"{', '.join(architectures)} is not a causal language model; its causal-LM head ({causal}) would be "
            "random weights",
            f"save the model as {causal} (or drop `architectures`: {model_type} loads as {causal})",
        )
    return causal


# What `AutoTokenizer` can build a tokenizer from, by the files a folder holds.
TOKENIZER_FILE_SETS: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)


def check_tokenizer_files(folder: Path) -> None:
    """A folder needs the files of a tokenizer (else `MissingTokenizerError` naming the missing file, instead of
    transformers' text about sentencepiece or tiktoken)."""
    names = {p.name for p in Path(folder).iterdir()}
    if any(all(f in names for f in files) for files in TOKENIZER_FILE_SETS):
        return
    if any(n.endswith(".tiktoken") for n in names):
        return
    if "vocab.json" in names:
        missing = "merges.txt"
        detail = "vocab.json is there but merges.txt, the BPE merges it needs, is not"
    elif "merges.txt" in names:
        missing = "vocab.json"
        detail = "merges.txt is there but vocab.json, the vocabulary it needs, is not"
    else:
        missing = "tokenizer.json"
        detail = "no tokenizer.json (nor tokenizer.model, vocab.json + merges.txt or vocab.txt)"
    raise MissingTokenizerError(
        missing, f"the folder has no usable tokenizer: {detail}", "save the tokenizer with tokenizer.save_pretrained()"
    )


def meta_model(config: Mapping[str, Any]) -> PreTrainedModel:
    """The model `AutoModelForCausalLM` builds from this config, on the meta device: its modules, parameter names
    and shapes without a byte of memory or any weights, for checks that must not load a model."""
    import torch
    from transformers import AutoConfig

    check_causal_config(config)
    try:
        hf_config = AutoConfig.for_model(**dict(config))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as exc:  # noqa: BLE001 - an inconsistent config; the message names the field
        raise UnsupportedArchitectureError(
            "config.json",
            f"transformers cannot build a {config.get('model_type')} model from it ({str(exc)[:300]})",
            "fix the config (save it again with save_pretrained)",
        ) from None


def check_weights(folder: Path, config: Mapping[str, Any]) -> None:
    """The folder's safetensors hold every parameter the config's model has, in its shape (read from the
    headers; nothing is loaded). Names are compared without the base model's prefix (`model.`, `transformer.`),
    which checkpoints of the bare model omit, a tied parameter counts once, and a parameter transformers finds
    under a legacy name counts as there when a tensor of its kind and shape is left over.
    `WeightsMismatchError` naming the first tensors that are missing or of another shape."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    model = meta_model(config)
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""

    def bare(name: str) -> str:
        return name.removeprefix(prefix) if prefix else name

    have = {bare(k): v for k, v in shapes.items()}
    missing, wrong = [], []
    for name, param in model.named_parameters():  # tied parameters appear once
        found = have.pop(bare(name), None)
        if found is None:
            missing.append((name, tuple(param.shape)))
        elif found != tuple(param.shape):
            wrong.append(f"{name} is {list(found)} in the file, {list(param.shape)} in the config's model")
    # transformers renames some checkpoint keys as it loads them (GPT-NeoX's `embed_out` is `lm_head`): a missing
    # parameter is there under another name when a file tensor no parameter took has its kind and shape
    spare = [(k.rsplit(".", 1)[-1], v) for k, v in have.items()]
    for name, shape in list(missing):
        if (name.rsplit(".", 1)[-1], shape) in spare:
            spare.remove((name.rsplit(".", 1)[-1], shape))
            missing.remove((name, shape))
    if wrong or missing:
        names = ", ".join(n for n, _ in missing[:3])
        detail = "; ".join(wrong[:3]) if wrong else f"{len(missing)} tensors are missing ({names})"
        raise WeightsMismatchError(
            "model.safetensors",
            f"the weights do not match config.json: {detail}",
            "upload the config.json the weights were saved with (save_pretrained writes both)",
        )


def check_layout(config: Mapping[str, Any], layout: str) -> None:
    """That a causal LM of this config has what a method walks (`models.params.ModelLayout`): a decoder stack
    (`decoder_stack`) with linear maps in its blocks, or the Llama layout. Decided on the model transformers
    builds from the config on the meta device (no memory, no weights, any size in milliseconds), so it is the
    walk the job will take, not a list of names. `UnsupportedArchitectureError` naming what is missing."""
    model = meta_model(config)
    model_type = str(config.get("model_type"))
    stack, layers = decoder_stack(model)
    block = layers[0]
    names = {n for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    llama = {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    if not names:
        raise UnsupportedArchitectureError(
            "config.json:model_type",
            f"the {model_type} decoder blocks ({type(block).__name__}) hold no linear layers to compress",
            "use a decoder whose blocks are made of linear layers (Llama, Qwen2, GPT-NeoX, GPT-2, …)",
        )
    if layout == "llama" and (stack != "model.layers" or not llama <= names):
        raise UnsupportedArchitectureError(
            "config.json:model_type",
            f"{type(model).__name__} ({model_type}) does not have the Llama layout this method walks (model.layers "
            "of blocks with self_attn.q/k/v/o_proj and mlp.gate/up/down_proj)",
            "use a Llama-layout model (llama, mistral, qwen2, …) or a method that takes any decoder stack (eora)",
        )


def load_folder(folder: Path, dtype: str = "float32") -> CausalLM:
    """Load a local HF causal-LM folder (weights and tokenizer), in eval mode."""
    folder = Path(folder)
    check_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=dtype
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, ImportError, TypeError) as exc:  # the files are there but do not make a tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MissingTokenizerError(
            "tokenizer_config.json",
            f"the tokenizer files do not load ({first[:300]})",
            "save the tokenizer with tokenizer.save_pretrained() into the model folder",
        ) from None
    return CausalLM(model.eval(), tokenizer, folder)


def save_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, lineage: Mapping[str, Any] | None = None
) -> Path:
    """Write weights as safetensors, the tokenizer, and (optionally) where the model came from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    if lineage is not None:
        (folder / LINEAGE_FILE).write_text(json.dumps(dict(lineage), indent=1, default=str), encoding="utf-8")
    return folder


def read_lineage(folder: Path) -> dict[str, Any]:
    path = Path(folder) / LINEAGE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def decoder_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder blocks compression walks and its module path (`model.layers` for Llama, Qwen2 and
    Mistral, `gpt_neox.layers` for GPT-NeoX, `transformer.h` for GPT-2).

    Found the way transformers itself knows it: a model class names its decoder block class in
    `_no_split_modules` (what accelerate keeps whole on one device), and the stack is the `ModuleList` of
    those blocks, so no per-architecture table is needed; `model.layers` is the fallback for models that
    name none. `UnsupportedArchitectureError` when there is no such stack."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(type(b).__name__ in blocks for b in module):
            return name, module
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return "model.layers", layers
    arch = type(model).__name__
    raise UnsupportedArchitectureError(
        "config.json:architectures",
        f"{arch} has no stack of decoder blocks transformers exposes",
        "compress a decoder-only model (Llama, Qwen2, Mistral, GPT-NeoX, GPT-2, …)",
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model` (see `decoder_stack`)."""
    return decoder_stack(model)[1]
