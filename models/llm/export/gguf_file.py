"""A Llama-family Hugging Face folder as one GGUF file: what llama.cpp and Ollama load.

Format: ggml's GGUF spec (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): a header of typed
key–value metadata, then tensor infos and aligned tensor data, written here with the `gguf` package's
`GGUFWriter`. What llama.cpp's `llama` and `qwen2` graphs expect follows its `convert_hf_to_gguf.py`:

- tensor names (gguf's `TENSOR_NAMES`): `token_embd`, `blk.N.attn_norm`, `blk.N.attn_q/k/v`, `blk.N.attn_output`,
  `blk.N.ffn_norm`, `blk.N.ffn_gate/up/down`, `output_norm`, `output` (left out when the head is tied to the
  embeddings: llama.cpp then reads `token_embd`);
- the rotary layout: Hugging Face's Llama rotates the two halves of each head (`rotate_half`), llama.cpp's
  `llama` graph rotates adjacent pairs, so the rows of q_proj (and k_proj, per key–value head) are permuted within
  each head: row `h·d + 2i + j` of the GGUF tensor is row `h·d + j·d/2 + i` of ours (`rotary_interleave`; the
  biases too). Qwen2 runs llama.cpp's NeoX-style rotation, which is Hugging Face's own, so it is not permuted;
- hyper-parameters under `<arch>.`: context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count(_kv), rope.freq_base, attention.layer_norm_rms_epsilon, rope.dimension_count, vocab_size;
- the tokenizer as `tokenizer.ggml.model = gpt2` (byte-level BPE): the tokens by id in their byte-level spelling,
  their types (control for special added tokens), the merges, `pre = gpt-2` (the GPT-2 split regex our
  `tokenizers` ByteLevel pre-tokenizer applies), bos/eos/pad ids, whether a BOS is added, the chat template.

Types by `quantization`: `dense` keeps each matrix in its stored precision (F32, F16 or BF16, lossless); `int8`
is Q8_0 and `int4` Q4_0 (blocks of 32 weights sharing one f16 scale: d = max|x|/127 and q = round(x/d) for Q8_0;
d = x_max/−8 and q = trunc(x/d + 8.5) clamped to 0..15 for Q4_0), computed by `gguf.quants` bit-exactly as ggml
does. Norms and biases stay F32 (ggml adds and multiplies them in F32); a matrix whose rows do not split into
blocks of 32 falls back to F16, as llama.cpp's converter does, with a note. Rotary scaling (`rope_type` other
than default) and Qwen2's sliding window are refused rather than silently dropped; a Mistral window shorter than
the context caps `context_length`, since llama.cpp's `llama` graph has no window.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.llm.export.base import ExportError, ExportResult, Quantization, read_tensors
from models.llm.folder import read_config

# model_type → (llama.cpp architecture, whether q/k rows need the pairwise rotary permutation)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}
BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
QUANT_BLOCK = 32  # weights per Q8_0 / Q4_0 block (ggml's QK8_0, QK4_0)


def tensor_names() -> dict[str, Any]:
    """Our module path (block-relative inside a block) → gguf's `MODEL_TENSOR`."""
    from gguf import MODEL_TENSOR as T

    return {
        "model.embed_tokens": T.TOKEN_EMBD,
        "model.norm": T.OUTPUT_NORM,
        "lm_head": T.OUTPUT,
        "input_layernorm": T.ATTN_NORM,
        "self_attn.q_proj": T.ATTN_Q,
        "self_attn.k_proj": T.ATTN_K,
        "self_attn.v_proj": T.ATTN_V,
        "self_attn.o_proj": T.ATTN_OUT,
        "post_attention_layernorm": T.FFN_NORM,
        "mlp.gate_proj": T.FFN_GATE,
        "mlp.up_proj": T.FFN_UP,
        "mlp.down_proj": T.FFN_DOWN,
    }


def gguf_name(name: str) -> str | None:
    """The llama.cpp name of one of our checkpoint tensors (None for what llama.cpp recomputes)."""
    from gguf import TENSOR_NAMES

    if name.endswith("rotary_emb.inv_freq"):
        return None
    table = tensor_names()
    if match := BLOCK_RE.fullmatch(name):
        bid, module, kind = match.groups()
        if module in table:
            return f"{TENSOR_NAMES[table[module]].format(bid=int(bid))}.{kind}"
    module, _, kind = name.rpartition(".")
    if module in table:
        return f"{TENSOR_NAMES[table[module]]}.{kind}"
    raise ExportError(
        "format",
        f"the checkpoint tensor {name} has no counterpart in llama.cpp's Llama graph",
        "export the folder as compressed-tensors, or a standard Llama/Mistral/Qwen2 folder as GGUF",
    )


def rotary_interleave(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection (or its bias) from Hugging Face's half-split rotary layout to llama.cpp's
    adjacent-pair one, head by head (see the module docstring)."""
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, 2, per_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


@dataclass
class Hyper:
    """The hyper-parameters llama.cpp reads, from config.json."""

    arch: str
    permute: bool
    context: int
    hidden: int
    blocks: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    vocab: int
    tied: bool


def hyper_parameters(config: Mapping[str, Any]) -> Hyper:
    """The supported architecture's hyper-parameters, or an `ExportError` naming `format` and why not."""
    model_type = str(config.get("model_type"))
    if model_type not in ARCHITECTURES:
        raise ExportError(
            "format",
            f"GGUF export supports Llama-family folders ({', '.join(ARCHITECTURES)}); this one is {model_type}",
            "export it as compressed-tensors (format=compressed-tensors), which takes any causal LM",
        )
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ExportError(
            "format",
            f"rotary scaling {rope_type!r} is not exported to GGUF yet (llama.cpp needs its own rope keys for it)",
            "export it as compressed-tensors",
        )
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise ExportError(
            "format", "Qwen2 sliding-window attention is not exported to GGUF", "export as compressed-tensors"
        )
    arch, permute = ARCHITECTURES[model_type]
    heads = int(config["num_attention_heads"])
    context = int(config.get("max_position_embeddings") or 2048)
    if model_type == "mistral" and config.get("sliding_window"):
        context = min(context, int(config["sliding_window"]))
    return Hyper(
        arch=arch,
        permute=permute,
        context=context,
        hidden=int(config["hidden_size"]),
        blocks=int(config["num_hidden_layers"]),
        ffn=int(config["intermediate_size"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rms_eps=float(config.get("rms_norm_eps") or 1e-6),
        vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)),
    )


@dataclass
class Vocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int]  # bos / eos / pad / unk → id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    """The byte-level BPE tokenizer of the folder's tokenizer.json as GGUF's `gpt2` tokenizer model."""
    from gguf import TokenType

    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise ExportError(
            "format",
            "GGUF export writes byte-level BPE tokenizers with GPT-2's split (a tokenizer.json whose model is BPE and "
            "pre-tokenizer ByteLevel); this folder's tokenizer is not one",
            "export it as compressed-tensors, which keeps any tokenizer",
        )
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
    by_id.update({i: t["content"] for i, t in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(
            "format", f"the tokenizer has ids up to {max(by_id)}, past vocab_size {vocab_size}", "fix vocab_size"
        )
    tokens, types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces get placeholders, as llama.cpp's converter does
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(TokenType.USER_DEFINED)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {t: i for i, t in enumerate(tokens)}
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.exists() else {}
    special = {}
    for role in ("bos", "eos", "pad", "unk"):
        text = _token_text(settings.get(f"{role}_token"))
        if text in ids:
            special[role] = ids[text]
    template = settings.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    single = (spec.get("post_processor") or {}).get("single") or []  # a TemplateProcessing's single-sequence template
    first, last = ((single[i].get("SpecialToken") or {}).get("id") if single else None for i in (0, -1))
    add_bos = "bos" in special and first == tokens[special["bos"]]
    add_eos = "eos" in special and last == tokens[special["eos"]]
    return Vocabulary(tokens, [int(t) for t in types], merges, special, add_bos, add_eos, template)


def tensor_type(tensor: torch.Tensor, quantization: Quantization) -> Any:
    """The GGML type of one tensor (see the module docstring)."""
    from gguf import GGMLQuantizationType as Q

    if tensor.ndim == 1:
        return Q.F32
    if quantization == "dense":
        return {torch.float16: Q.F16, torch.bfloat16: Q.BF16}.get(tensor.dtype, Q.F32)
    if tensor.shape[-1] % QUANT_BLOCK:
        return Q.F16
    return Q.Q8_0 if quantization == "int8" else Q.Q4_0


def file_type(types: list[Any]) -> int:
    """`general.file_type`: what most matrices are stored as (llama.cpp prints it as the model's type)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    for qtype, ftype in (
        (Q.Q4_0, F.MOSTLY_Q4_0),
        (Q.Q8_0, F.MOSTLY_Q8_0),
        (Q.BF16, F.MOSTLY_BF16),
        (Q.F16, F.MOSTLY_F16),
    ):
        if qtype in types:
            return int(ftype)
    return int(F.ALL_F32)


def write_metadata(writer: Any, hp: Hyper, vocab: Vocabulary, name: str, types: list[Any]) -> None:
    from gguf import GGML_QUANT_VERSION

    writer.add_name(name)
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.blocks)
    writer.add_feed_forward_length(hp.ffn)
    writer.add_head_count(hp.heads)
    writer.add_head_count_kv(hp.kv_heads)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.heads != hp.hidden:  # heads wider or narrower than hidden / heads
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_vocab_size(hp.vocab)
    writer.add_file_type(file_type(types))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        if role in vocab.special:
            add(vocab.special[role])
    if "pad" in vocab.special:
        writer.add_pad_token_id(vocab.special["pad"])
    if "unk" in vocab.special:
        writer.add_unk_token_id(vocab.special["unk"])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def gguf_tensors(tensors: Mapping[str, torch.Tensor], hp: Hyper) -> dict[str, torch.Tensor]:
    """Our tensors under llama.cpp's names, q/k permuted where the architecture needs it, tied head left out."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sorted(tensors.items()):
        target = gguf_name(name)
        if target is None or (target.startswith("output.") and hp.tied):
            continue
        if hp.permute and ".self_attn.q_proj." in name:
            tensor = rotary_interleave(tensor, hp.heads)
        elif hp.permute and ".self_attn.k_proj." in name:
            tensor = rotary_interleave(tensor, hp.kv_heads)
        out[target] = tensor
    return out


def write_gguf(folder: Path, dest: Path, quantization: Quantization, name: str = "") -> ExportResult:
    """Write the Llama-family folder `folder` as the GGUF file `dest` (see the module docstring)."""
    from gguf import GGUFWriter
    from gguf.quants import quantize

    folder, dest = Path(folder), Path(dest)
    hp = hyper_parameters(read_config(folder))
    vocab = vocabulary(folder, hp.vocab)
    tensors = gguf_tensors({k: v.contiguous() for k, v in read_tensors(folder).items()}, hp)
    types = {target: tensor_type(t, quantization) for target, t in tensors.items()}
    notes = [
        f"{target} stays F16: its rows of {t.shape[-1]} do not split into blocks of {QUANT_BLOCK}"
        for target, t in tensors.items()
        if t.ndim == 2 and quantization != "dense" and types[target].name == "F16"
    ]
    writer = GGUFWriter(str(dest), hp.arch)
    write_metadata(writer, hp, vocab, name or folder.name, [types[t] for t, x in tensors.items() if x.ndim == 2])
    for target, tensor in tensors.items():
        data = quantize(tensor.float().numpy(), types[target])  # a float32 view first: numpy has no bfloat16
        writer.add_tensor(target, data, raw_dtype=types[target])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ExportResult(dest, notes)
