"""End to end: the real `crucible up` process, real job subprocesses, HTTP only.

Covers the issue's user story: submit over HTTP, watch it finish, fetch metrics, checkpoint and
artifacts; cancel a running job; kill -9 a job process and see the job resume from its checkpoint;
kill the whole server mid-job and see the restarted one re-queue and finish it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FIXTURE_PLUGINS, wait_for

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, env: dict[str, str] | None = None):
        self.home = home
        self.env = env or {}  # on top of the test settings below: another stack's database, executor, …
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> None:
        env = {
            **os.environ,
            "CRUCIBLE_HOME": str(self.home),
            "CRUCIBLE_PLUGINS": FIXTURE_PLUGINS,
            "CRUCIBLE_HEARTBEAT_S": "0.5",
            "CRUCIBLE_LEASE_S": "6",
            "CRUCIBLE_CANCEL_GRACE_S": "2",
            "CRUCIBLE_METRIC_FLUSH_S": "0.3",
            "CRUCIBLE_DEMO_JOB": "false",
            **self.env,
        }
        log = open(self.home.parent / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "up", "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self._await_ready()

    def _await_ready(self) -> None:
        """Healthy, and authorised with the admin key `crucible up` wrote into home (as the CLI does)."""
        wait_for(self._healthy, timeout=90)
        self.key = (self.home / "admin-key").read_text().strip()
        self.http.headers["Authorization"] = f"Bearer {self.key}"

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "server exited during start-up"
        try:
            return self.http.get("/api/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    # -- helpers ---------------------------------------------------------------
    def submit(self, **spec: Any) -> str:
        r = self.http.post("/api/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/api/v1/jobs/{job_id}").json()

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
        return wait_for(lambda: (j := self.job(job_id))["status"] in statuses and j, timeout=timeout)

    def metrics(self, job_id: str, name: str) -> list[tuple[int, float]]:
        items = self.http.get(f"/api/v1/jobs/{job_id}/metrics", params={"name": name, "max_points": 100_000}).json()
        return [(p["step"], p["value"]) for p in items["items"]]


def job_processes(home: Path, job_id: str) -> list[int]:
    """The live process of a job, from the pid file its executor writes under home/run."""
    try:
        pid = int((home / "run" / f"{job_id}.pid").read_text())
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return []
    return [] if state in ("Z", "X") else [pid]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "home")
    srv.home.mkdir()
    srv.start()
    yield srv
    srv.stop()


def test_a_real_method_job_end_to_end(server: Server):
    job_id = server.submit(
        method="ldr", dataset="digits", params={"noise_rate": 0.4, "epochs": 3, "checkpoint_every": 1}
    )
    job = server.wait_status(job_id, TERMINAL, timeout=240)
    assert job["status"] == "succeeded", job["failure"]
    assert job["progress"]["done"] == job["progress"]["total"] > 0
    names = server.http.get(f"/api/v1/jobs/{job_id}/metrics").json()["names"]
    assert any("acc" in n for n in names)
    arts = {a["name"]: a for a in server.http.get(f"/api/v1/jobs/{job_id}/artifacts").json()["items"]}
    assert any(a["kind"] == "checkpoint" for a in arts.values())
    images = [a for a in arts.values() if a["content_type"] == "image/png"]
    assert images, f"no PNG among {list(arts)}"
    png = server.http.get(images[0]["url"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = next(a for a in arts.values() if a["kind"] == "checkpoint")
    assert len(server.http.get(ckpt["url"]).content) == ckpt["size"]


def test_cancel_stops_a_running_job_within_seconds(server: Server):
    job_id = server.submit(method="test-counter", params={"steps": 10_000, "step_seconds": 0.05})
    server.wait_status(job_id, ("running",))
    wait_for(lambda: server.metrics(job_id, "value"))
    assert server.http.post(f"/api/v1/jobs/{job_id}/cancel").json()["status"] == "cancelling"
    job = server.wait_status(job_id, TERMINAL, timeout=30)
    assert job["status"] == "cancelled"
    assert wait_for(lambda: not job_processes(server.home, job_id), timeout=15)
    assert len(server.metrics(job_id, "value")) < 10_000


def test_a_job_that_ignores_cancel_is_killed_after_the_grace_period(server: Server):
    job_id = server.submit(method="test-counter", params={"steps": 10_000, "step_seconds": 0.05, "ignore_cancel": True})
    server.wait_status(job_id, ("running",))
    server.http.post(f"/api/v1/jobs/{job_id}/cancel")
    assert server.wait_status(job_id, TERMINAL, timeout=60)["status"] == "cancelled"


def test_kill_9_of_a_job_process_resumes_from_its_checkpoint(server: Server):
    job_id = server.submit(method="test-counter", params={"steps": 60, "step_seconds": 0.05, "checkpoint_every": 10})
    wait_for(lambda: any(s >= 25 for s, _ in server.metrics(job_id, "value")))
    for pid in job_processes(server.home, job_id):
        os.kill(pid, signal.SIGKILL)
    job = server.wait_status(job_id, TERMINAL, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 2
    result = server.http.get(f"/api/v1/jobs/{job_id}/artifacts/result.json").json()
    assert result["resumed_from"] >= 20 and result["total"] == 60 * 61 / 2
    series = server.metrics(job_id, "value")
    assert [s for s, _ in series] == list(range(1, 61))  # no gap, no duplicate step
    assert all(v == s * (s + 1) / 2 for s, v in series)
    log = server.http.get(f"/api/v1/jobs/{job_id}/logs").json()["text"]
    assert "attempt 2" in log


def test_a_restarted_server_requeues_and_finishes_a_job_left_running(server: Server):
    job_id = server.submit(method="test-counter", params={"steps": 40, "step_seconds": 0.1, "checkpoint_every": 5})
    wait_for(lambda: any(s >= 12 for s, _ in server.metrics(job_id, "value")))
    server.kill()  # as a machine crash would: the server and its job processes die together
    for pid in job_processes(server.home, job_id):
        os.kill(pid, signal.SIGKILL)
    server.start()
    job = server.wait_status(job_id, TERMINAL, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] >= 2
    result = server.http.get(f"/api/v1/jobs/{job_id}/artifacts/result.json").json()
    assert result["resumed_from"] >= 10 and result["total"] == 40 * 41 / 2


def test_cli_submit_follow_shows_progress_and_summary(server: Server):
    # the CLI finds its key where `crucible up` left it (home/admin-key), as on a laptop
    env = {**os.environ, "CRUCIBLE_API_URL": server.url, "CRUCIBLE_HOME": str(server.home), "COLUMNS": "120"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "api.cli",
            "submit",
            "test-counter",
            "-p",
            "steps=8",
            "-p",
            "step_seconds=0.1",
            "--follow",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "succeeded" in out.stdout and "value" in out.stdout and "result.json" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "api.cli", "submit", "test-counter", "-p", "steps=0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "/params/steps" in bad.stderr
