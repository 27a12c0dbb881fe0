"""Exports of tiny Hugging Face folders to compressed-tensors and GGUF, read back with each format's own package.

compressed-tensors: the package decompresses the packed weights to exactly a symmetric int8 / int4 quantization
computed here independently; the folder loads in transformers with the logits of a model holding those weights;
a dense export is a plain folder with the source's logits; the sparsity recorded is the one the weights show.
GGUF: `gguf.GGUFReader` reads back every tensor equal to ours under llama.cpp's names (q/k rows permuted, F32 /
F16 exact, Q8_0 and Q4_0 equal to ggml's block rules written out here), the metadata equal to the config, the
vocabulary re-encoding text to the same ids; the permutation turns Hugging Face's half-split rotary embedding
into llama.cpp's adjacent-pair one; other architectures are refused naming `format`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM

from models.llm.export import ExportError, export_model
from models.llm.folder import load_folder, save_folder
from tests.unit.causal_folders import tiny_causal_folder

torch.set_num_threads(1)
TEXT = "def add(a, b):\n    return a + b  # <|end|> ünïcode"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {arch: tiny_causal_folder(root / arch, arch, seed=i) for i, arch in enumerate(("llama", "qwen2", "gpt2"))}


def reference_quantization(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric min–max int quantization written out: s = max|w| / ((2^b − 1)/2) per row or per group of `group`
    inputs, q = clamp(round(w/s), −2^(b−1), 2^(b−1) − 1), ŵ = q·s."""
    rows, cols = weight.shape
    size = group or cols
    blocks = weight.reshape(rows, cols // size, size)
    scale = blocks.abs().amax(dim=2, keepdim=True) / ((2**bits - 1) / 2)
    q = torch.clamp(torch.round(blocks / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale).reshape(rows, cols)


def decompressed(folder: Path) -> dict[str, torch.Tensor]:
    """Every module's weight as compressed-tensors' own decompressor gives it back, by module name."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qconfig = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = qconfig.config_groups["group_0"]
    packer = BaseCompressor.get_value_from_registry(qconfig.format)
    tensors = load_file(str(folder / "model.safetensors"))
    modules = {k.rpartition(".")[0] for k in tensors if k.endswith(".weight_packed")}
    out = {}
    for module in modules:
        local = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == module}
        out[module] = packer.decompress(local, scheme)["weight"]
    return out


@pytest.mark.parametrize(("quantization", "bits"), [("int8", 8), ("int4", 4)])
def test_compressed_tensors_decompress_to_an_independent_quantization(folders, tmp_path, quantization, bits):
    source = load_file(str(folders["llama"] / "model.safetensors"))
    out = export_model(folders["llama"], tmp_path, "compressed-tensors", quantization).path
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["ignore"] == ["lm_head"] and weights["num_bits"] == bits and weights["symmetric"]
    group = 32 if quantization == "int4" else 0  # in-features 32 and 64 split into no 128: their largest common one
    assert (weights["strategy"], weights["group_size"]) == (("group", 32) if group else ("channel", None))
    back = decompressed(out)
    linears = {k.removesuffix(".weight") for k in source if k.endswith("proj.weight")}
    assert set(back) == linears and len(linears) == 14
    for module in linears:
        torch.testing.assert_close(back[module], reference_quantization(source[f"{module}.weight"], bits, group))
    stored = load_file(str(out / "model.safetensors"))
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(stored[name], source[name])
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}


def test_an_int8_folder_loads_in_transformers_with_the_logits_of_its_weights(folders, tmp_path):
    out = export_model(folders["llama"], tmp_path, "compressed-tensors", "int8").path
    reference = load_folder(folders["llama"]).model
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name.endswith("proj"):
                module.weight.copy_(reference_quantization(module.weight, 8, 0))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_dense_export_is_a_plain_folder_with_the_same_logits(folders, tmp_path):
    out = export_model(folders["qwen2"], tmp_path, "compressed-tensors", "dense").path
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").read_bytes() == (folders["qwen2"] / "model.safetensors").read_bytes()
    ids = torch.arange(5, 25).unsqueeze(0)
    with torch.no_grad():
        expected = load_folder(folders["qwen2"]).model(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, expected)


def pruned_folder(source: Path, dest: Path, rule: str, claim: str) -> Path:
    """The source model with its projections pruned by `rule` ('2:4', 'unstructured' or 'none'), saved with a
    lineage claiming `claim` as a pruning job's would."""
    lm = load_folder(source)
    with torch.no_grad():
        for name, module in lm.model.named_modules():
            if not name.endswith("proj") or rule == "none":
                continue
            w = module.weight
            if rule == "2:4":
                groups = w.reshape(w.shape[0], -1, 4)
                drop = groups.abs().argsort(dim=2)[..., :2]
                w.copy_(groups.scatter(2, drop, 0.0).reshape(w.shape))
            else:
                w.masked_fill_(w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values, 0.0)
    return save_folder(lm.model, lm.tokenizer, dest, {"method": "squarehead", "params": {"sparsity": claim}})


def test_the_sparsity_recorded_is_what_the_weights_show(folders, tmp_path):
    two_four = pruned_folder(folders["llama"], tmp_path / "24", "2:4", "2:4")
    result = export_model(two_four, tmp_path, "compressed-tensors", "int4")
    sparsity = json.loads((result.path / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["global_sparsity"] == pytest.approx(0.5) and result.notes[-1].startswith("int4 groups of 32")
    for weight in decompressed(result.path).values():  # symmetric codes keep the zeros where they were
        assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=2) <= 2).all()

    loose = pruned_folder(folders["llama"], tmp_path / "half", "unstructured", "0.5")
    dense = export_model(loose, tmp_path, "compressed-tensors", "dense").path
    sparsity = json.loads((dense / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "unstructured" and sparsity["global_sparsity"] >= 0.5

    unpruned = pruned_folder(folders["llama"], tmp_path / "none", "none", "2:4")
    result = export_model(unpruned, tmp_path, "compressed-tensors", "int8")
    assert json.loads((result.path / "config.json").read_text())["quantization_config"]["sparsity_config"] == {}
    assert any("claims 2:4 sparsity" in note for note in result.notes)


def test_gpt2_quantized_compressed_tensors_is_refused_naming_quantization(folders, tmp_path):
    with pytest.raises(ExportError) as caught:
        export_model(folders["gpt2"], tmp_path, "compressed-tensors", "int8")
    assert caught.value.field == "quantization" and "dense" in caught.value.fix
    assert (export_model(folders["gpt2"], tmp_path, "compressed-tensors", "dense").path / "config.json").exists()


# -- GGUF ------------------------------------------------------------------------------------------------------


def gguf_names(blocks: int, biases: bool) -> dict[str, str]:
    """llama.cpp's tensor names for our Llama-layout checkpoint names, written out."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    parts = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(blocks):
        for ours, theirs in parts.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
            if biases and ours[-6:] in ("q_proj", "k_proj", "v_proj"):
                names[f"model.layers.{i}.{ours}.bias"] = f"blk.{i}.{theirs}.bias"
    return names


def pairwise_rows(heads: int, rows: int) -> np.ndarray:
    """For each GGUF row, the row of ours it holds: within a head of d rows, GGUF row 2i + j is our row j·d/2 + i."""
    d = rows // heads
    return np.array([h * d + (r % 2) * (d // 2) + r // 2 for h in range(heads) for r in range(d)])


def ggml_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref then dequantize: per block of 32, d = max|x|/127, q = roundf(x·(1/d)), q·f16(d)."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    v = blocks * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # C's roundf: halves away from zero
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def ggml_q4_0(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_0_ref then dequantize: d = (the signed value of largest magnitude)/−8,
    q = min(15, (int8)(x·(1/d) + 8.5)), (q − 8)·f16(d)."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
    d = signed_max / np.float32(-8)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    q = np.minimum(15, np.trunc(blocks * inv + np.float32(8.5)))
    return ((q - 8) * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def read_back(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], object]:
    """(tensors as float32 in numpy's row-major shape, their GGML types, the reader) of a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    tensors, types = {}, {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        tensors[t.name] = dequantize(t.data, t.tensor_type).reshape(shape)
        types[t.name] = t.tensor_type.name
    return tensors, types, reader


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quantization", ["dense", "int8", "int4"])
def test_gguf_tensors_read_back_equal_ours(folders, tmp_path, arch, quantization):
    source = load_file(str(folders[arch] / "model.safetensors"))
    path = export_model(folders[arch], tmp_path, "gguf", quantization).path
    tensors, types, _ = read_back(path)
    names = gguf_names(2, biases=arch == "qwen2")
    assert set(tensors) == set(names.values())
    for ours, theirs in names.items():
        x = source[ours].numpy()
        if arch == "llama" and "_proj" in ours and ours.split(".")[-2] in ("q_proj", "k_proj"):
            x = x[pairwise_rows(4 if "q_proj" in ours else 2, x.shape[0])]  # 4 query heads, 2 key-value heads
        if x.ndim == 1 or quantization == "dense":
            assert types[theirs] == "F32" and np.array_equal(tensors[theirs], x), theirs
        else:
            reference = ggml_q8_0 if quantization == "int8" else ggml_q4_0
            assert types[theirs] == ("Q8_0" if quantization == "int8" else "Q4_0")
            np.testing.assert_array_equal(tensors[theirs], reference(x), err_msg=theirs)


def field(reader, key: str):
    value = reader.fields[key]
    return value.contents()


def test_gguf_metadata_matches_the_config_and_the_vocabulary_round_trips(folders, tmp_path):
    from gguf import TokenType

    folder = folders["llama"]
    config = json.loads((folder / "config.json").read_text())
    _, _, reader = read_back(export_model(folder, tmp_path, "gguf", "int8").path)
    expected = {
        "general.architecture": "llama",
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": config["head_dim"],
        "llama.vocab_size": config["vocab_size"],
        "general.file_type": 7,  # MOSTLY_Q8_0
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": config["bos_token_id"],
        "tokenizer.ggml.eos_token_id": config["eos_token_id"],
        "tokenizer.ggml.padding_token_id": config["pad_token_id"],
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field(reader, "tokenizer.chat_template") == (folder / "chat_template.jinja").read_text()

    spec = json.loads((folder / "tokenizer.json").read_text())
    tokens, merges = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.merges")
    types = field(reader, "tokenizer.ggml.token_type")
    assert tokens == sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    assert [types[t["id"]] for t in spec["added_tokens"]] == [TokenType.CONTROL] * len(spec["added_tokens"])
    rebuilt = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.decoder = decoders.ByteLevel()
    rebuilt.add_special_tokens([t for t, kind in zip(tokens, types) if kind == TokenType.CONTROL])  # as llama.cpp does
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = rebuilt.encode(TEXT).ids
    assert ids == original.encode(TEXT, add_special_tokens=False).ids
    assert rebuilt.decode(ids, skip_special_tokens=False) == TEXT


def rope(x: np.ndarray, pos: int, pairs: str) -> np.ndarray:
    """Rotary embedding of one head's vector: rotated as halves (Hugging Face's rotate_half: dims i and i + d/2
    form a pair) or as adjacent pairs (llama.cpp's `llama` rope: dims 2i and 2i + 1)."""
    d = x.shape[0]
    theta = pos * 10000.0 ** (-np.arange(d // 2) * 2 / d)
    a, b = (x[: d // 2], x[d // 2 :]) if pairs == "halves" else (x[0::2], x[1::2])
    ra, rb = a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)
    return np.concatenate([ra, rb]) if pairs == "halves" else np.stack([ra, rb], axis=1).reshape(d)


def test_the_gguf_query_rows_make_adjacent_pair_rope_equal_hugging_faces(folders, tmp_path):
    source = load_file(str(folders["llama"] / "model.safetensors"))
    tensors, _, _ = read_back(export_model(folders["llama"], tmp_path, "gguf", "dense").path)
    x = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    for ours, theirs, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        hf = (source[f"model.layers.1.self_attn.{ours}.weight"].numpy() @ x).reshape(heads, -1)
        gg = (tensors[f"blk.1.{theirs}.weight"] @ x).reshape(heads, -1)
        for h in range(heads):  # the same attention scores need the same vectors up to a fixed reordering
            a, b = rope(hf[h], 7, "halves"), rope(gg[h], 7, "pairs")
            d = a.shape[0]
            np.testing.assert_allclose(b, a[[(r % 2) * (d // 2) + r // 2 for r in range(d)]], rtol=1e-5, atol=1e-6)


def test_a_float16_folder_exports_dense_as_f16(folders, tmp_path):
    lm = load_folder(folders["llama"])
    half = save_folder(lm.model.half(), lm.tokenizer, tmp_path / "half")
    tensors, types, reader = read_back(export_model(half, tmp_path, "gguf", "dense").path)
    assert types["blk.0.ffn_up.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert field(reader, "general.file_type") == 1  # MOSTLY_F16
    up = load_file(str(half / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert np.array_equal(tensors["blk.0.ffn_up.weight"], up.float().numpy())


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_gguf_refuses_other_architectures_naming_format(folders, tmp_path, arch):
    folder = folders.get(arch) or tiny_causal_folder(tmp_path / arch, arch)
    with pytest.raises(ExportError) as caught:
        export_model(folder, tmp_path, "gguf", "int8")
    assert caught.value.field == "format" and "llama, mistral, qwen2" in caught.value.message
    assert "compressed-tensors" in caught.value.fix and not list(tmp_path.glob("*.gguf"))
