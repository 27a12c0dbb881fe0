"""A user's own models in and out (issue 28): Llama, Qwen2, GPT-NeoX and GPT-2 folders uploaded, deployed and
compared with `transformers.generate`, compressed with EoRA, downloaded and loaded in plain transformers; the
checks at the door (and at job submission) that turn what would fail later into a 422 naming the field;
`tar -C folder -czf m.tar.gz .`, truncated archives, snapshots with pickles beside the safetensors; the CLI's
models commands and its typed `-p`; the plain chat fallback and image sizes said in the response."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForMaskedLM

from api.app import create_app
from api.auth import bootstrap_admin_key
from api.cli import _parse_params, main
from api.jobs import read_log
from models.llm.generation import stop_token_ids
from models.registry import get_method
from tests.unit.causal_folders import ARCHITECTURES, tiny_causal_folder
from tests.unit.service.attacks import live_server
from tests.unit.service.test_api import problem
from tests.unit.service.test_deployments import deploy, import_zip, zip_folder
from workers.db import session_scope
from workers.redact import CODE_ROOT
from workers.runner import run_job
from workers.tables import Job

torch.set_num_threads(1)
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    return {arch: tiny_causal_folder(root / arch, arch, seed=i) for i, arch in enumerate(ARCHITECTURES)}


def tar_dot(folder: Path) -> bytes:
    """What `tar -C folder -czf m.tar.gz .` writes (members `.`, `./config.json`, …)."""
    out = folder.parent / f"{folder.name}.tar.gz"
    if shutil.which("tar"):
        subprocess.run(["tar", "-C", str(folder), "-czf", str(out), "."], check=True)
        return out.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname=".")
    return buf.getvalue()


def upload(api, name: str, blob: bytes, filename: str = "m.tar.gz"):
    return api.post("/api/v1/models", data={"name": name}, files={"file": (filename, blob)})


def greedy_reference(folder: Path, prompt: str, max_tokens: int) -> str:
    """`transformers.generate` (greedy) on the folder, cut where the server stops (end-of-sequence or end-of-turn)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    stops = stop_token_ids(tok)
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    return tok.decode(new, skip_special_tokens=True)


def completion(api, deployment: str, prompt: str = PROMPT, max_tokens: int = 8) -> dict:
    r = api.post(
        "/v1/completions",
        json={"model": deployment, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": 0},
    )
    assert r.status_code == 200, r.text
    return r.json()


# -- the whole way: four architectures in, served as transformers generates, compressed, out again ----------------
def test_four_architectures_upload_deploy_generate_compress_and_download(api, settings, folders, tmp_path):
    for arch, folder in folders.items():
        name = arch.replace("_", "-")
        out = upload(api, name, tar_dot(folder))
        assert out.status_code == 201, out.text
        deploy(api, f"{name}-chat", f"{name}@1")
        served = completion(api, f"{name}-chat")["choices"][0]["text"]
        assert served == greedy_reference(folder, PROMPT, 8), arch

    # EoRA on the GPT-NeoX upload (any decoder stack), run as a job in this process
    job = api.post(
        "/api/v1/jobs",
        json={
            "method": "eora",
            "dataset": "stdlib-code",
            "params": {"model": "gpt-neox@1", "calibration_windows": 2, "seq_len": 32, "eval_windows": 2, "rank": 4},
        },
    )
    assert job.status_code == 201, job.text
    assert run_job(job.json()["id"], settings) == "succeeded", api.get(f"/api/v1/jobs/{job.json()['id']}").json()
    refs = {m["ref"] for m in api.get("/api/v1/models").json()["items"]}
    assert {"gpt-neox-rtn3@1", "gpt-neox-eora-r4@1"} <= refs  # the adapter's base, and the merged model

    # downloaded as a .tar.gz, it loads in plain transformers and computes what the server serves
    r = api.get("/api/v1/models/gpt-neox-eora-r4@1/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert 'filename="gpt-neox-eora-r4-1.tar.gz"' in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tf:
        tf.extractall(tmp_path / "down", filter="data")
    folder = tmp_path / "down" / "gpt-neox-eora-r4-1"
    assert type(AutoModelForCausalLM.from_pretrained(folder)).__name__ == "GPTNeoXForCausalLM"
    adapter = json.loads((folder / "eora-adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "gpt-neox-rtn3@1"
    deploy(api, "eora-chat", "gpt-neox-eora-r4@1")
    assert completion(api, "eora-chat")["choices"][0]["text"] == greedy_reference(folder, PROMPT, 8)
    problem(api.get("/api/v1/models/nothing@1/download"), 404)


# -- defect 2: a job's model is checked at submission ----------------------------------------------------------
def test_a_jobs_model_is_resolved_and_checked_at_submission(api, folders, model_zips):
    assert upload(api, "neox", tar_dot(folders["gpt_neox"])).status_code == 201
    import_zip(api, "pictures", model_zips["diffusion"])

    def submit(method: str, model: str):
        params = {"model": model, "calibration_windows": 2, "seq_len": 32, "eval_windows": 2}
        return api.post("/api/v1/jobs", json={"method": method, "dataset": "stdlib-code", "params": params})

    body = problem(submit("eora", "does-not-exist@1"), 422, "/params/model")
    assert "no registered model" in body["detail"]
    body = problem(submit("eora", "pictures"), 422, "/params/model")
    assert "diffusers model" in body["detail"] and "causal LM" in body["detail"]
    body = problem(submit("pat", "neox@1"), 422, "/params/model")
    assert "Llama layout" in body["detail"] and "pat needs Llama-layout decoders only" in body["detail"]
    assert "Llama-layout decoders only" in get_method("pat").describe()["params"]["properties"]["model"]["description"]
    assert submit("eora", "neox@1").status_code == 201  # EoRA walks any decoder stack

    def bare(method: str, dataset: str):
        return api.post("/api/v1/jobs", json={"method": method, "dataset": dataset, "params": {"model": "neox@1"}})

    for llama_only in ("ems", "matryoshka-kv"):  # their caches patch Llama's self_attn
        problem(bare(llama_only, "stdlib-code"), 422, "/params/model")
    assert bare("ppd", "stdlib-code").status_code == 201  # PPD's prompts and tree attention take any decoder stack
    problem(submit("eora", "/etc"), 422, "/params/model")  # not under an import root


def test_a_failed_job_says_why_without_a_traceback_or_server_paths(settings):
    missing = settings.home / "imports" / "nowhere"
    with session_scope(settings.database_url) as s:
        job = Job(method="eora", dataset="stdlib-code", params={"model": str(missing)}, max_attempts=1)
        s.add(job)
        s.flush()
        job_id = job.id
    assert run_job(job_id, settings) == "failed"
    with session_scope(settings.database_url) as s:
        error = s.get(Job, job_id).error
    assert error.startswith("PermissionError: ") and "…/nowhere" in error
    assert "Traceback" not in error and str(settings.home) not in error and "File " not in error
    with session_scope(settings.database_url) as s:
        log, _, _ = read_log(s, job_id, 0, 1 << 20)
    assert "Traceback" in log and "eora.py" in log  # the owner's log keeps the traceback, without server folders
    assert str(settings.home) not in log and CODE_ROOT not in log


# -- defect 3, defect 6 (archives), gaps: checks at the door, pickles beside safetensors --------------------------
def test_a_tar_of_dot_imports_and_a_truncated_archive_is_called_corrupt(api, folders):
    out = upload(api, "dotted", tar_dot(folders["llama"]))
    assert out.status_code == 201, out.text
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(out.json()["files"])
    whole = zip_folder(folders["llama"])
    for blob, name in ((whole[: len(whole) // 2], "m.zip"), (tar_dot(folders["llama"])[:2000], "m.tar.gz")):
        body = problem(upload(api, "cut", blob, name), 422, "/file")
        assert "corrupt or truncated" in body["detail"]
    problem(upload(api, "junk", b"just some text", "m.zip"), 415)


def test_checks_at_the_door_refuse_what_cannot_be_served(api, folders, tmp_path):
    bert = tmp_path / "bert"
    BertForMaskedLM(
        BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(bert)
    shutil.copy(folders["llama"] / "tokenizer.json", bert)
    body = problem(upload(api, "bert", tar_dot(bert)), 422, "/file")
    assert "encoder" in body["detail"] and "architectures" in body["detail"]

    fancy = shutil.copytree(folders["llama"], tmp_path / "fancy")
    config = json.loads((fancy / "config.json").read_text())
    (fancy / "config.json").write_text(
        json.dumps({**config, "model_type": "my_fancy", "architectures": ["MyFancyForCausalLM"]})
    )
    body = problem(upload(api, "fancy", tar_dot(fancy)), 422, "/file")
    assert "my_fancy" in body["detail"] and "gpt_neox" in body["detail"]  # the list of what is accepted

    wide = shutil.copytree(folders["llama"], tmp_path / "wide")
    (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    body = problem(upload(api, "wide", tar_dot(wide)), 422, "/file")
    assert "do not match config.json" in body["detail"]

    bare = shutil.copytree(folders["gpt2"], tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    body = problem(upload(api, "bare", tar_dot(bare)), 422, "/file")
    assert "tokenizer.json" in body["detail"] and "sentencepiece" not in body["detail"]


def test_a_hub_snapshot_imports_its_safetensors_and_skips_the_pickles(api, folders, tmp_path):
    snapshot = shutil.copytree(folders["qwen2"], tmp_path / "snapshot")
    marker = tmp_path / "pwned"
    (snapshot / "pytorch_model.bin").write_bytes(pickle.dumps(marker))  # never unpickled: never read
    (snapshot / "pytorch_model.bin.index.json").write_text("{}")
    (snapshot / ".gitattributes").write_text("*.bin filter=lfs\n")
    out = upload(api, "snap", tar_dot(snapshot))
    assert out.status_code == 201, out.text
    model = out.json()
    assert not any(f.endswith(".bin") or f.startswith(".") for f in model["files"])
    assert sorted(model["config"]["skipped"]) == [".gitattributes", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    assert "pytorch_model.bin" in model["notes"][0] and "safetensors" in model["notes"][0]
    deploy(api, "snap-chat", "snap@1")


# -- gaps: chat without a template, image sizes ---------------------------------------------------------------
def test_chat_without_a_template_says_it_used_the_plain_fallback(api, folders, tmp_path):
    plain = shutil.copytree(folders["gpt2"], tmp_path / "plain")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((plain / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in tok_config.items() if k != "chat_template"})
    )
    assert upload(api, "plain", tar_dot(plain)).status_code == 201
    deploy(api, "plain-chat", "plain@1")
    r = api.post(
        "/v1/chat/completions",
        json={"model": "plain-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200 and r.headers["x-chat-template"] == "plain-fallback"
    assert r.json()["usage"]["chat_template"] == "plain-fallback"
    assert upload(api, "templated", tar_dot(folders["llama"])).status_code == 201
    deploy(api, "templated-chat", "templated@1")
    r = api.post(
        "/v1/chat/completions",
        json={"model": "templated-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.headers["x-chat-template"] == "model" and r.json()["usage"]["chat_template"] == "model"


def test_a_pixel_space_model_refuses_other_sizes_naming_the_field(api, model_zips):
    import_zip(api, "pixels", model_zips["diffusion"])
    deploy(api, "pixels", "pixels")
    body = problem(api.post("/api/v1/deployments/pixels/images", json={"width": 32, "steps": 1, "seed": 0}), 422)
    assert body["errors"][0]["pointer"] == "/width" and "pixel space" in body["detail"]
    ok = api.post("/api/v1/deployments/pixels/images", json={"width": 16, "height": 16, "steps": 1, "seed": 0})
    assert ok.status_code == 200, ok.text
    body = problem(api.post("/v1/images/generations", json={"model": "pixels", "size": "32x32", "steps": 1}), 422)
    assert body["error"]["param"] == "size"


# -- defect 6 (CLI), gap: the models commands ------------------------------------------------------------------
def test_cli_params_are_read_as_the_schema_types_them():
    schema = get_method("squarehead").describe()["params"]
    parsed = _parse_params(("sparsity=0.5", "steps=3", "lr=1e-3", "model=llama@2"), schema)
    assert parsed == {"sparsity": "0.5", "steps": 3, "lr": 1e-3, "model": "llama@2"}
    assert _parse_params(("sparsity=0.5",)) == {"sparsity": 0.5}  # no schema: JSON as before


@pytest.fixture
def cli_server(settings, monkeypatch) -> Iterator[str]:
    key = bootstrap_admin_key(settings)
    with live_server(create_app(settings, run_executor=False)) as port:
        monkeypatch.setenv("CRUCIBLE_API_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("CRUCIBLE_API_KEY", key)
        yield f"http://127.0.0.1:{port}"


def test_cli_models_upload_list_download_delete(cli_server, folders, tmp_path):
    run = CliRunner().invoke
    out = run(main, ["models", "upload", "gpt2", str(folders["gpt2"])])
    assert out.exit_code == 0 and "registered gpt2@1" in out.stdout, out.output
    listed = run(main, ["models", "--json"])
    assert [m["ref"] for m in json.loads(listed.stdout)] == ["gpt2@1"]
    out = run(main, ["models", "download", "gpt2@1", "--extract", str(tmp_path / "x")])
    assert out.exit_code == 0, out.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "gpt2-1")
    assert type(model).__name__ == "GPT2LMHeadModel"
    archive = tmp_path / "m.tar.gz"
    assert run(main, ["models", "download", "gpt2", "-o", str(archive)]).exit_code == 0 and archive.stat().st_size > 0
    out = run(main, ["models", "delete", "gpt2@1"])
    assert out.exit_code == 0 and "deleted gpt2@1" in out.stdout
    out = run(main, ["models", "download", "gpt2@1", "-o", str(archive)])
    assert out.exit_code == 1 and "No such model" in out.stderr


def test_a_deployment_serves_a_folder_under_an_import_root_as_a_job_can(api, settings, folders, tmp_path):
    local = shutil.copytree(folders["qwen2"], settings.home / "imports" / "qwen")
    deploy(api, "local-qwen", str(local))
    assert completion(api, "local-qwen")["choices"][0]["text"] == greedy_reference(local, PROMPT, 8)
    outside = shutil.copytree(folders["qwen2"], tmp_path / "elsewhere")
    body = problem(api.post("/api/v1/deployments", json={"name": "outside", "model": str(outside)}), 422, "/model")
    assert "import root" in body["detail"]
