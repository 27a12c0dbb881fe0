"""Deployments: create/list/get/delete, kind detection, engine validation, 4xx bodies, isolation, images.

The models are built in seconds: a `micro` Llama with random weights and a 300-token BPE tokenizer
(the LLM kit's `save_folder`), and a two-level diffusers U-Net with the diffusion kit's prompt
encoder (`save_parts`), each zipped and imported through `POST /api/v1/models` as a user would.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.diffusion.model import new_parts, save_parts
from models.llm.folder import MissingWeightsError, save_folder
from models.llm.model import build_model, llama_config
from models.llm.tokenizer import train_tokenizer
from serving.manager import load
from tests.conftest import make_key
from tests.unit.service.test_api import problem
from workers.db import session_scope
from workers.storage import LocalStore
from workers.tables import RegisteredModel

torch.set_num_threads(1)
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
    "import os\nprint(os.getcwd())\n",
] * 4


def tiny_llm_folder(dest: Path) -> Path:
    tok = train_tokenizer(CORPUS, vocab_size=300, model_max_length=256, min_frequency=1)
    config = llama_config("micro", len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_folder(build_model(config, seed=0), tok, dest)


def tiny_diffusion_folder(dest: Path, null_prob: float = 0.1) -> Path:
    torch.manual_seed(0)
    save_parts(new_parts(widths=(8, 16), null_prob=null_prob), dest)
    (dest / "model_index.json").write_text(json.dumps({"_class_name": "CrucibleDiffusion"}))
    return dest


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


@pytest.fixture(scope="session")
def model_zips(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("serving-models")
    return {
        "llm": zip_folder(tiny_llm_folder(root / "llm")),
        "diffusion": zip_folder(tiny_diffusion_folder(root / "diffusion")),
        "diffusion-no-null": zip_folder(tiny_diffusion_folder(root / "diffusion-no-null", null_prob=0.0)),
    }


def import_zip(client, name: str, blob: bytes) -> dict:
    r = client.post("/api/v1/models", data={"name": name}, files={"file": (f"{name}.zip", blob)})
    assert r.status_code == 201, r.text
    return r.json()


def deploy(client, name: str, model: str, **engine) -> dict:
    r = client.post("/api/v1/deployments", json={"name": name, "model": model, "engine": engine})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def served(api, model_zips):
    """The admin client with `tiny-llm` deployed as `chat` and `tiny-diff` as `draw`."""
    import_zip(api, "tiny-llm", model_zips["llm"])
    import_zip(api, "tiny-diff", model_zips["diffusion"])
    deploy(api, "chat", "tiny-llm", max_n=3, max_tokens_cap=32)
    deploy(api, "draw", "tiny-diff@1", max_steps=4, max_n=3)
    return api


# -- lifecycle -------------------------------------------------------------------------
def test_create_detects_kind_pins_version_and_lists(served):
    items = {d["name"]: d for d in served.get("/api/v1/deployments").json()["items"]}
    assert items["chat"]["kind"] == "llm" and items["chat"]["model"] == "tiny-llm@1"
    assert items["draw"]["kind"] == "diffusion" and items["draw"]["loaded"]
    assert items["chat"]["engine"]["max_n"] == 3 and items["chat"]["engine"]["dtype"] == "float32"
    one = served.get("/api/v1/deployments/chat")
    assert one.status_code == 200 and one.json()["status"] == "ready"
    actions = [e["action"] for e in served.get("/api/v1/audit").json()["items"]]
    assert actions.count("deployment.create") == 2


def test_duplicate_name_is_409_and_delete_evicts(served):
    r = served.post("/api/v1/deployments", json={"name": "chat", "model": "tiny-llm"})
    assert problem(r, 409)["errors"][0]["pointer"] == "/name"
    manager = served.app.state.deployments
    row_id = served.get("/api/v1/deployments/chat").json()["id"]
    assert row_id in manager.loaded_ids()
    assert served.delete("/api/v1/deployments/chat").status_code == 204
    assert row_id not in manager.loaded_ids()
    problem(served.get("/api/v1/deployments/chat"), 404)
    problem(served.delete("/api/v1/deployments/chat"), 404)
    deploy(served, "chat", "tiny-llm")  # the name is free again


def test_a_restarted_server_loads_the_model_on_first_use(served):
    manager = served.app.state.deployments
    row_id = served.get("/api/v1/deployments/draw").json()["id"]
    manager.evict(row_id)  # as after a restart: the row exists, nothing is warm
    r = served.post("/api/v1/deployments/draw/images", json={"steps": 1, "seed": 1})
    assert r.status_code == 200, r.text
    assert row_id in manager.loaded_ids()


def test_unknown_model_and_bad_reference(api):
    r = api.post("/api/v1/deployments", json={"name": "x1", "model": "nope"})
    assert problem(r, 404)["errors"][0]["pointer"] == "/model"
    r = api.post("/api/v1/deployments", json={"name": "x1", "model": "nope@v2"})
    assert problem(r, 422)["errors"][0]["pointer"] == "/model"
    r = api.post("/api/v1/deployments", json={"name": "X Y", "model": "nope"})
    assert problem(r, 422)["errors"][0]["pointer"] == "/name"


def test_engine_options_are_validated_at_creation(api, model_zips):
    import_zip(api, "tiny-llm", model_zips["llm"])
    r = api.post("/api/v1/deployments", json={"name": "c1", "model": "tiny-llm", "engine": {"max_nn": 2}})
    assert problem(r, 422)["errors"][0]["pointer"] == "/engine/max_nn"
    r = api.post("/api/v1/deployments", json={"name": "c2", "model": "tiny-llm", "engine": {"max_n": 0}})
    assert problem(r, 422)["errors"][0]["pointer"] == "/engine/max_n"
    r = api.post("/api/v1/deployments", json={"name": "c3", "model": "tiny-llm", "engine": {"max_steps": 3}})
    assert problem(r, 422)["errors"][0]["pointer"] == "/engine/max_steps"  # a diffusion option on an LLM
    if not torch.cuda.is_available():
        r = api.post("/api/v1/deployments", json={"name": "c4", "model": "tiny-llm", "engine": {"device": "cuda"}})
        assert problem(r, 422)["errors"][0]["pointer"] == "/engine/device"
    assert api.get("/api/v1/deployments").json()["items"] == []


def test_unsupported_architecture_is_422_naming_the_model(api, settings, tmp_path):
    folder = tiny_llm_folder(tmp_path / "m")  # registered as a job would: the import route refuses it at the door
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    register_folder(settings, "not-causal", folder)
    r = api.post("/api/v1/deployments", json={"name": "bad", "model": "not-causal"})
    body = problem(r, 422)
    assert body["errors"][0]["pointer"] == "/model" and "architectures" in body["detail"]


def register_folder(settings, name: str, folder: Path, project: str = "default") -> None:
    """Register a folder the way a job does (the import route itself refuses folders without safetensors)."""
    store = LocalStore(settings.home / "objects")
    prefix = f"models/{project}/{name}/1"
    manifest = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            stored = store.put_file(f"{prefix}/{p.relative_to(folder).as_posix()}", p)
            manifest[p.relative_to(folder).as_posix()] = {"size": stored.size, "sha256": stored.sha256}
    with session_scope(settings.database_url) as s:
        s.add(RegisteredModel(project=project, name=name, version=1, key=prefix, config={}, files=manifest))


def test_a_folder_without_safetensors_is_422_naming_the_weights(api, settings, tmp_path):
    folder = tiny_llm_folder(tmp_path / "m")
    for p in folder.glob("*.safetensors"):
        p.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MissingWeightsError):
        load("llm", folder, {})
    register_folder(settings, "pickled", folder)
    body = problem(api.post("/api/v1/deployments", json={"name": "p1", "model": "pickled"}), 422)
    assert body["errors"][0]["pointer"] == "/model" and "safetensors" in body["detail"]


def test_another_projects_deployments_answer_404(served, settings):
    served.headers["Authorization"] = f"Bearer {make_key(settings, project='beta')}"
    assert served.get("/api/v1/deployments").json()["items"] == []
    for method, path in (
        ("GET", "/api/v1/deployments/chat"),
        ("DELETE", "/api/v1/deployments/chat"),
        ("POST", "/api/v1/deployments/draw/images"),
    ):
        problem(served.request(method, path, json={} if method == "POST" else None), 404)
    r = served.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    problem(r, 404)
    assert served.get("/v1/models").json()["data"] == []
    # and the other project cannot deploy project default's model either
    problem(served.post("/api/v1/deployments", json={"name": "steal", "model": "tiny-llm"}), 404)


def test_a_viewer_cannot_deploy(served, settings):
    served.headers["Authorization"] = f"Bearer {make_key(settings, role='viewer')}"
    problem(served.post("/api/v1/deployments", json={"name": "v1", "model": "tiny-llm"}), 403)
    assert served.get("/api/v1/deployments/chat").status_code == 200


# -- images ------------------------------------------------------------------------------
def decode(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_images_are_pngs_with_their_seeds_and_reproducible(served):
    body = {
        "prompt": "red bold 3",
        "guidance": "apg",
        "scale": 3,
        "eta": 0,
        "momentum": -0.5,
        "norm_threshold": 5,
        "steps": 2,
        "n": 2,
        "seed": 5,
    }
    r = served.post("/api/v1/deployments/draw/images", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [d["seed"] for d in out["data"]] == [5, 6] and out["guidance"] == "apg" and out["steps"] == 2
    img = decode(out["data"][0])
    assert img.format == "PNG" and img.size == (16, 16)
    again = served.post("/api/v1/deployments/draw/images", json=body).json()
    assert again["data"] == out["data"]
    # image i depends only on its seed: n=1 at seed 6 is the second image above
    single = served.post("/api/v1/deployments/draw/images", json={**body, "n": 1, "seed": 6}).json()
    assert single["data"][0] == out["data"][1]


def test_image_defaults_class_and_openai_alias(served):
    r = served.post("/api/v1/deployments/draw/images", json={"class": 7, "steps": 1, "seed": 0})
    assert r.status_code == 200, r.text
    assert r.json()["guidance"] == "cfg"  # the default when the model has null conditioning
    r = served.post(
        "/v1/images/generations",
        json={"model": "draw", "prompt": "seven", "n": 1, "steps": 1, "size": "16x16", "response_format": "b64_json"},
    )
    assert r.status_code == 200, r.text
    assert decode(r.json()["data"][0]).size == (16, 16)


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({"steps": 5}, "/steps"),
        ({"n": 4}, "/n"),
        ({"sampler": "plms"}, "/sampler"),
        ({"guidance": "none", "negative_prompt": "red"}, "/negative_prompt"),
        ({"prompt": "purple 3"}, "/prompt"),
        ({"prompt": "3", "class": 3}, "/class"),
        ({"guidance": "xyz"}, "/guidance"),
        ({"bogus": 1}, "/bogus"),
    ],
)
def test_bad_image_requests_name_the_parameter(served, body, pointer):
    r = served.post("/api/v1/deployments/draw/images", json={"steps": 1, **body})
    assert problem(r, 422)["errors"][0]["pointer"] == pointer


def test_cfg_on_a_model_without_null_conditioning_is_422(api, model_zips):
    import_zip(api, "no-null", model_zips["diffusion-no-null"])
    deploy(api, "plain", "no-null")
    r = api.post("/api/v1/deployments/plain/images", json={"guidance": "cfg", "steps": 1})
    assert problem(r, 422)["errors"][0]["pointer"] == "/guidance"
    assert api.post("/api/v1/deployments/plain/images", json={"steps": 1}).json()["guidance"] == "none"


def test_kinds_do_not_mix(served):
    problem(served.post("/api/v1/deployments/chat/images", json={}), 404)
    r = served.post("/v1/chat/completions", json={"model": "draw", "messages": [{"role": "user", "content": "x"}]})
    problem(r, 404)
    assert [m["id"] for m in served.get("/v1/models").json()["data"]] == ["chat"]


def test_sparse_attention_is_an_engine_option_checked_at_creation(api, model_zips):
    """HiP / HyperAttention plug in through transformers' AttentionInterface; at a budget covering the
    whole prompt both are exact, so greedy answers equal the dense deployment's."""
    import_zip(api, "tiny-llm", model_zips["llm"])
    r = api.post(
        "/api/v1/deployments",
        json={"name": "s1", "model": "tiny-llm", "engine": {"attention": "hip", "attention_options": {"top_kk": 3}}},
    )
    assert problem(r, 422)["errors"][0]["pointer"] == "/engine/attention_options/top_kk"
    r = api.post(
        "/api/v1/deployments", json={"name": "s1", "model": "tiny-llm", "engine": {"attention_options": {"top_k": 3}}}
    )
    assert problem(r, 422)["errors"][0]["pointer"] == "/engine/attention_options"
    r = api.post("/api/v1/deployments", json={"name": "s1", "model": "tiny-llm", "engine": {"attention": "flash"}})
    assert problem(r, 422)["errors"][0]["pointer"] == "/engine/attention"
    deploy(api, "dense", "tiny-llm")
    deploy(api, "hip", "tiny-llm", attention="hip", attention_options={"top_k": 4096, "block_q": 8, "window": 64})
    deploy(api, "hyper", "tiny-llm", attention="hyperattention", attention_options={"min_seq_len": 4096})
    body = {"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 8, "temperature": 0}
    answers = {}
    for name in ("dense", "hip", "hyper"):
        r = api.post("/v1/chat/completions", json={**body, "model": name})
        assert r.status_code == 200, r.text
        answers[name] = r.json()["choices"][0]["message"]["content"]
    assert answers["hip"] == answers["dense"] == answers["hyper"]
    loaded = api.app.state.deployments
    hip_id = api.get("/api/v1/deployments/hip").json()["id"]
    assert loaded.get(hip_id, lambda: None).llm.model.config._attn_implementation.startswith("hip-")
