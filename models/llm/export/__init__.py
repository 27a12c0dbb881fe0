"""Exports of a Hugging Face causal-LM folder to the files other engines deploy: compressed-tensors (vLLM,
llm-compressor) and GGUF (llama.cpp, Ollama), dense or with int8 / int4 weights.

`export_model` is the one entry point; each format is a pure folder → file transform in its own module
(`compressed_tensors`, `gguf_file`), imported only when asked for, since each pulls in its format's package.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.llm.export.base import FORMATS, QUANTIZATIONS, ExportError, ExportFormat, ExportResult, Quantization

__all__ = ["FORMATS", "QUANTIZATIONS", "ExportError", "ExportResult", "export_model", "export_name"]


def export_name(stem: str, fmt: ExportFormat, quantization: Quantization) -> str:
    """The file name of an export: `<stem>-<quantization>.gguf`, or `<stem>-<quantization>-compressed-tensors`
    (a folder)."""
    return f"{stem}-{quantization}.gguf" if fmt == "gguf" else f"{stem}-{quantization}-compressed-tensors"


def export_model(
    folder: Path,
    out_dir: Path,
    fmt: ExportFormat,
    quantization: Quantization = "dense",
    stem: str = "",
    lineage: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export `folder` into `out_dir` as `export_name(stem, ...)` (stem: the folder's name); `ExportError` naming
    `format` or `quantization` when this folder cannot have that export."""
    if fmt not in FORMATS:
        raise ExportError("format", f"unknown export format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if quantization not in QUANTIZATIONS:
        raise ExportError(
            "quantization", f"unknown quantization {quantization!r}", f"use one of {', '.join(QUANTIZATIONS)}"
        )
    dest = Path(out_dir) / export_name(stem or Path(folder).name, fmt, quantization)
    if fmt == "gguf":
        from models.llm.export.gguf_file import write_gguf

        return write_gguf(folder, dest, quantization, name=stem)
    from models.llm.export.compressed_tensors import write_compressed_tensors

    return write_compressed_tensors(folder, dest, quantization, lineage)
