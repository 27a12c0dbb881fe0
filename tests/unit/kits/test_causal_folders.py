"""Any causal LM folder transformers' AutoModelForCausalLM builds loads here (GPT-2 and configs without
`architectures` included), the others are refused naming the field and the list; a folder without a usable
tokenizer says which file is missing; and the compression kit walks the decoder stack of Llama, Qwen2,
GPT-NeoX and GPT-2 alike (GPT-2's Conv1D linears included): EoRA is exact at full rank and its peft adapter
gives the merged model's logits on each, and one-shot pruning keeps its pattern."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from models.llm.compression.calibration import block_linears, weight_matrix
from models.llm.compression.oneshot import prune_model, quantize_model
from models.llm.compression.pruning import SparsityPattern
from models.llm.folder import (
    MissingTokenizerError,
    UnsupportedArchitectureError,
    check_causal_config,
    check_folder,
    check_layout,
    decoder_stack,
    load_folder,
)
from models.methods.llm_compression.eora import compensate, peft_adapter
from tests.unit.causal_folders import ARCHITECTURES, tiny_causal_folder

torch.set_num_threads(1)
STACKS = {"llama": "model.layers", "qwen2": "model.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return {arch: tiny_causal_folder(root / arch, arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_loads_and_exposes_its_decoder_stack(folders, arch):
    lm = load_folder(folders[arch])
    stack, layers = decoder_stack(lm.model)
    assert stack == STACKS[arch] and len(layers) == 2
    assert all(block_linears(block) for block in layers)


def test_gpt2_and_a_config_without_architectures_are_accepted(folders, tmp_path):
    config = json.loads((folders["gpt2"] / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and check_causal_config(config) == "GPT2LMHeadModel"
    bare = shutil.copytree(folders["gpt2"], tmp_path / "bare")
    (bare / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    assert check_folder(bare)["model_type"] == "gpt2"
    assert type(load_folder(bare).model).__name__ == "GPT2LMHeadModel"


def test_encoders_and_unknown_types_are_refused_with_the_list():
    with pytest.raises(UnsupportedArchitectureError) as err:
        check_causal_config({"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    assert err.value.field == "config.json:architectures" and "encoder" in str(err.value)
    with pytest.raises(UnsupportedArchitectureError) as err:
        check_causal_config({"model_type": "my_fancy", "architectures": ["MyFancyForCausalLM"]})
    assert err.value.field == "config.json:model_type" and "llama" in err.value.fix and "gpt2" in err.value.fix
    with pytest.raises(UnsupportedArchitectureError):
        check_causal_config({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})
    assert check_causal_config({"model_type": "bert", "is_decoder": True}) == "BertLMHeadModel"


def test_a_missing_tokenizer_file_is_named(folders, tmp_path):
    folder = shutil.copytree(folders["llama"], tmp_path / "no-tokenizer")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(MissingTokenizerError) as err:
        check_folder(folder)
    assert err.value.field == "tokenizer.json" and "no tokenizer.json" in str(err.value)
    (folder / "vocab.json").write_text("{}")
    with pytest.raises(MissingTokenizerError) as err:
        check_folder(folder)
    assert err.value.field == "merges.txt"


def test_llama_layout_is_told_apart_from_any_decoder_stack(folders):
    for arch in ARCHITECTURES:
        config = json.loads((folders[arch] / "config.json").read_text())
        check_layout(config, "decoder-stack")
        if arch in ("llama", "qwen2"):
            check_layout(config, "llama")
        else:
            with pytest.raises(UnsupportedArchitectureError, match="Llama layout"):
                check_layout(config, "llama")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eora_on_every_stack_is_exact_at_full_rank_and_its_adapter_gives_the_merged_logits(folders, arch):
    dense = load_folder(folders[arch]).model
    ids = torch.randint(0, dense.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    compressed = copy.deepcopy(dense)
    quantize_model(compressed, bits=3)
    full = copy.deepcopy(compressed)
    compensate(full, dense, ids, rank=1000, kind="eora")
    for (name, p), q in zip(full.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-5, msg=name)
    merged = copy.deepcopy(compressed)
    result = compensate(merged, dense, ids, rank=4, kind="eora")
    adapter = peft_adapter(compressed, result.factors, rank=4, base="tiny-rtn3@1")
    assert adapter.peft_config["default"].base_model_name_or_path == "tiny-rtn3@1"
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_shot_pruning_keeps_two_of_four_along_the_input_of_every_linear(folders, arch):
    model = load_folder(folders[arch]).model
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    masks = prune_model(model, ids, SparsityPattern.parse("2:4"), "wanda")
    modules = dict(model.named_modules())
    assert masks and all(name.startswith(STACKS[arch] + ".") for name in masks)
    for name, keep in masks.items():
        weight = weight_matrix(modules[name])
        assert keep.shape == weight.shape
        assert torch.all(keep.reshape(weight.shape[0], -1, 4).sum(-1) == 2)
        assert torch.all(weight[~keep.bool()] == 0)
