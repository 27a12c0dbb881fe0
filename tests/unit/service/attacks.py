"""Shared pieces of the security tests: clients as a given key, hostile archives, a live server on loopback,
and the harness that checks the server stays responsive while an attack's blocking work is in flight.

Responsiveness is asserted as an ordering, never as a speed: the attack's blocking step is held (a hook
waits on an event) until a health request has completed; if that step ran on the event loop, the health
request could not complete while it is held, and the hook's wait runs out instead.
"""

from __future__ import annotations

import io
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from api.app import create_app
from tests.conftest import make_key
from workers.db import upgrade
from workers.settings import Settings

HOLD_S = 30.0  # how long a held attack waits for the test to let it go (a hang guard, not a speed)
HEALTH_GUARD_S = 20.0  # how long the test waits for health while the attack is held


def as_key(client: TestClient, key: str) -> TestClient:
    client.headers["Authorization"] = f"Bearer {key}"
    return client


@contextmanager
def client_for(settings: Settings, role: str = "admin", project: str = "default") -> Iterator[TestClient]:
    upgrade(settings.database_url)
    with TestClient(create_app(settings, run_executor=False)) as client:
        as_key(client, make_key(settings, project=project, role=role))
        yield client


def model_folder_files() -> dict[str, bytes]:
    """The files of a tiny random Llama folder (config, safetensors, tokenizer): what the import checks accept."""
    import tempfile
    from pathlib import Path

    from tests.unit.causal_folders import tiny_causal_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_causal_folder(Path(tmp) / "m", "llama")
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def model_folder_zip(extra: dict[str, bytes] | None = None, top: str = "tiny") -> bytes:
    files = {**model_folder_files(), **(extra or {})}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{top}/{name}" if top else name, data)
    return buf.getvalue()


def zip_of(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_of(entries: dict[str, bytes | None]) -> bytes:
    """A .tar.gz; a None value is a directory entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def replace_in_zip(blob: bytes, name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, data if info.filename == name else src.read(info))
    return out.getvalue()


class Hold:
    """Wraps a function so its first call waits (where it runs) until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: list[bool] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def held(*args: Any, **kwargs: Any) -> Any:
            if not self.entered.is_set():
                self.entered.set()
                self.released_in_time.append(self.release.wait(HOLD_S))
            return fn(*args, **kwargs)

        return held


def health_answers_while_held(client: TestClient, attack: Callable[[], Any], hold: Hold) -> Any:
    """Run `attack` in a thread; while its blocking step is held, GET /api/v1/health must complete.
    Returns the attack's response once released."""
    with ThreadPoolExecutor(2) as pool:
        attack_future = pool.submit(attack)
        assert hold.entered.wait(HOLD_S), "the attack never reached its blocking step"
        health_future = pool.submit(client.get, "/api/v1/health")
        try:
            health = health_future.result(timeout=HEALTH_GUARD_S)
            in_flight = not attack_future.done()  # still held: health answered while the attack was in flight
        finally:
            hold.release.set()
        assert health.status_code == 200 and in_flight
        response = attack_future.result(timeout=HOLD_S * 4)
    assert hold.released_in_time == [True], "the blocking step ran where health could not answer"
    return response


# -- a live server on loopback (what the in-process client cannot show: chunked bodies, hang-ups) ----------
@contextmanager
def live_server(app: Any) -> Iterator[int]:
    """Uvicorn serving `app` on 127.0.0.1 (a free port), in a thread; yields the port."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the live server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def open_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> socket.socket:
    """A raw HTTP/1.1 request on a fresh loopback connection (the caller reads, or hangs up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=HOLD_S)
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    sock.sendall("\r\n".join(lines).encode() + body)
    return sock


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    """The status code and whatever of the response arrived with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data
