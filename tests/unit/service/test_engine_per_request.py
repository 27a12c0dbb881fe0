"""Per-request engine options (the `engine` extension of the OpenAI routes): a request that asks for a KV cache
or exact attention gets exactly what a deployment configured that way gives, its usage says what ran (the
attention's type and the path its prefill took), a sparse deployment does not recompile per request, and an
option the request cannot set or the model cannot take is a 422 naming `/engine/<field>` before anything runs."""

from __future__ import annotations

import threading

import pytest
import torch

from serving import llm
from serving.engines import validate_engine
from serving.errors import ServingError
from serving.manager import load
from tests.unit.service.test_deployments import deploy, import_zip, tiny_llm_folder

torch.set_num_threads(1)
PROMPT = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
EMS = {"kv_cache": "ems", "kv_cache_options": {"budget": 16}}
HIP = {"attention": "hip", "attention_options": {"top_k": 8, "block_q": 4, "block_k": 2, "sink": 4, "window": 4}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llm_folder(tmp_path_factory.mktemp("per-request") / "m")


def generate(folder, deployment: dict, override: dict | None = None, max_tokens: int = 10):
    loaded = load("llm", folder, validate_engine("llm", deployment, folder))
    p = llm.plan(
        loaded,
        [PROMPT * 2],
        "prompt",
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        n=1,
        stop=None,
        seed=0,
        engine_override=override,
    )
    done = llm.run(loaded, p, threading.Event())
    return done[0].token_ids, llm.usage(p, done), loaded


def test_a_request_asking_for_a_kv_cache_gets_what_such_a_deployment_gives(folder):
    deployed, deployed_usage, _ = generate(folder, EMS)
    asked, asked_usage, loaded = generate(folder, {}, EMS)
    assert asked == deployed and asked_usage["kv_cache"] == deployed_usage["kv_cache"]
    assert asked_usage["kv_cache"]["type"] == "ems" and asked_usage["kv_cache"]["ratio"] < 1
    assert "kv_config" not in loaded.derived  # a request's own ask is not cached on the model
    dense, dense_usage, _ = generate(folder, EMS, {"kv_cache": "none"})  # and a compressed deployment can opt out
    assert dense == generate(folder, {})[0] and dense_usage["kv_cache"]["type"] == "none"


def prefill_logits(loaded) -> torch.Tensor:
    ids = loaded.llm.tokenizer(PROMPT * 2, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return loaded.llm.model(ids).logits


def test_exact_attention_for_one_request_on_a_sparse_deployment(folder, monkeypatch):
    dense = prefill_logits(load("llm", folder, validate_engine("llm", {}, folder)))
    sparse = load("llm", folder, validate_engine("llm", HIP, folder))
    assert not torch.allclose(prefill_logits(sparse), dense, atol=1e-4)  # HiP's top-8 really is sparse here
    with llm.exact_attention(sparse.llm.model):
        assert torch.allclose(prefill_logits(sparse), dense, atol=1e-5)
    assert not torch.allclose(prefill_logits(sparse), dense, atol=1e-4)  # and the deployment's is back
    switched, real = [], llm.exact_attention
    monkeypatch.setattr(llm, "exact_attention", lambda model: switched.append(model) or real(model))
    tokens, usage, loaded = generate(folder, HIP, {"attention": "sdpa"})
    assert switched == [loaded.llm.model]  # the request ran under exact attention
    assert tokens == generate(folder, {})[0] and usage["attention"] == {"type": "sdpa", "path": "sdpa"}
    assert loaded.llm.model.config._attn_implementation.startswith("hip")  # switched back after the request
    assert generate(folder, HIP)[1]["attention"] == {"type": "hip", "path": "flex"}  # FlexAttention prefill


def test_a_sparse_deployment_compiles_once_per_bucket_not_per_request(folder):
    """Prompts of different lengths in one bucket reuse the compiled FlexAttention kernel (the tile shape is the
    config's; the tile count is padded to the bucket's), and decoding stays exact."""
    from models.llm.attention import flex

    loaded = load("llm", folder, validate_engine("llm", HIP, folder))
    compiled = []
    for prompt in (PROMPT, PROMPT * 2, PROMPT[:40]):
        p = llm.plan(loaded, [prompt], "prompt", max_tokens=3, temperature=0.0, top_p=1.0, n=1, stop=None, seed=0)
        done = llm.run(loaded, p, threading.Event())
        assert llm.usage(p, done)["attention"]["path"] == "flex"
        compiled.append(flex.compilations())
    assert compiled[1] == compiled[0] and compiled[2] == compiled[0]


def pointer(folder, deployment: dict, override: dict) -> str:
    loaded = load("llm", folder, validate_engine("llm", deployment, folder))
    with pytest.raises(ServingError) as err:
        llm.plan(
            loaded,
            [PROMPT],
            "prompt",
            max_tokens=4,
            temperature=0.0,
            top_p=1.0,
            n=1,
            stop=None,
            seed=0,
            engine_override=override,
        )
    assert err.value.status == 422
    return err.value.errors[0]["pointer"]


def test_bad_per_request_options_are_422s_naming_the_field(folder):
    assert pointer(folder, {}, {"max_n": 64}) == "/engine/max_n"  # caps belong to the deployment
    assert pointer(folder, {}, {"device": "cuda"}) == "/engine/device"
    assert pointer(folder, {}, {"attention": "hip"}) == "/engine/attention"  # only the deployment's own, or sdpa
    assert pointer(folder, {}, {"kv_cache": "ems"}) == "/engine/kv_cache_options/budget"
    assert (
        pointer(folder, {}, {"kv_cache": "ems", "kv_cache_options": {"budget": 4096}})
        == "/engine/kv_cache_options/budget"
    )  # larger than the model's context
    assert pointer(folder, {}, {"decoding": "ppd"}) == "/engine/decoding"  # no trained prompt tokens


def test_the_openai_route_takes_the_extension(served):
    r = served.post(
        "/v1/completions", json={"model": "chat", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "engine": EMS}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["kv_cache"]["type"] == "ems"
    r = served.post(
        "/v1/completions", json={"model": "chat", "prompt": PROMPT, "max_tokens": 4, "engine": {"dtype": "bfloat16"}}
    )
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/engine/dtype"


@pytest.fixture
def served(api, model_zips):  # noqa: F811
    import_zip(api, "tiny-llm", model_zips["llm"])
    deploy(api, "chat", "tiny-llm")
    return api
