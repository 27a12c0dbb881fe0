"""The tiny-LLM kit: tokenizer round trip, HF folder round trip, specific load errors, base-model cache,
and lm-pretrain's contract (resume equals uninterrupted, registration with lineage)."""

from __future__ import annotations

import json

import pytest
import torch

from models.context import InMemoryRunContext
from models.datasets import Dataset, Split, load_builtin
from models.llm import base
from models.llm.data import fixed_windows, random_windows, split_windows, token_stream
from models.llm.evaluation import mean_nll, parameter_bytes, perplexity
from models.llm.folder import (
    MissingConfigError,
    MissingWeightsError,
    ModelFolderError,
    UnsupportedArchitectureError,
    decoder_layers,
    load_folder,
    read_lineage,
    save_folder,
)
from models.llm.model import build_model, llama_config, parameter_count
from models.llm.pretraining import PretrainParams, lr_at
from models.llm.tokenizer import SPECIAL_TOKENS, train_tokenizer
from models.methods.llm.lm_pretrain import LMPretrainParams, run
from tests.unit.resumption import interrupted_and_resumed

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus() -> Dataset:
    ds = load_builtin("stdlib-code")
    return Dataset(
        "stdlib-small",
        "text-corpus",
        {s: Split({"text": list(ds.splits[s]["text"][:6])}) for s in ("train", "val", "test")},
    )


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.train["text"], vocab_size=400)


def tiny_params(**overrides) -> LMPretrainParams:
    return LMPretrainParams(
        **{
            "size": "micro",
            "vocab_size": 400,
            "steps": 6,
            "batch_size": 2,
            "seq_len": 32,
            "warmup_steps": 2,
            "eval_every": 2,
            "eval_windows": 2,
            "checkpoint_every": 2,
            "max_documents": 6,
            **overrides,
        }
    )


def test_tokenizer_round_trips_any_text_and_keeps_special_tokens_whole(tokenizer):
    for text in ["def f(x):\n    return x ** 2\n", "ünïcödé ☃ \t\r\n  tabs", "", "<|endoftext|> literal"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer) == 400
    for special in SPECIAL_TOKENS:
        assert len(tokenizer(special)["input_ids"]) == 1
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_token_stream_joins_documents_with_eos_and_windows_tile_it(tokenizer):
    stream = token_stream(tokenizer, ["a = 1", "b = 2"])
    assert (stream == tokenizer.eos_token_id).sum() == 2 and stream[-1] == tokenizer.eos_token_id
    windows = fixed_windows(torch.arange(10), 3)
    assert windows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    g = torch.Generator().manual_seed(0)
    batch = random_windows(torch.arange(100), 4, 8, g)
    assert batch.shape == (4, 8) and torch.all(batch[:, 1:] - batch[:, :-1] == 1)


def test_split_windows_encode_only_what_they_need(tokenizer, corpus):
    windows = split_windows(tokenizer, corpus.val["text"], 16, 3)
    full = token_stream(tokenizer, corpus.val["text"])
    assert torch.equal(windows.reshape(-1), full[:48])


def test_folder_round_trip_gives_identical_logits(tmp_path, tokenizer):
    model = build_model(llama_config("micro", len(tokenizer)), seed=3)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    save_folder(model, tokenizer, tmp_path / "m", lineage={"parent": "x@1", "method": "test"})
    loaded = load_folder(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    assert loaded.tokenizer.decode(loaded.tokenizer("x = 1")["input_ids"]) == "x = 1"
    assert read_lineage(tmp_path / "m") == {"parent": "x@1", "method": "test"}
    assert len(decoder_layers(loaded.model)) == 2


def test_folder_without_safetensors_or_of_unsupported_architecture_raises_specific_errors(tmp_path, tokenizer):
    with pytest.raises(MissingConfigError):
        load_folder(tmp_path)
    model = build_model(llama_config("micro", len(tokenizer)), seed=0)
    save_folder(model, tokenizer, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(MissingWeightsError, match="pickle") as err:
        load_folder(tmp_path / "m")
    assert err.value.field == "model.safetensors" and isinstance(err.value, ModelFolderError)
    save_folder(model, tokenizer, tmp_path / "enc")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    config |= {"model_type": "bert", "architectures": ["BertModel"]}
    (tmp_path / "enc" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_folder(tmp_path / "enc")
    assert err.value.field == "config.json:architectures"
    with pytest.raises(UnsupportedArchitectureError):
        decoder_layers(torch.nn.Linear(2, 2))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tokenizer):
    model = build_model(llama_config("micro", len(tokenizer)), seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: embeddings are zero too, logits are all 0
    windows = torch.randint(0, len(tokenizer), (3, 20))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(len(tokenizer), rel=1e-5)
    assert mean_nll(model, windows) == pytest.approx(torch.log(torch.tensor(400.0)).item(), rel=1e-6)
    assert parameter_bytes(model) >= 4 * parameter_count(model)


def test_schedule_warms_up_then_decays_to_a_tenth():
    p = tiny_params(steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, p) == pytest.approx(0.1) and lr_at(9, p) == pytest.approx(1.0)
    assert lr_at(100, p) == pytest.approx(0.1) and lr_at(55, p) == pytest.approx(0.55)


def test_seq_len_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="context"):
        PretrainParams(size="micro", seq_len=512)


def test_run_registers_an_hf_folder_with_lineage_and_logs_perplexity(corpus):
    ctx = InMemoryRunContext(dataset=corpus, seed=0)
    run(ctx, tiny_params(model_name="t"))
    assert [s for s, _ in ctx.history("val_ppl")] == [2, 4, 6]
    assert ctx.history("val_ppl")[-1][1] < ctx.history("val_ppl")[0][1] * 1.05
    loaded = load_folder(ctx.load_model("t@1"))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    meta = json.loads((ctx.load_model("t") / "crucible-model.json").read_text())
    assert meta["method"] == "lm-pretrain" and meta["parent"] is None and meta["val_ppl"] > 1
    assert ctx.artifacts["loss.png"][0] == "plot" and ctx.progress_state[:2] == (6, 6)


def test_lm_pretrain_trains_with_any_registered_optimizer_and_reports_its_state_bytes(corpus):
    """FRUGAL at density 0.25 keeps Adam moments for a quarter of each matrix's rank: less state than
    AdamW's two full moments; both runs must learn (the last val perplexity below the first)."""
    state = {}
    for name in ("adamw", "frugal"):
        ctx = InMemoryRunContext(dataset=corpus, seed=0)
        run(ctx, tiny_params(model_name="t", optimizer=name))
        ppl = [v for _, v in ctx.history("val_ppl")]
        assert ppl[-1] < ppl[0]
        state[name] = ctx.history("optimizer_state_bytes")[-1][1]
    assert 0 < state["frugal"] < state["adamw"]


def test_resumed_pretraining_ends_identical_to_an_uninterrupted_one(corpus):
    whole, crashed, resumed = interrupted_and_resumed(run, corpus, tiny_params(), seed=1, stop_after=3)
    assert crashed.load_checkpoint().step == 2 and not crashed.models
    assert resumed.history("train_loss") == whole.history("train_loss")[2:]
    assert resumed.history("val_ppl") == whole.history("val_ppl")[1:]
    a, b = (load_folder(c.load_model("tiny-llama")).model.state_dict() for c in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_base_model_is_trained_once_then_served_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    calls = []
    real = base._train_into
    monkeypatch.setattr(base, "_train_into", lambda *a: calls.append(1) or real(*a))
    first = InMemoryRunContext()
    folder = base.base_model(first, smoke=True)
    assert folder.is_relative_to(tmp_path) and calls == [1]
    assert list(first.models) == [base.base_model_name(smoke=True)]
    again = base.base_model(InMemoryRunContext(), smoke=True)
    assert again == folder and calls == [1]
    # a context where it is registered answers from the registry
    assert base.base_model(first, smoke=True) == first.load_model(base.base_model_name(True))
    assert load_folder(folder).lineage["recipe_key"] == base.recipe_key(base.RECIPES[True])


def test_model_folder_resolves_an_empty_ref_and_the_base_models_names_through_base_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(base, "base_model", lambda ctx, smoke=False: calls.append(smoke) or tmp_path)
    ctx = InMemoryRunContext()
    assert base.model_folder(ctx, base.base_model_name(smoke=True)) == tmp_path
    assert base.model_folder(ctx, base.base_model_name(smoke=False)) == tmp_path
    assert base.model_folder(ctx, "", smoke=True) == tmp_path and calls == [True, False, True]
    assert base.model_folder(ctx, str(tmp_path)) == tmp_path and len(calls) == 3  # a folder is read as it is
    with pytest.raises(KeyError):
        base.model_folder(ctx, "no-such-model")


def test_pretrain_params_fields_are_the_cached_base_models_recipe():
    """The recipe's fields and values are hashed into the base model's cache key (with the Python version): a
    field added to PretrainParams, or a mixin default that leaks into it, would retrain every cached base."""
    assert base.RECIPES[True].model_dump() == {
        "size": "micro",
        "vocab_size": 512,
        "steps": 30,
        "batch_size": 4,
        "seq_len": 64,
        "lr": 3e-3,
        "warmup_steps": 3,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "eval_every": 30,
        "eval_windows": 4,
        "checkpoint_every": 0,
        "max_documents": 20,
        "model_name": "llm-base-micro",
    }
