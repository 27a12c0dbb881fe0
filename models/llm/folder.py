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
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not any(a.endswith("ForCausalLM") for a in architectures):
        raise UnsupportedArchitectureError(
            "config.json:architectures",
            f"{architectures or model_type!r} is not a causal language model transformers supports",
            "use a decoder-only *ForCausalLM model (e.g. LlamaForCausalLM)",
        )
    return config


def load_folder(folder: Path, dtype: str = "float32") -> CausalLM:
    """Load a local HF causal-LM folder (weights and tokenizer), in eval mode."""
    folder = Path(folder)
    check_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a Llama-layout model (`model.model.layers`), which compression walks."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        arch = type(model).__name__
        raise UnsupportedArchitectureError(
            "config.json:architectures",
            f"{arch} has no model.layers decoder stack",
            "compress a Llama-layout model (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, …)",
        )
    return layers
