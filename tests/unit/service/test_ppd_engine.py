"""The `decoding: ppd` engine option: checked at creation (a model without trained prompt tokens, or combined
with sparse attention or a compressed KV cache → 422 naming /engine/decoding), exactly greedy decoding's text,
and PPD's forward passes, accepted tokens per step and tree size in the OpenAI `usage` extension; a model whose ppd
job saved acceptance rates is served with a sparse tree sized from latency measured at load."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

from models.llm.parallel_prompt import PROMPTS_FILE, PromptTokens, save_prompts
from models.llm.prompt_tree import TREE_SIZES
from serving import llm
from serving.engines import validate_engine
from serving.manager import load
from tests.unit.service.test_deployments import import_zip, tiny_llm_folder
from tests.unit.service.test_kv_engine import PROMPT, pointer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    plain = tiny_llm_folder(tmp_path_factory.mktemp("ppd") / "m")
    with_prompts = tmp_path_factory.mktemp("ppdp") / "m"
    shutil.copytree(plain, with_prompts)
    model = load("llm", plain, validate_engine("llm", {})).llm.model
    prompts = PromptTokens.initialised(model, 3, seed=0)  # untrained: the text must still be greedy's
    save_file({"embeddings": prompts.embeddings.detach().contiguous()}, str(with_prompts / PROMPTS_FILE))
    return plain, with_prompts


@pytest.fixture(scope="module")
def tree_folder(folders, tmp_path_factory):
    """The prompts plus acceptance rates [m, k], as a ppd job saves them: the engine builds a sparse tree."""
    _, with_prompts = folders
    out = tmp_path_factory.mktemp("ppdt") / "m"
    shutil.copytree(with_prompts, out)
    prompts = PromptTokens.initialised(load("llm", out, validate_engine("llm", {})).llm.model, 3, seed=0)
    save_prompts(out / PROMPTS_FILE, prompts, torch.tensor([[0.4, 0.2, 0.1], [0.3, 0.2, 0.1], [0.2, 0.1, 0.1]]))
    return out


def test_ppd_is_refused_at_creation_where_it_cannot_run(folders):
    plain, with_prompts = folders
    assert pointer({"decoding": "ppd"}, plain) == "/engine/decoding"  # no trained prompt tokens
    assert pointer({"decoding": "ppd", "attention": "hip"}, with_prompts) == "/engine/decoding"
    assert pointer({"decoding": "ppd", "kv_cache": "ems", "kv_cache_options": {"budget": 8}}) == "/engine/decoding"
    assert pointer({"decoding": "beam"}) == "/engine/decoding"
    assert validate_engine("llm", {"decoding": "ppd"}, with_prompts)["decoding"] == "ppd"


def _generate(folder, engine: dict, temperature: float = 0.0):
    loaded = load("llm", folder, validate_engine("llm", engine, folder))
    p = llm.plan(loaded, [PROMPT], "prompt", max_tokens=16, temperature=temperature, top_p=1.0, n=1, stop=None, seed=0)
    done = llm.run(loaded, p, threading.Event())
    return done[0], llm.usage(p, done)


def test_ppd_serves_greedy_decodings_exact_text_and_reports_its_steps(folders):
    _, with_prompts = folders
    greedy, plain_usage = _generate(with_prompts, {})
    ppd, usage = _generate(with_prompts, {"decoding": "ppd"})
    assert ppd.token_ids == greedy.token_ids and ppd.text == greedy.text
    assert plain_usage["decoding"] == {
        "type": "standard",
        "forward_passes": None,
        "accepted_tokens_per_step": None,
        "tree_nodes": None,
    }
    steps = usage["decoding"]
    assert steps["type"] == "ppd" and steps["accepted_tokens_per_step"] >= 1.0
    assert steps["tree_nodes"] == 3  # no acceptance rates in the folder: the chain of the 3 prompt tokens
    # every completion token but the prefill's comes from a decoding forward: passes × mean accepted = tokens − 1
    assert steps["forward_passes"] * steps["accepted_tokens_per_step"] == pytest.approx(
        len(ppd.token_ids) - 1, abs=1e-3
    )


def test_a_model_with_acceptance_rates_is_served_with_a_hardware_sized_tree(tree_folder):
    greedy, _ = _generate(tree_folder, {})
    ppd, usage = _generate(tree_folder, {"decoding": "ppd"})
    assert ppd.token_ids == greedy.token_ids
    steps = usage["decoding"]
    # one of the measured sizes, capped at the 3 + 9 + 27 rank paths three offsets of top-3 allow
    assert steps["tree_nodes"] in {min(n, 39) for n in TREE_SIZES} and steps["accepted_tokens_per_step"] >= 1.0
    assert steps["forward_passes"] * steps["accepted_tokens_per_step"] == pytest.approx(
        len(ppd.token_ids) - 1, abs=1e-3
    )


def test_a_sampled_request_on_a_ppd_deployment_decodes_the_standard_way(folders):
    _, with_prompts = folders
    _, usage = _generate(with_prompts, {"decoding": "ppd"}, temperature=0.8)
    assert usage["decoding"]["type"] == "standard"


def test_creating_a_ppd_deployment_of_a_model_without_prompt_tokens_is_a_422_naming_the_field(api, model_zips):
    """The API checks the model folder at creation (not at the first request)."""
    import_zip(api, "plain", model_zips["llm"])
    r = api.post("/api/v1/deployments", json={"name": "ppd-plain", "model": "plain", "engine": {"decoding": "ppd"}})
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/engine/decoding"
    r = api.post(
        "/api/v1/deployments",
        json={
            "name": "kv-plain",
            "model": "plain",
            "engine": {"kv_cache": "ems", "kv_cache_options": {"budget": 4096}},
        },
    )
    assert r.status_code == 422 and r.json()["errors"][0]["pointer"] == "/engine/kv_cache_options/budget"
