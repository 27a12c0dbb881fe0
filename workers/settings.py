"""All configuration, in one pydantic-settings class read from `CRUCIBLE_*` environment variables.

It lives in `workers` (not `api`) because the job runner in a worker process needs the same
database and store settings as the API, and dependencies point api → workers → models.
Configuration flows one way: settings → app factory / runner → dependencies; no other module
reads the environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRUCIBLE_", extra="ignore")

    home: Path = Field(Path(".crucible"), description="state folder: SQLite file, local objects, logs")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite under home")
    storage_url: str = Field("", description="file://folder or s3://bucket; default home/objects")
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    executor: Literal["local", "celery", "ray"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    ray_address: str | None = None

    host: str = "127.0.0.1"
    port: int = 8000
    api_url: str = Field("", description="where the CLI finds the API; default http://host:port")
    api_key: str = Field("", description="the key the CLI sends; default: the admin key `up` wrote to home/admin-key")

    rate_limit_submit_per_minute: int = Field(120, ge=1, description="job submissions per key per minute")
    rate_limit_inference_per_minute: int = Field(600, ge=1, description="inference requests per key per minute")
    max_active_jobs_per_project: int = Field(100, ge=1, description="queued + running jobs a project may have")
    max_stored_bytes_per_project: int = Field(50 * 1024**3, ge=1024, description="artifact + dataset bytes per project")
    max_archive_files: int = Field(
        2000, ge=1, description="entries (files, folders, links) an uploaded archive may hold, counted as it is read"
    )
    max_dataset_bytes: int = Field(
        2 * 1024**3, ge=1024, description="decoded size of an uploaded dataset (arrays, or .jsonl text) in memory"
    )
    max_deployments_per_project: int = Field(8, ge=1, description="deployments a project may have")
    serving_memory_bytes: int = Field(
        8 * 1024**3,
        ge=1024,
        description="weights kept warm by the serving process; the least recently used are unloaded beyond it",
    )
    max_inflight_per_deployment: int = Field(
        8, ge=1, description="requests one deployment may have running or waiting for its model at once"
    )
    rate_limit_submit_per_minute_per_project: int = Field(
        240, ge=1, description="job submissions per project per minute (all its keys together)"
    )
    rate_limit_inference_per_minute_per_project: int = Field(
        1200, ge=1, description="inference prompts per project per minute (all its keys together)"
    )
    auth_failures_per_minute: int = Field(
        30, ge=1, description="failed authentications per client address per minute before it gets 429s"
    )
    blocking_workers: int = Field(
        4, ge=1, le=64, description="threads for request work that would block the event loop (archives, parsing)"
    )
    blocking_queue: int = Field(16, ge=0, description="such work that may wait for a thread before a 503")
    template_timeout_s: float = Field(2.0, gt=0, le=60, description="time a chat template may take to render")
    max_job_cpus: float | None = Field(
        None, gt=0, description="largest resources.cpus a job may ask; default: this machine's cores"
    )
    max_job_gpus: float | None = Field(
        None, ge=0, description="largest resources.gpus a job may ask; default: this machine's GPUs"
    )

    max_concurrent_jobs: int = Field(2, ge=1, le=64)
    heartbeat_s: float = Field(5.0, gt=0)
    lease_s: float = Field(30.0, gt=0)
    cancel_grace_s: float = Field(10.0, ge=0)
    metric_flush_s: float = Field(2.0, gt=0)
    metric_flush_points: int = Field(1000, ge=1)
    log_line_every_s: float = Field(
        10.0, ge=0, description="a job's log gets a readable line of its latest metrics at most this often (0: off)"
    )
    max_attempts: int = Field(3, ge=1, le=20)
    keep_checkpoints: int = Field(2, ge=1)
    max_upload_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="largest uploaded file (a model archive or dataset), in one request or sent in resumable parts",
    )
    upload_part_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest part of a resumable upload (one PATCH body)"
    )
    upload_ttl_s: float = Field(
        24 * 3600.0, gt=0, description="an unfinished resumable upload is deleted this long after it was created"
    )
    max_open_uploads_per_project: int = Field(16, ge=1, description="unfinished resumable uploads a project may hold")
    max_json_bytes: int = Field(1024 * 1024, ge=1024)
    plugins: str = Field(
        "", description="comma-separated modules that register extra methods (imported by API and workers)"
    )
    import_roots: str = Field(
        "",
        description="colon-separated folders whose model folders jobs and deployments may name by absolute path "
        "(an operator's local models, never uploaded); default home/imports",
    )
    demo_job: bool = Field(True, description="`crucible up` queues one demo job on an empty database")

    @model_validator(mode="after")
    def _defaults_under_home(self) -> Settings:
        self.home = self.home.expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'crucible.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.home / 'objects'}"
        if not self.api_url:
            self.api_url = f"http://{self.host}:{self.port}"
        return self

    def to_env(self) -> dict[str, str]:
        """These settings as CRUCIBLE_* variables, so a job process sees exactly what its executor saw."""
        return {f"CRUCIBLE_{k.upper()}": str(v) for k, v in self.model_dump().items() if v is not None}

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def admin_key_file(self) -> Path:
        return self.home / "admin-key"

    def cli_key(self) -> str:
        """The CLI's bearer key: CRUCIBLE_API_KEY, else the admin key `crucible up` left in home."""
        if self.api_key:
            return self.api_key
        try:
            return self.admin_key_file.read_text().strip()
        except OSError:
            return ""

    @property
    def import_root_paths(self) -> list[Path]:
        """CRUCIBLE_IMPORT_ROOTS (colon-separated), or home/imports: the folders a job's `model` param and a
        deployment's `model` may name model folders under, by absolute path."""
        return [Path(r).resolve() for r in self.import_roots.split(":") if r] or [self.home / "imports"]

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def load_plugins(settings: Settings) -> None:
    """Import plugin modules so their `@method` decorators register (like timm's entry points)."""
    import importlib

    for name in filter(None, (m.strip() for m in settings.plugins.split(","))):
        importlib.import_module(name)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
