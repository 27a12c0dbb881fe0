"""Chaos soak: checkpointing jobs on the real stack while its parts are killed and restarted at random.

    .venv/bin/python bench/chaos.py                          # ~10 min of faults, 30 jobs, >= 50 faults
    .venv/bin/python bench/chaos.py --minutes 2 --jobs 8     # a short run while developing

It starts a private stack of its own (scripts/setup/services.sh with other ports and a temporary
folder: Postgres, Redis, SeaweedFS), because it restarts and kills those servers and must not touch
the ones another test run on this machine uses; then the API (`crucible up`), two `crucible worker`
processes and a local Ray head. Everything listens on 127.0.0.1 only, every loop is bounded in count
and time, and everything it started is stopped at the end.

The settings name one executor, so the jobs run in two phases: the Celery phase (API + 2 workers),
then the Ray phase (API as the Ray driver on a local `ray start --head`), each with its share of the
jobs and of the minutes. Submissions go through `POST /api/v1/jobs` with an Idempotency-Key and are
retried while the API is down. Faults, one at a time at random intervals: kill -9 of a worker or of a
job process, SIGTERM of a worker (a replacement worker starts at once, as a supervisor would start
one), a Postgres restart, the S3 gateway down for 2-6 s, an API restart (kill -9, then start).

Then it checks every job from the database and the store:

- lost: not terminal, or failed for another reason than its own error (a job asked to fail must
  fail with its own exception, not with a worker-lost one);
- duplicated: a job that ran to its end twice (test-counter registers a model version per
  completion: `completions`), or a metric step last written by an older attempt than an earlier step
  (a superseded attempt that kept writing after the next one started);
- bad series: a finished counter whose `value` series has a gap, a repeat or a wrong running total;
- corrupt: a stored object whose bytes fail the sha256 of its row (checkpoints also fail to decode),
  or a row whose object is missing; orphaned: an object under jobs/ or models/ that no row names;
- recovery: seconds from the end of the last fault to every job terminal.

Figures go to bench/results/chaos.json (fault counts by kind, seed, durations, load, machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from tests.e2e.test_server import Server, free_port  # noqa: E402
from tests.integration.stack import (  # noqa: E402
    STACK_HOMES,
    CeleryWorker,
    Services,
    Weed,
    alive,
    api_server,
    completions,
    job_processes,
    parent_of,
    read_services,
    restart_postgres,
    series_problems,
    stack,
)
from workers.settings import Settings  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")
FAULTS = ("kill9_worker", "kill9_job", "sigterm_worker", "restart_postgres", "s3_down", "restart_api")
# private ports (the shared stack of `make test` uses 35432, 36379, 38333, 39333, 38080, 38888)
PORTS = {
    "CRUCIBLE_TEST_PG_PORT": 35532,
    "CRUCIBLE_TEST_REDIS_PORT": 36479,
    "CRUCIBLE_TEST_S3_PORT": 38433,
    "CRUCIBLE_TEST_WEED_MASTER_PORT": 39433,
    "CRUCIBLE_TEST_WEED_VOLUME_PORT": 38180,
    "CRUCIBLE_TEST_WEED_FILER_PORT": 38988,
}


def note(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_quiet(limit_s: float, below: float) -> dict[str, Any]:
    """Wait (a minute at a time, at most `limit_s`) for the 1-minute load average to fall below `below`,
    so the soak neither distorts another benchmark on a shared machine nor is slowed by one. It runs
    anyway when the machine never quiets down; the JSON says how it went."""
    started = time.monotonic()
    while load() >= below and time.monotonic() - started < limit_s:
        note(f"load {load():.2f} >= {below}: waiting for a quieter machine")
        time.sleep(min(60.0, max(1.0, limit_s - (time.monotonic() - started))))
    return {"waited_s": round(time.monotonic() - started), "below": below, "quiet": load() < below}


# -- the private stack ----------------------------------------------------------------------------
@contextmanager
def private_services(root: Path) -> Iterator[Services]:
    """scripts/setup/services.sh on private ports under `root`; every server stopped afterwards."""
    env = {**os.environ, "CRUCIBLE_TEST_SERVICES_DIR": str(root), **{k: str(v) for k, v in PORTS.items()}}
    subprocess.run(["bash", "scripts/setup/services.sh"], cwd=REPO, env=env, check=True, stdout=sys.stderr)
    services = read_services(root / "services.env")
    try:
        if services.get("CRUCIBLE_SERVICES_MISSING"):
            raise SystemExit(f"services unavailable: {services['CRUCIBLE_SERVICES_MISSING']}")
        os.environ.setdefault("AWS_ACCESS_KEY_ID", services["AWS_ACCESS_KEY_ID"])
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", services["AWS_SECRET_ACCESS_KEY"])
        yield services
    finally:
        stop_services(root, services)


def stop_services(root: Path, services: Services) -> None:
    """Stop what scripts/setup/services.sh started under `root` (by its pid files and data folder only)."""
    if "CRUCIBLE_TEST_PG_BIN" in services:
        as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        pg_ctl = str(Path(services["CRUCIBLE_TEST_PG_BIN"]) / "pg_ctl")
        data = services["CRUCIBLE_TEST_PG_DATA"]
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
    for pid_file in (root / "services/redis/redis.pid", root / "services/weed/s3.pid", root / "services/weed/weed.pid"):
        with suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


class RayHead:
    """A local `ray start --head --block` (its own session and temp folder, stopped by its group only:
    never `ray stop`, which would stop every Ray on the machine)."""

    def __init__(self, tmp: Path, cpus: int):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(tmp / "ray-head.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                f"--num-cpus={cpus}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={tmp / 'ray'}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"ray head did not start (see {tmp / 'ray-head.log'})")
            time.sleep(1)

    def _answers(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# -- jobs -----------------------------------------------------------------------------------------
@dataclass
class Planned:
    """A job to submit: its body, its Idempotency-Key (kept across retries) and how it should end."""

    kind: str
    body: dict[str, Any]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    job_id: str | None = None
    submit_tries: int = 0
    expect: str = "succeeded"
    phase: str = "celery"


def plan_jobs(rng: random.Random, n: int, seconds_each: float, phase: str, real: bool) -> list[Planned]:
    """Mixed checkpointing jobs: long counters (checkpoint every 5-10 steps), quick ones that checkpoint
    every other step (most exposed to S3 and Postgres faults), metric-heavy ones, two that fail on
    purpose at a step (they must still end `failed` with their own error), and `ldr` on digits."""
    jobs = []
    for i in range(n):
        roll = i % 10
        if real and i == 3:
            body = {
                "method": "ldr",
                "dataset": "digits",
                "params": {"noise_rate": 0.4, "epochs": 3, "checkpoint_every": 1},
            }
            jobs.append(Planned("ldr", body, phase=phase))
            continue
        if roll in (4, 9) and i < 10:  # two of the first ten: their own error
            steps = rng.randint(30, 60)
            params = {"steps": steps, "step_seconds": 0.1, "checkpoint_every": 5, "fail_at": rng.randint(10, steps)}
            jobs.append(
                Planned("counter-fails", {"method": "test-counter", "params": params}, expect="failed", phase=phase)
            )
            continue
        if roll in (1, 6):
            step_s, every, kind, extra = 0.05, 2, "counter-quick", {}
        elif roll == 7:
            step_s, every, kind, extra = 0.1, 5, "counter-metrics", {"points_per_step": 20}
        else:
            step_s, every, kind, extra = 0.2, rng.randint(5, 10), "counter-long", {}
        steps = max(10, int(seconds_each * rng.uniform(0.6, 1.4) / step_s))
        params = {"steps": steps, "step_seconds": step_s, "checkpoint_every": every, **extra}
        jobs.append(Planned(kind, {"method": "test-counter", "params": params}, phase=phase))
    rng.shuffle(jobs)
    return jobs


class Soak:
    """The running stack of one soak and what was done to it: the parts it can kill and restart (API,
    workers, Ray head, S3 gateway, Postgres), the jobs submitted and the faults injected, in order."""

    def __init__(self, settings: Settings, services: Services, tmp: Path, rng: random.Random):
        self.settings, self.services, self.tmp, self.rng = settings, services, tmp, rng
        self.weed = Weed(services)
        self.server: Server | None = None
        self.executor = "celery"
        self.workers: list[CeleryWorker] = []
        self.retired: list[CeleryWorker] = []  # sent SIGTERM, shutting down
        self.worker_seq = 0
        self.ray: RayHead | None = None
        self.jobs: list[Planned] = []
        self.faults: list[dict[str, Any]] = []
        self.loads: list[float] = []

    # -- parts --
    def start_api(self) -> None:
        home = self.tmp / f"api-{self.executor}"
        self.server = api_server(self.settings_for_phase(), home, executor=self.executor)
        if home not in STACK_HOMES:
            STACK_HOMES.append(home)  # Ray tasks run with the driver's settings: their pid files are here

    def settings_for_phase(self) -> Settings:
        if self.executor == "ray":
            assert self.ray is not None
            return self.settings.model_copy(update={"executor": "ray", "ray_address": self.ray.address})
        return self.settings

    def start_worker(self) -> CeleryWorker:
        self.worker_seq += 1
        w = CeleryWorker(self.settings, f"w{self.worker_seq}", self.tmp)
        self.workers.append(w)
        return w

    def stop_everything(self) -> None:
        if self.server is not None:
            self.server.stop()
        for w in self.workers + self.retired:
            w.stop(signal.SIGTERM if w.alive() else signal.SIGKILL, timeout=60)
        self.workers, self.retired = [], []
        if self.ray is not None:
            self.ray.stop()
            self.ray = None

    # -- submissions --
    def submit(self, job: Planned, deadline: float) -> None:
        """POST with the job's Idempotency-Key until it is accepted: a retry after the API died mid-request
        must name the same job, never make a second one."""
        while time.monotonic() < deadline:
            job.submit_tries += 1
            assert self.server is not None
            try:
                r = httpx.post(
                    f"{self.server.url}/api/v1/jobs",
                    json=job.body,
                    headers={"Authorization": f"Bearer {self.server.key}", "Idempotency-Key": job.key},
                    timeout=30,
                )
                if r.status_code == 201:
                    job_id = r.json()["id"]
                    if job.job_id not in (None, job_id):
                        raise AssertionError(f"key {job.key} named {job.job_id} and then {job_id}")
                    job.job_id = job_id
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"could not submit {job.kind} within its deadline")

    def submitter(self, jobs: list[Planned], window_s: float, slots: int) -> threading.Thread:
        """The first `slots` jobs at once, the rest at random times over the first half of the window."""
        start = time.monotonic()
        at = sorted([0.0] * min(slots, len(jobs)) + [self.rng.uniform(0, 0.5 * window_s) for _ in jobs[slots:]])

        def run() -> None:
            for job, t in zip(jobs, at, strict=True):
                time.sleep(max(0.0, start + t - time.monotonic()))
                self.submit(job, deadline=start + window_s + 300)
                self.jobs.append(job)

        thread = threading.Thread(target=run, name="submitter", daemon=True)
        thread.start()
        return thread

    # -- faults --
    def running_jobs(self) -> list[tuple[str, int]]:
        return [(j.job_id, pid) for j in list(self.jobs) if j.job_id for pid in job_processes(j.job_id)]

    def inject(self, kind: str) -> dict[str, Any] | None:
        """One fault, over when the broken part is back; None when it has nothing to hit now."""
        started = time.monotonic()
        detail: dict[str, Any] = {}
        running = self.running_jobs()
        if kind in ("kill9_job", "kill9_worker", "sigterm_worker") and not running:
            return None
        if kind == "kill9_job":
            job_id, pid = self.rng.choice(running)
            os.kill(pid, signal.SIGKILL)
            detail = {"job": job_id}
        elif kind in ("kill9_worker", "sigterm_worker"):
            job_id, pid = self.rng.choice(running)
            sig = signal.SIGKILL if kind == "kill9_worker" else signal.SIGTERM
            if self.executor == "celery":
                # the worker that runs this job: the job's fork server's parent
                owner = parent_of(parent_of(pid) or 0)
                worker = next((w for w in self.workers if w.proc.pid == owner), None)
                if worker is None:
                    return None
                self.workers.remove(worker)
                worker.proc.send_signal(sig)
                if sig == signal.SIGKILL:
                    worker.proc.wait()
                    worker.log.close()
                else:
                    self.retired.append(worker)  # it re-queues its job and leaves once the job stopped
                self.start_worker()  # as systemd or Kubernetes would replace it
                detail = {"job": job_id, "worker": worker.name}
            else:
                ray_worker = parent_of(parent_of(pid) or 0)
                if not ray_worker or "ray" not in Path(f"/proc/{ray_worker}/cmdline").read_bytes().decode(
                    errors="replace"
                ):
                    return None
                os.kill(ray_worker, sig)
                detail = {"job": job_id, "ray_worker_pid": ray_worker}
        elif kind == "restart_postgres":
            detail = {"restart_s": round(restart_postgres(self.services), 2)}
        elif kind == "s3_down":
            down = self.rng.uniform(2, 6)
            self.weed.stop()
            time.sleep(down)
            self.weed.start()
            detail = {"down_s": round(down, 1)}
        elif kind == "restart_api":
            assert self.server is not None
            self.server.kill()
            time.sleep(self.rng.uniform(0.5, 2))
            self.server.start()
        return {
            "kind": kind,
            "phase": self.executor,
            "at": time.time(),
            "took_s": round(time.monotonic() - started, 2),
            **detail,
        }

    def reap_retired(self) -> None:
        for w in list(self.retired):
            if not w.alive():
                w.stop()
                self.retired.remove(w)

    def fault_loop(self, window_s: float, n_faults: int) -> float:
        """`n_faults` faults at planned times, one in each of n equal slices of the window (at a random point
        of its middle 60%), of a kind drawn uniformly among those that have something to hit; a fault that
        overran its slice (an API restart takes seconds) delays the next one rather than dropping it.
        Returns when the last one ended."""
        start = time.monotonic()
        slice_s = window_s / n_faults
        last_end = start
        for i in range(n_faults):
            time.sleep(max(0.0, start + (i + self.rng.uniform(0.2, 0.8)) * slice_s - time.monotonic()))
            self.reap_retired()
            kinds = list(FAULTS)
            self.rng.shuffle(kinds)
            for kind in kinds:
                try:
                    fault = self.inject(kind)
                except Exception as exc:  # a fault that broke the bench itself is reported, not hidden
                    fault = {"kind": kind, "phase": self.executor, "at": time.time(), "error": repr(exc)}
                if fault is not None:
                    self.faults.append(fault)
                    self.loads.append(load())
                    note(f"fault {len(self.faults)}: {fault}")
                    last_end = time.monotonic()
                    break
        return last_end

    # -- settling --
    def states(self) -> dict[str, Any]:
        from sqlalchemy import select
        from sqlalchemy.exc import OperationalError

        from workers.db import session_scope
        from workers.tables import Job

        ids = [j.job_id for j in self.jobs if j.job_id]
        for _ in range(30):
            try:
                with session_scope(self.settings.database_url) as s:
                    return {r.id: r for r in s.execute(select(Job).where(Job.id.in_(ids))).scalars()}
            except OperationalError:
                time.sleep(1)
        raise RuntimeError("database unreachable")

    def wait_terminal(self, timeout_s: float) -> float | None:
        """Seconds until every submitted job is terminal, or None if some still are not after timeout_s."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            self.reap_retired()
            rows = self.states()
            if len(rows) == len(self.jobs) and all(r.status in TERMINAL for r in rows.values()):
                return time.monotonic() - started
            time.sleep(1)
        return None

    def run_phase(
        self, executor: str, jobs: list[Planned], window_s: float, n_faults: int, settle_s: float
    ) -> dict[str, Any]:
        self.executor = executor
        if executor == "celery":
            self.start_worker()
            self.start_worker()
            slots = 2
        else:
            self.ray = RayHead(self.tmp, cpus=2)
            slots = 2
        self.start_api()
        note(f"{executor} phase: {len(jobs)} jobs, {window_s:.0f} s of faults, about {n_faults} of them")
        first = len(self.faults)
        started = time.monotonic()
        submitter = self.submitter(jobs, window_s, slots)
        last_fault_end = self.fault_loop(window_s, n_faults)
        submitter.join()
        window = time.monotonic() - started
        while len(self.workers) < 2 and executor == "celery":
            self.start_worker()
        note(f"{executor} phase: faults over; waiting for every job to end")
        waited = self.wait_terminal(settle_s)
        recovery = None if waited is None else time.monotonic() - last_fault_end
        phase = {
            "executor": executor,
            "jobs": len(jobs),
            "window_s": round(window, 1),
            "faults": len(self.faults) - first,
            "recovery_s": None if recovery is None else round(recovery, 1),
            "settled": waited is not None,
        }
        # the next phase runs on another executor: the workers (which also dispatch) and the API leave
        self.stop_everything()
        return phase


# -- checks ---------------------------------------------------------------------------------------
def attempt_regressions(points: list[tuple[str, int]]) -> int:
    """Steps (in step order within each metric) last written by an older attempt than the step before:
    a resumed attempt rewrites every step after its checkpoint, so only an attempt that kept writing
    after its successor started can leave one."""
    return sum(1 for (n1, a1), (n2, a2) in zip(points, points[1:], strict=False) if n1 == n2 and a2 < a1)


def check(soak: Soak) -> dict[str, Any]:
    from sqlalchemy import select

    from models.checkpoint import decode_checkpoint
    from workers.db import session_scope
    from workers.storage import ObjectNotFound, open_store
    from workers.tables import Artifact, Metric, RegisteredModel

    settings = soak.settings
    store = open_store(settings.storage_url, settings.s3_endpoint, settings.s3_region)
    rows = soak.states()
    hits: dict[str, list[str]] = {}
    for f in soak.faults:
        if "job" in f:
            hits.setdefault(f["job"], []).append(f["kind"])
    lost, duplicated, bad_series, per_job = [], [], [], []
    with session_scope(settings.database_url) as s:
        for job in soak.jobs:
            row = rows[job.job_id]
            info = {
                "id": job.job_id,
                "kind": job.kind,
                "phase": job.phase,
                "status": row.status,
                "attempt": row.attempt,
                "failure_code": row.failure_code,
                "hit_by": hits.get(job.job_id, []),  # the faults aimed at this job (others hit every job)
            }
            own_error = (
                job.expect == "failed" and row.failure_code == "exception" and "asked to fail" in (row.error or "")
            )
            if row.status not in TERMINAL or (row.status != job.expect) or (job.expect == "failed" and not own_error):
                lost.append({**info, "error": (row.error or "")[:300]})
            runs = completions(settings, job.job_id)
            points = s.execute(
                select(Metric.name, Metric.step, Metric.attempt, Metric.value)
                .where(Metric.job_id == job.job_id)
                .order_by(Metric.name, Metric.step)
            ).all()
            regressions = attempt_regressions([(p.name, p.attempt) for p in points])
            if runs > 1 or regressions:
                duplicated.append({**info, "completions": runs, "attempt_regressions": regressions})
            if job.body["method"] == "test-counter" and row.status == "succeeded":
                series = [(p.step, p.value) for p in points if p.name == "value"]
                problems = series_problems(series, job.body["params"]["steps"])
                if problems:
                    bad_series.append({**info, "problems": problems})
            per_job.append({**info, "completions": runs, "submit_tries": job.submit_tries})
        artifacts = list(s.scalars(select(Artifact).where(Artifact.job_id.in_([j.job_id for j in soak.jobs]))))
        models = list(s.scalars(select(RegisteredModel)))
    corrupt = []
    named: set[str] = set()
    for a in artifacts:
        named.add(a.key)
        try:
            blob = store.get_bytes(a.key)
        except ObjectNotFound:
            corrupt.append({"key": a.key, "problem": "missing"})
            continue
        if hashlib.sha256(blob).hexdigest() != a.sha256 or len(blob) != a.size:
            corrupt.append({"key": a.key, "problem": "sha256/size mismatch"})
        elif a.kind == "checkpoint":
            try:
                decode_checkpoint(blob)
            except Exception as exc:
                corrupt.append({"key": a.key, "problem": f"does not decode: {exc!r}"[:200]})
    for m in models:
        for rel, meta in (m.files or {}).items():
            key = f"{m.key}/{rel}"
            named.add(key)
            try:
                blob = store.get_bytes(key)
            except ObjectNotFound:
                corrupt.append({"key": key, "problem": "missing"})
                continue
            if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
                corrupt.append({"key": key, "problem": "sha256 mismatch"})
    stored = [k for prefix in ("jobs/", "models/") for k in store.list(prefix)]
    orphaned = sorted(set(stored) - named)
    return {
        "lost": lost,
        "duplicated": duplicated,
        "bad_series": bad_series,
        "corrupt": corrupt,
        "orphaned": orphaned,
        "objects_checked": len(named),
        "objects_stored": len(stored),
        "jobs": per_job,
    }


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout)
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln), ""
    )
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cpus": os.cpu_count(),
        "commit": commit,
        "dirty_tree": dirty,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes of faults, both phases together")
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--faults", type=int, default=50, help="faults to aim for over the minutes")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--ray-share", type=float, default=0.3, help="share of jobs and minutes for the Ray phase (0: none)"
    )
    ap.add_argument("--no-real-method", action="store_true", help="only test-counter jobs (no ldr on digits)")
    ap.add_argument("--settle-minutes", type=float, default=10.0, help="how long a phase waits for its jobs to end")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, data) for a look afterwards")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="MINUTES",
        help="first wait up to this long for the 1-minute load average to fall below --quiet-load (a shared machine)",
    )
    ap.add_argument("--quiet-load", type=float, default=1.5)
    args = ap.parse_args(argv)
    waited = wait_quiet(args.wait_quiet * 60, args.quiet_load)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="crucible-chaos-"))
    # Ray on loopback only (by default it advertises the machine's address even for 127.0.0.1), with
    # its token authentication on in the head, the API (the driver) and the workers alike
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    note(f"seed {seed}; state and logs in {tmp}; load {load():.2f}")
    load_before = os.getloadavg()
    started = time.monotonic()
    phases = []
    try:
        with private_services(tmp / "services-root") as services, stack(tmp / "home", services, redis_db=0) as settings:
            soak = Soak(settings, services, tmp, rng)
            window_s = args.minutes * 60
            shares = (
                [("celery", 1 - args.ray_share), ("ray", args.ray_share)] if args.ray_share > 0 else [("celery", 1.0)]
            )
            n_ray = round(args.jobs * args.ray_share) if args.ray_share > 0 else 0
            counts = {"celery": args.jobs - n_ray, "ray": n_ray}
            for executor, share in shares:
                phase_s = window_s * share
                n = counts[executor]
                per_job_s = max(4.0, 2 * phase_s * 0.85 / max(1, n))  # two slots busy most of the window
                jobs = plan_jobs(rng, n, per_job_s, executor, real=executor == "celery" and not args.no_real_method)
                phases.append(
                    soak.run_phase(
                        executor, jobs, phase_s, max(1, math.ceil(args.faults * share * 1.05)), args.settle_minutes * 60
                    )
                )
            figures = check(soak)
    finally:
        if "soak" in locals():
            soak.stop_everything()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    by_kind = Counter(f["kind"] for f in soak.faults)
    recoveries = [p["recovery_s"] for p in phases]
    result = {
        "seed": seed,
        "minutes": args.minutes,
        "jobs": len(soak.jobs),
        "faults": len(soak.faults),
        "faults_by_kind": {k: by_kind.get(k, 0) for k in FAULTS},
        "faults_by_phase": dict(Counter(f["phase"] for f in soak.faults)),
        "fault_errors": [f for f in soak.faults if "error" in f],
        "lost": len(figures["lost"]),
        "duplicated": len(figures["duplicated"]),
        "bad_series": len(figures["bad_series"]),
        "corrupt": len(figures["corrupt"]),
        "orphaned": len(figures["orphaned"]),
        "recovery_s": None if None in recoveries else max(recoveries),
        "phases": phases,
        "job_kinds": dict(Counter(f"{j.phase}:{j.kind}" for j in soak.jobs)),
        "stack": {
            "celery": "API (crucible up, executor celery) + 2 `crucible worker` processes (-c 1), Redis broker",
            "ray": "API as the Ray driver (executor ray) on a local `ray start --head --num-cpus 2`",
            "phases": "CRUCIBLE_EXECUTOR names one executor per API, so the Ray jobs run as a second phase",
            "timings": {"heartbeat_s": soak.settings.heartbeat_s, "lease_s": soak.settings.lease_s},
            "max_attempts": soak.settings.max_attempts,
        },
        "wall_s": round(time.monotonic() - started, 1),
        "wait_for_quiet": waited,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "load_1m_during_faults": {
            "min": min(soak.loads, default=None),
            "median": sorted(soak.loads)[len(soak.loads) // 2] if soak.loads else None,
            "max": max(soak.loads, default=None),
        },
        "machine": machine(),
        "details": {k: figures[k] for k in ("lost", "duplicated", "bad_series", "corrupt", "orphaned")},
        "objects_checked": figures["objects_checked"],
        "objects_stored": figures["objects_stored"],
        "per_job": figures["jobs"],
        "fault_log": soak.faults,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    summary = {
        k: result[k]
        for k in (
            "seed",
            "jobs",
            "faults",
            "faults_by_kind",
            "lost",
            "duplicated",
            "bad_series",
            "corrupt",
            "orphaned",
            "recovery_s",
            "wall_s",
        )
    }
    print(json.dumps(summary, indent=2))
    note(f"wrote {args.out}")
    return (
        0
        if not (
            result["lost"] or result["duplicated"] or result["corrupt"] or result["orphaned"] or result["bad_series"]
        )
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
