"""The `kv_cache` engine option (none | ems | matryoshka-kv): checked at creation (4xx naming the field), served
through the unchanged generation loop, and reported as KV bytes in the OpenAI `usage` extension."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from models.llm.kv_cache.matryoshka import save_projection
from models.llm.kv_cache.matryoshka_training import calibrate
from serving import llm
from serving.engines import validate_engine
from serving.errors import ServingError
from serving.manager import load
from tests.unit.service.test_deployments import deploy, import_zip, tiny_llm_folder

torch.set_num_threads(1)
PROMPT = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llm_folder(tmp_path_factory.mktemp("kv") / "m")


@pytest.fixture(scope="module")
def projected_folder(folder, tmp_path_factory):
    """The same model with a PCA projection and a rank table for fraction 0.5 (as a matryoshka-kv job writes)."""
    out = tmp_path_factory.mktemp("kvp") / "m"
    shutil.copytree(folder, out)
    lm = load("llm", out, validate_engine("llm", {})).llm
    ids = lm.tokenizer(PROMPT * 3, return_tensors="pt")["input_ids"][:, :64]
    projection = calibrate(lm.model, ids)
    save_projection(out, projection, {"0.5": (torch.full((2, 2), 16), torch.full((2, 2), 16))})
    return out


def pointer(options: dict, folder=None) -> str:
    with pytest.raises(ServingError) as err:
        validate_engine("llm", options, folder)
    assert err.value.status == 422
    return err.value.errors[0]["pointer"]


def test_bad_kv_cache_options_fail_at_creation_naming_the_field(folder, projected_folder):
    assert pointer({"kv_cache": "lru"}) == "/engine/kv_cache"
    assert pointer({"kv_cache_options": {"budget": 8}}) == "/engine/kv_cache_options"
    assert pointer({"kv_cache": "ems"}) == "/engine/kv_cache_options/budget"
    assert (
        pointer({"kv_cache": "ems", "kv_cache_options": {"budget": 8, "windw": 4}}) == "/engine/kv_cache_options/windw"
    )
    assert pointer({"kv_cache": "ems", "kv_cache_options": {"budget": 0}}) == "/engine/kv_cache_options/budget"
    assert (
        pointer({"kv_cache": "ems", "kv_cache_options": {"budget": 4096}}, folder) == "/engine/kv_cache_options/budget"
    )  # larger than the model's 256-token context
    assert pointer({"kv_cache": "matryoshka-kv", "attention": "hip"}) == "/engine/kv_cache"
    assert pointer({"kv_cache": "matryoshka-kv"}, folder) == "/engine/kv_cache"  # no trained projection
    assert (
        pointer({"kv_cache": "matryoshka-kv", "kv_cache_options": {"fraction": 0.25}}, projected_folder)
        == "/engine/kv_cache_options/fraction"
    )
    assert (
        pointer({"kv_cache": "matryoshka-kv", "kv_cache_options": {"rank": 64}}, projected_folder)
        == "/engine/kv_cache_options/rank"
    )
    ok = validate_engine("llm", {"kv_cache": "ems", "kv_cache_options": {"budget": 16}}, folder)
    assert ok["kv_cache"] == "ems" and ok["kv_cache_options"] == {"budget": 16}
    assert (
        validate_engine("llm", {"kv_cache": "matryoshka-kv", "kv_cache_options": {"fraction": 0.5}}, projected_folder)[
            "kv_cache"
        ]
        == "matryoshka-kv"
    )


def generate(folder, engine: dict, max_tokens: int = 12):
    loaded = load("llm", folder, validate_engine("llm", engine, folder))
    p = llm.plan(loaded, [PROMPT], "prompt", max_tokens=max_tokens, temperature=0.0, top_p=1.0, n=1, stop=None, seed=0)
    done = llm.run(loaded, p, threading.Event())
    return done[0].token_ids, llm.usage(p, done)


def test_dense_engine_reports_the_dense_kv_bytes(folder):
    tokens, usage = generate(folder, {})
    kv = usage["kv_cache"]
    # exactly 1: the dense size counts the tokens the cache holds (the last generated token is never fed back)
    assert kv["type"] == "none" and kv["bytes"] > 0 and kv["ratio"] == 1.0 and kv["bytes"] == kv["dense_bytes"]


def test_ems_engine_holds_fewer_bytes_and_equals_dense_when_the_budget_covers_the_prompt(folder):
    dense, _ = generate(folder, {})
    same, usage_big = generate(folder, {"kv_cache": "ems", "kv_cache_options": {"budget": 200}})
    assert same == dense and usage_big["kv_cache"]["ratio"] == 1.0
    _, usage = generate(folder, {"kv_cache": "ems", "kv_cache_options": {"budget": 8, "window": 4}})
    kv = usage["kv_cache"]
    assert kv["type"] == "ems" and kv["bytes"] < kv["dense_bytes"] and kv["ratio"] < 0.7


def test_matryoshka_engine_at_full_rank_equals_dense_and_halves_bytes_at_fraction_half(projected_folder):
    dense, _ = generate(projected_folder, {})
    full, usage_full = generate(projected_folder, {"kv_cache": "matryoshka-kv"})
    assert full == dense and usage_full["kv_cache"]["ratio"] == 1.0
    _, usage = generate(projected_folder, {"kv_cache": "matryoshka-kv", "kv_cache_options": {"fraction": 0.5}})
    assert usage["kv_cache"]["ratio"] == pytest.approx(0.5, abs=0.03)


def test_openai_completion_usage_carries_the_kv_extension(api, model_zips):  # noqa: F811
    import_zip(api, "tiny-llm", model_zips["llm"])
    deploy(api, "squeezed", "tiny-llm", kv_cache="ems", kv_cache_options={"budget": 4, "window": 2})
    r = api.post("/v1/completions", json={"model": "squeezed", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    kv = r.json()["usage"]["kv_cache"]
    assert kv["type"] == "ems" and 0 < kv["bytes"] < kv["dense_bytes"]
