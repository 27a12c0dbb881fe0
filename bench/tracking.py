"""Tracking benchmark: Crucible against MLflow, both measured in this one run on this machine.

    .venv/bin/python bench/tracking.py            # or `make bench` (installs the `bench` extra: mlflow)
    .venv/bin/python bench/tracking.py --quick    # a smoke run with tiny sizes (figures mean little)

1. Metric logging, points/s until the points are durably in SQLite:
   Crucible's `ctx.log` on a real `JobRunContext` (temp CRUCIBLE_HOME, claimed job, final flush
   included) against MLflow's tracking API on a SQLite backend, one-by-one `log_metric` and
   batched `log_batch` (1,000 metrics a call, MLflow's limit).
2. Job submission, submissions/s through `POST /api/v1/jobs` of a real `crucible up` process on a
   free loopback port (one client, sequential, keep-alive), against MLflow `create_run` on the same
   SQLite backend; and queue-to-start latency of trivial jobs from the job rows (MLflow has no job
   queue or runner, so that row has no peer).

Each figure is the median of --repeats timed rounds after a discarded warm-up. Results are printed
as a table and written to bench/results/tracking.json. Nothing here asserts a wall-clock time.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Import the service from this checkout (a stale editable install can otherwise resolve `migrations`
# and friends as namespace packages when the script runs from bench/).
sys.path.insert(0, str(REPO))

PLUGINS = "tests.fixtures.methods"  # registers `test-counter`
METRIC_NAMES = ("loss", "acc", "lr", "grad_norm")  # points logged per training step
MLFLOW_BATCH = 1000  # MLflow's per-call limit on metrics in log_batch
GOAL_METRIC_RATIO = 5.0  # Crucible / MLflow metric throughput
GOAL_SUBMISSIONS_S = 20.0


# -- small helpers ---------------------------------------------------------------------------
def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a small sample."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment without any CRUCIBLE_* (so nothing points at a real state folder)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CRUCIBLE_")}


def step_values(step: int) -> dict[str, float]:
    return {"loss": 1.0 / (step + 1), "acc": step / (step + 1), "lr": 1e-3, "grad_norm": 2.0 + (step % 7)}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- Crucible: ctx.log into the store ---------------------------------------------------------
class CrucibleMetrics:
    def __init__(self, home: Path):
        from workers.db import upgrade
        from workers.settings import Settings
        from workers.storage import LocalStore

        # Explicit URLs: a CRUCIBLE_DATABASE_URL in the environment must never receive bench rows.
        self.settings = Settings(
            home=home,
            database_url=f"sqlite:///{home / 'crucible.db'}",
            storage_url=(home / "objects").as_uri(),
            demo_job=False,
            plugins="",
        )
        upgrade(self.settings.database_url)
        self.store = LocalStore(home / "objects")

    def run(self, points: int) -> float:
        """Seconds from the first `ctx.log` until `ctx.close()` returned (all points committed)."""
        from sqlalchemy import func, select

        from workers import lifecycle
        from workers.context import JobRunContext
        from workers.db import session_scope
        from workers.tables import Job, Metric

        url = self.settings.database_url
        with session_scope(url) as s:
            job = Job(method="test-counter", params={})
            s.add(job)
            s.flush()
            if not lifecycle.claim(s, job.id, job.attempt, "bench", self.settings.lease_s):
                raise RuntimeError("could not claim the bench job")
            s.expunge(job)
        ctx = JobRunContext(job, None, self.settings, self.store, "cpu")
        ctx.start()
        steps = points // len(METRIC_NAMES)
        t0 = time.perf_counter()
        for step in range(steps):
            ctx.log(step, **step_values(step))
        ctx.close()
        seconds = time.perf_counter() - t0
        with session_scope(url) as s:
            stored = s.scalar(select(func.count()).select_from(Metric).where(Metric.job_id == job.id))
            lifecycle.finish(s, job.id, job.attempt, "succeeded")
        if stored != steps * len(METRIC_NAMES):
            raise RuntimeError(f"Crucible stored {stored} of {steps * len(METRIC_NAMES)} points")
        return seconds


# -- MLflow: the peer, on a SQLite backend ------------------------------------------------------
class MLflowBackend:
    def __init__(self, root: Path):
        import mlflow
        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.mlflow = mlflow
        self.db = root / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self.client.create_experiment("bench", artifact_location=(root / "mlartifacts").as_uri())
        self.version = mlflow.__version__

    def _stored(self, run_id: str) -> int:
        with contextlib.closing(sqlite3.connect(self.db)) as con:
            return con.execute("SELECT count(*) FROM metrics WHERE run_uuid = ?", (run_id,)).fetchone()[0]

    def one_by_one(self, points: int) -> float:
        """`mlflow.log_metric` per point inside an active run, as a training loop calls it."""
        mlflow = self.mlflow
        steps = points // len(METRIC_NAMES)
        with mlflow.start_run(experiment_id=self.experiment_id) as run:
            t0 = time.perf_counter()
            for step in range(steps):
                for name, value in step_values(step).items():
                    mlflow.log_metric(name, value, step=step)
            seconds = time.perf_counter() - t0
        if self._stored(run.info.run_id) != steps * len(METRIC_NAMES):
            raise RuntimeError("MLflow one-by-one lost points")
        return seconds

    def batched(self, points: int) -> float:
        """The loop buffers `Metric` entities and sends `log_batch` every 1,000 (and the rest at the end)."""
        from mlflow.entities import Metric

        run = self.client.create_run(self.experiment_id)
        run_id = run.info.run_id
        steps = points // len(METRIC_NAMES)
        buf: list[Any] = []
        t0 = time.perf_counter()
        for step in range(steps):
            ts = int(time.time() * 1000)
            buf.extend(Metric(name, value, ts, step) for name, value in step_values(step).items())
            if len(buf) >= MLFLOW_BATCH:
                self.client.log_batch(run_id, metrics=buf[:MLFLOW_BATCH], synchronous=True)
                del buf[:MLFLOW_BATCH]
        while buf:
            self.client.log_batch(run_id, metrics=buf[:MLFLOW_BATCH], synchronous=True)
            del buf[:MLFLOW_BATCH]
        seconds = time.perf_counter() - t0
        self.client.set_terminated(run_id)
        if self._stored(run_id) != steps * len(METRIC_NAMES):
            raise RuntimeError("MLflow log_batch lost points")
        return seconds

    def create_runs(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.client.create_run(self.experiment_id)
        return time.perf_counter() - t0


# -- Crucible: a real `crucible up` process ---------------------------------------------------
class Server:
    def __init__(self, home: Path, *, executor: bool):
        import httpx

        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.executor = executor
        self.proc: subprocess.Popen[bytes] | None = None
        self.lock: Any = None
        self.log_path = home.parent / f"server-{self.port}.log"
        self.http = httpx.Client(base_url=self.url, timeout=60, trust_env=False)

    def start(self) -> None:
        if not self.executor:
            # Hold the state folder's executor lock: the server then takes its documented fallback,
            # "serving the API without an executor", and the submitted jobs simply stay queued.
            self.lock = open(self.home / "executor.lock", "a")
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        env = {
            **clean_env(),
            "CRUCIBLE_HOME": str(self.home),
            "CRUCIBLE_PLUGINS": PLUGINS,
            "CRUCIBLE_DEMO_JOB": "false",
            "PYTHONPATH": str(REPO),
            # the benchmark measures throughput, not the per-key abuse limit
            "CRUCIBLE_RATE_LIMIT_SUBMIT_PER_MINUTE": "100000000",
            "CRUCIBLE_MAX_ACTIVE_JOBS_PER_PROJECT": "100000000",
        }
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "up", "--port", str(self.port), "--no-demo"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"crucible up exited during start-up:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                health = self.http.get("/api/v1/health")
                if health.status_code == 200:
                    self.http.headers["Authorization"] = f"Bearer {(self.home / 'admin-key').read_text().strip()}"
                    want = "local" if self.executor else "none"
                    if health.json()["executor"] != want:
                        raise RuntimeError(f"server reports executor {health.json()['executor']!r}, expected {want!r}")
                    return
            time.sleep(0.1)
        raise RuntimeError(f"crucible up did not become healthy:\n{self.log_tail()}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # uvicorn shutdown → executor.stop() ends its job processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        if self.lock is not None:
            self.lock.close()

    def submit(self, spec: dict[str, Any]) -> str:
        r = self.http.post("/api/v1/jobs", json=spec)
        if r.status_code != 201:
            raise RuntimeError(f"POST /api/v1/jobs answered {r.status_code}: {r.text[:500]}")
        return r.json()["id"]

    def submissions(self, n: int, spec: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.submit(spec)
        return time.perf_counter() - t0

    def wait_terminal(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.http.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.05)
        raise RuntimeError(f"job {job_id} did not finish within {timeout}s:\n{self.log_tail()}")


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- the run ------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    reps = args.repeats
    spec = {"method": "test-counter", "params": {"steps": 1}}
    out: dict[str, Any] = {"metrics": {}, "submissions": {}, "latency": {}}

    # 1. metric logging -----------------------------------------------------------------------
    say("setting up Crucible and MLflow SQLite stores ...")
    cru = CrucibleMetrics(root / "crucible-metrics")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlf = MLflowBackend(root / "mlflow")
    n, n1 = args.points, args.points_one_by_one
    cases: list[tuple[str, str, int, Callable[[int], float]]] = [
        ("crucible_ctx_log", "Crucible ctx.log → JobRunContext flush", n, cru.run),
        ("mlflow_log_batch", f"MLflow log_batch ({MLFLOW_BATCH}/call)", n, mlf.batched),
        ("mlflow_log_metric", "MLflow log_metric (one-by-one)", n1, mlf.one_by_one),
    ]
    say("metric logging: warm-up ...")
    for _, _, size, fn in cases:
        fn(max(len(METRIC_NAMES), size // 10))
    samples: dict[str, list[float]] = {key: [] for key, *_ in cases}
    for r in range(reps):  # interleaved, so a change in the machine's load hits every system alike
        for key, label, size, fn in cases:
            say(f"metric logging: round {r + 1}/{reps}: {label}, {size} points ...")
            samples[key].append(fn(size))
    for key, label, size, _ in cases:
        secs = median(samples[key])
        out["metrics"][key] = {
            "label": label,
            "points": size,
            "seconds": samples[key],
            "median_seconds": secs,
            "points_per_s": size / secs,
        }

    # 2a. MLflow create_run ---------------------------------------------------------------------
    ns = args.submissions
    mlf.create_runs(max(1, ns // 10))  # warm-up
    runs = []
    for r in range(reps):
        say(f"submissions: round {r + 1}/{reps}: MLflow create_run x{ns} ...")
        runs.append(mlf.create_runs(ns))
    out["submissions"]["mlflow_create_run"] = {
        "label": "MLflow create_run (in-process, no HTTP)",
        "n": ns,
        "seconds": runs,
        "median_seconds": median(runs),
        "per_s": ns / median(runs),
    }

    # 2b. crucible up, API only (jobs stay queued) --------------------------------------------
    say("submissions: starting `crucible up` (API only) ...")
    with running(Server(root / "api-only" / "home", executor=False)) as srv:
        srv.submissions(max(1, ns // 10), spec)  # warm-up
        secs = []
        for r in range(reps):
            say(f"submissions: round {r + 1}/{reps}: POST /api/v1/jobs x{ns} (API only) ...")
            secs.append(srv.submissions(ns, spec))
    out["submissions"]["crucible_api_only"] = {
        "label": "Crucible POST /api/v1/jobs, API only",
        "n": ns,
        "seconds": secs,
        "median_seconds": median(secs),
        "per_s": ns / median(secs),
    }

    # 2c. crucible up with its local executor: latency first, then submissions while it runs them
    say("latency: starting `crucible up` (local executor) ...")
    with running(Server(root / "executor" / "home", executor=True)) as srv:
        warm = srv.wait_terminal(srv.submit(spec))  # warm-up: first job process (cold imports)
        if warm["status"] != "succeeded":
            raise RuntimeError(f"warm-up job {warm['status']}: {warm.get('failure')}\n{srv.log_tail()}")
        q2s, s2f, c2f = [], [], []
        for i in range(args.latency_jobs):
            say(f"latency: job {i + 1}/{args.latency_jobs} ...")
            job = srv.wait_terminal(srv.submit(spec))
            if job["status"] != "succeeded":
                raise RuntimeError(f"latency job {job['id']} {job['status']}: {job.get('failure')}")
            created, started, finished = ts(job["created_at"]), ts(job["started_at"]), ts(job["finished_at"])
            q2s.append((started - created).total_seconds())
            s2f.append((finished - started).total_seconds())
            c2f.append((finished - created).total_seconds())
        for key, xs, label in (
            ("queue_to_start", q2s, "created_at → started_at (claimed)"),
            ("start_to_finish", s2f, "started_at → finished_at"),
            ("queue_to_finish", c2f, "created_at → finished_at"),
        ):
            out["latency"][key] = {"label": label, "seconds": xs, "p50": percentile(xs, 50), "p95": percentile(xs, 95)}
        say(f"submissions: POST /api/v1/jobs x{ns} while the local executor runs them ...")
        busy = srv.submissions(ns, spec)
    out["submissions"]["crucible_with_executor"] = {
        "label": "Crucible POST /api/v1/jobs, executor running them",
        "n": ns,
        "seconds": [busy],
        "median_seconds": busy,
        "per_s": ns / busy,
    }
    out["versions"] = {"mlflow": mlf.version}
    return out


def environment() -> dict[str, Any]:
    import sqlalchemy

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "sqlalchemy": sqlalchemy.__version__,
        "sqlite": sqlite3.sqlite_version,
        "commit": commit.stdout.strip() or None,
        "dirty": bool(dirty.stdout.strip()),
        "loadavg_start": list(os.getloadavg()),
    }


def report(res: dict[str, Any]) -> None:
    m, sub, lat = res["metrics"], res["submissions"], res["latency"]
    w = 52
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print()
    print(
        f"Crucible vs MLflow {res['versions']['mlflow']} on this machine ({res['env']['cpus']} CPUs, "
        f"load average {res['env']['loadavg_start'][0]:.1f} → {res['env']['loadavg_end'][0]:.1f}); "
        f"median of {res['config']['repeats']} rounds after a warm-up"
    )
    print()
    print(f"1. Metric logging: points/s until durably in SQLite ({res['config']['metrics_per_step']} metrics a step)")
    print(f"   {'':{w}} {'points':>8} {'median s':>9} {'points/s':>10}")
    for row in m.values():
        print(f"   {row['label']:{w}} {row['points']:>8} {row['median_seconds']:>9.3f} {row['points_per_s']:>10,.0f}")
    rb, r1 = res["ratios"]["crucible_over_mlflow_log_batch"], res["ratios"]["crucible_over_mlflow_log_metric"]
    print(
        f"   Crucible / MLflow log_batch  = {rb:8.2f}x   goal ≥ {GOAL_METRIC_RATIO:g}x: {met(rb >= GOAL_METRIC_RATIO)}"
    )
    print(
        f"   Crucible / MLflow log_metric = {r1:8.2f}x   goal ≥ {GOAL_METRIC_RATIO:g}x: {met(r1 >= GOAL_METRIC_RATIO)}"
    )
    print()
    print("2. Job submission: one client, sequential, HTTP keep-alive")
    print(f"   {'':{w}} {'n':>8} {'median s':>9} {'per s':>10}")
    for row in sub.values():
        print(f"   {row['label']:{w}} {row['n']:>8} {row['median_seconds']:>9.3f} {row['per_s']:>10.1f}")
    base = sub["mlflow_create_run"]["per_s"]
    for key, short in (("crucible_api_only", "API only"), ("crucible_with_executor", "executor running them")):
        per_s = sub[key]["per_s"]
        print(
            f"   Crucible ({short}) / MLflow create_run = {per_s / base:.2f}x;"
            f"  goal ≥ {GOAL_SUBMISSIONS_S:g}/s: {met(per_s >= GOAL_SUBMISSIONS_S)}"
        )
    print("   MLflow has no job runner: create_run only records a run, in-process, with no HTTP hop.")
    print()
    print(
        f"3. Queue-to-start latency: test-counter steps=1, {res['config']['latency_jobs']} jobs one after another, "
        "from the job rows"
    )
    print(f"   {'':{w}} {'p50 s':>8} {'p95 s':>9}")
    for row in lat.values():
        print(f"   {row['label']:{w}} {row['p50']:>8.3f} {row['p95']:>9.3f}")
    print("   MLflow: no peer (it tracks runs; it does not queue or run jobs).")
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=20_000, help="points for Crucible and MLflow log_batch")
    p.add_argument("--points-one-by-one", type=int, default=160, help="points for MLflow log_metric one-by-one")
    p.add_argument("--submissions", type=int, default=200, help="sequential submissions / create_run calls a round")
    p.add_argument("--latency-jobs", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (the median is reported)")
    p.add_argument(
        "--out", type=Path, default=None, help="default bench/results/tracking.json (tracking-quick.json with --quick)"
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.points, args.points_one_by_one, args.submissions, args.latency_jobs, args.repeats = 2000, 40, 20, 2, 1
    args.out = args.out or REPO / "bench" / "results" / ("tracking-quick.json" if args.quick else "tracking.json")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print(
            "MLflow is the baseline and is not installed: `make bench`, or `.venv/bin/pip install -e '.[bench]'`",
            file=sys.stderr,
        )
        return 2

    started = time.perf_counter()
    env = environment()
    with tempfile.TemporaryDirectory(prefix="crucible-bench-") as tmp:
        res = measure(args, Path(tmp))
    env["loadavg_end"] = list(os.getloadavg())
    m = res["metrics"]
    res.update(
        env=env,
        when=datetime.now(UTC).isoformat(timespec="seconds"),
        config={
            "points": args.points,
            "points_one_by_one": args.points_one_by_one,
            "metrics_per_step": len(METRIC_NAMES),
            "submissions": args.submissions,
            "latency_jobs": args.latency_jobs,
            "repeats": args.repeats,
            "quick": args.quick,
            "crucible_settings": "defaults (metric_flush_points=1000, metric_flush_s=2.0)",
        },
        ratios={
            "crucible_over_mlflow_log_batch": m["crucible_ctx_log"]["points_per_s"]
            / m["mlflow_log_batch"]["points_per_s"],
            "crucible_over_mlflow_log_metric": m["crucible_ctx_log"]["points_per_s"]
            / m["mlflow_log_metric"]["points_per_s"],
            "submissions_api_only_over_mlflow_create_run": res["submissions"]["crucible_api_only"]["per_s"]
            / res["submissions"]["mlflow_create_run"]["per_s"],
        },
        goals={"metric_ratio_vs_mlflow_log_batch": GOAL_METRIC_RATIO, "submissions_per_s": GOAL_SUBMISSIONS_S},
    )
    res["total_seconds"] = time.perf_counter() - started
    report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out} "
        f"({res['total_seconds']:.0f} s in all)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
