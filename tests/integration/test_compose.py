"""docker-compose.yml and docker/ checked by parsing (no Docker engine here; the same services run
for real, without Docker, in the rest of this suite)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers.settings import Settings

REPO = Path(__file__).resolve().parents[2]
yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def dockerfile_stages(path: Path) -> list[str]:
    return re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", path.read_text(), flags=re.M | re.I)


def test_the_stack_has_every_service_with_health_checks_and_named_volumes(compose):
    services = compose["services"]
    assert {"postgres", "redis", "seaweedfs", "api", "worker", "worker-gpu", "ray-head", "ray-worker"} <= set(services)
    for name in ("postgres", "redis", "seaweedfs", "api", "ray-head", "ray-worker"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    declared = set(compose["volumes"])
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in declared, f"{name} mounts {source}, which is not a named volume"
    api_deps = services["api"]["depends_on"]
    assert all(api_deps[s]["condition"] == "service_healthy" for s in ("postgres", "redis", "seaweedfs"))
    assert services["worker-gpu"]["profiles"] == ["gpu"]  # nothing requires a GPU unless asked for


def test_images_are_pinned_and_builds_point_at_multi_stage_non_root_dockerfiles(compose):
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image!r}"
        if "build" in svc:
            dockerfile = REPO / svc["build"]["dockerfile"]
            stages = dockerfile_stages(dockerfile)
            assert len(stages) >= 2, f"{dockerfile} is not multi-stage"
            target = svc["build"].get("target")
            assert target is None or target in stages
            text = dockerfile.read_text()
            assert re.search(r"^USER\s+(?!root)\S+", text, flags=re.M), f"{dockerfile} runs as root"
            assert "torch==2.13.0" in text
            for base in re.findall(r"^ARG \w+_IMAGE=(\S+)", text, flags=re.M):
                assert re.search(r":\d", base), f"{dockerfile}: base image {base} is not pinned"


def test_every_crucible_variable_in_compose_is_a_setting(compose):
    fields = {f"CRUCIBLE_{name.upper()}" for name in Settings.model_fields}
    env = compose["x-crucible-env"]
    unknown = {k for k in env if k.startswith("CRUCIBLE_")} - fields
    assert not unknown, f"compose sets variables Settings does not read: {unknown}"
    assert env["CRUCIBLE_STORAGE_URL"].startswith("s3://") and env["CRUCIBLE_EXECUTOR"].endswith("celery}")
    assert env["CRUCIBLE_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_only_the_api_is_reachable_and_only_from_loopback(compose):
    """Backends sit on an internal network without published ports; Ray keeps token auth and a private dashboard."""
    assert compose["networks"]["backend"]["internal"] is True
    for name, service in compose["services"].items():
        assert "backend" in service["networks"], name
        if name == "api":
            assert all(p.startswith("127.0.0.1:") for p in service["ports"])
        else:
            assert "ports" not in service and "frontend" not in service["networks"], name
    head = compose["services"]["ray-head"]
    assert "--dashboard-host=127.0.0.1" in head["command"]
    assert head["environment"]["RAY_AUTH_TOKEN"]
