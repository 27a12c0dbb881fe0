"""Params that name a model, and what the method needs of it.

A method's params field that names a model (a registered `name[@version]`, or a folder under an import root)
is declared with `model_field`, which writes the requirement into the params schema (`x-model-kind`,
`x-model-layout`) and says it in the field's description, so a user reads it in the catalog and the service
checks it at submission (a 422 naming `/params/<field>`) instead of the job failing minutes later. Its own
module, not `models.params`, so the record of every method that never names a model keeps its code hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field

ModelKind = Literal["causal-lm", "diffusers"]
# what a method walks in a causal LM: any stack of decoder blocks transformers exposes (`decoder_stack`), or the
# Llama layout itself (`model.layers` of blocks with self_attn.q/k/v/o_proj and mlp.gate/up/down_proj)
ModelLayout = Literal["decoder-stack", "llama"]
MODEL_KIND_WORDS = {"causal-lm": "a causal language model (a Hugging Face folder)", "diffusers": "a diffusers model"}
MODEL_LAYOUT_WORDS = {
    "decoder-stack": "any decoder-only causal LM (Llama, Qwen2, Mistral, GPT-NeoX, GPT-2, …)",
    "llama": "Llama-layout decoders only (Llama, Mistral, Qwen2, …: model.layers with q/k/v/o and gate/up/down "
    "projections); GPT-NeoX, GPT-2 and other layouts are refused",
}


def model_field(
    description: str, kind: ModelKind, layout: ModelLayout | None = None, builtin: Sequence[str] = ()
) -> Any:
    """A params field naming a model (a registered `name[@version]`, or a folder under an import root; empty: the
    method's default). What the method needs of it is in the schema (`x-model-kind`, `x-model-layout`, and the
    description says it in words), so the service checks the named model at submission, a 422 naming the field,
    instead of the job failing minutes later; `builtin` names the method loads without their being registered."""
    extra: dict[str, Any] = {"x-model-kind": kind}
    words = MODEL_KIND_WORDS[kind]
    if layout is not None:
        extra["x-model-layout"] = layout
        words = MODEL_LAYOUT_WORDS[layout]
    if builtin:
        extra["x-model-builtin"] = list(builtin)
    return Field("", description=f"{description}. Needs {words}", json_schema_extra=extra)


def model_fields(params: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """{field name: its `model_field` requirements} of a params class."""
    out = {}
    for name, info in params.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "x-model-kind" in extra:
            out[name] = dict(extra)
    return out
