"""What every export shares: the formats and weight quantizations a person can ask for, the error that refuses
an export naming the request field at fault, and reading a folder's safetensors.

An export is a pure folder → file transform: it reads a Hugging Face folder (config.json, safetensors, the
tokenizer files) and writes the file another engine loads, so it runs, and is tested, without the service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

ExportFormat = Literal["compressed-tensors", "gguf"]
Quantization = Literal["dense", "int8", "int4"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


class ExportError(ValueError):
    """An export this folder cannot have; `field` names the request field at fault (`format`, `quantization`),
    `fix` says what would work, for the service to answer a 422 naming `/<field>`."""

    def __init__(self, field: str, message: str, fix: str):
        self.field, self.message, self.fix = field, message, fix
        super().__init__(f"{field}: {message}; {fix}")


@dataclass
class ExportResult:
    """The written file or folder, and sentences a person should read about it (what was left out, and why)."""

    path: Path
    notes: list[str] = field(default_factory=list)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors (one file or shards), by its checkpoint name."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors
