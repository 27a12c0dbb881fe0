"""`GET /api/v1/models/{ref}/export` and `crucible models export` on uploaded tiny folders: a GGUF file and a
compressed-tensors .tar.gz that read back with their own packages, and the problem bodies naming the field at
fault (an unknown model, a GPT-2 asked as GGUF, an unknown format or quantization)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from api.cli import main
from tests.unit.causal_folders import tiny_causal_folder
from tests.unit.service.test_api import problem
from tests.unit.service.test_deployments import import_zip, zip_folder
from tests.unit.service.test_own_models import cli_server  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def zips(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("export-api")
    return {arch: zip_folder(tiny_causal_folder(root / arch, arch)) for arch in ("llama", "gpt2")}


def test_export_streams_a_gguf_file_and_a_compressed_tensors_archive(api, zips, tmp_path):
    import_zip(api, "tiny", zips["llama"])
    r = api.get("/api/v1/models/tiny@1/export", params={"format": "gguf", "quantization": "int8"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == 'attachment; filename="tiny-1-int8.gguf"'
    (tmp_path / "m.gguf").write_bytes(r.content)
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama" and len(reader.tensors) == 21
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}

    r = api.get("/api/v1/models/tiny/export", params={"format": "compressed-tensors", "quantization": "int4"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert r.headers["x-export-notes"].startswith("int4 groups of 32")
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tf:
        names = set(tf.getnames())
        config = json.load(tf.extractfile("tiny-1-int4-compressed-tensors/config.json"))
    assert {
        "tiny-1-int4-compressed-tensors/model.safetensors",
        "tiny-1-int4-compressed-tensors/tokenizer.json",
    } <= names
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4


def test_export_problems_name_the_field_and_the_fix(api, zips):
    import_zip(api, "gpt", zips["gpt2"])
    body = problem(api.get("/api/v1/models/nope@1/export", params={"format": "gguf"}), 404, "/ref")
    assert "no registered model" in body["detail"]
    body = problem(api.get("/api/v1/models/gpt@1/export", params={"format": "gguf"}), 422, "/format")
    assert "llama, mistral, qwen2" in body["detail"] and "compressed-tensors" in body["detail"]
    body = problem(
        api.get("/api/v1/models/gpt@1/export", params={"format": "compressed-tensors", "quantization": "int4"}),
        422,
        "/quantization",
    )
    assert "quantization=dense" in body["detail"]
    problem(api.get("/api/v1/models/gpt@1/export", params={"format": "onnx"}), 422, "/format")
    problem(
        api.get("/api/v1/models/gpt@1/export", params={"format": "gguf", "quantization": "int3"}), 422, "/quantization"
    )
    assert api.get("/api/v1/models/gpt@1/export", params={"format": "compressed-tensors"}).status_code == 200
    assert api.delete("/api/v1/models/gpt/export").status_code == 405  # the resource's, not a version's DELETE


def test_the_export_route_is_documented_with_its_media_types_and_problems(api):
    op = api.get("/openapi.json").json()["paths"]["/api/v1/models/{ref}/export"]["get"]
    assert set(op["responses"]["200"]["content"]) == {"application/gzip", "application/octet-stream"}
    for code in ("404", "422"):
        assert "application/problem+json" in op["responses"][code]["content"]
    params = {p["name"]: p["schema"] for p in op["parameters"]}
    assert params["format"]["enum"] == ["compressed-tensors", "gguf"]
    assert params["quantization"]["enum"] == ["dense", "int8", "int4"]


def test_cli_models_export_writes_the_file(cli_server, zips, tmp_path):  # noqa: F811 - the fixture
    run = CliRunner().invoke
    (tmp_path / "llama.zip").write_bytes(zips["llama"])
    assert run(main, ["models", "upload", "tiny", str(tmp_path / "llama.zip")]).exit_code == 0
    target = tmp_path / "tiny.gguf"
    out = run(main, ["models", "export", "tiny@1", "--format", "gguf", "--quantization", "int4", "-o", str(target)])
    assert out.exit_code == 0 and f"wrote {target}" in out.stdout, out.output
    assert GGUFReader(str(target)).fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0
    out = run(main, ["models", "export", "tiny@9", "--format", "gguf"])
    assert out.exit_code == 1 and "No such model" in out.stderr
