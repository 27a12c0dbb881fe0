"""What the job fork server loads once, so that every forked job starts with it already in memory.

Imported only by the fork server (`workers.job_start`). Besides torch and the runner, it loads the
production drivers a job touches in its first second — psycopg, boto3 — and builds one S3 client on
boto3's default session: that parses botocore's S3 service model (JSON, hundreds of milliseconds),
which the session then caches, so a forked job's own client costs milliseconds.

When the fork server starts with the worker's settings in its environment (`crucible worker`, a Ray
worker of a Crucible cluster), it also imports the plugin modules, builds the S3 client of their store
and warms the database engine: the dialect initialisation and the compiled statements of the reads
every job makes (together about 0.1 s of each job's start, bench/dispatch.py). It closes that
connection again: a fork must not share sockets with its parent (and `workers.db` drops any
inherited pool in the child regardless).
"""

from __future__ import annotations

import contextlib
import os
import sys

from workers.quiet import quiet_third_party

quiet_third_party()  # before the kits import torch and its neighbours; every forked job inherits it

import models.plots  # noqa: E402,F401
import models.training  # noqa: E402,F401
import workers.run_job  # noqa: E402,F401  (workers.runner and the job's entry point)

with contextlib.suppress(ImportError):  # the embedded default runs without the production extras
    import psycopg  # noqa: F401
    import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401

with contextlib.suppress(ImportError):
    import boto3
    from boto3.s3.transfer import TransferConfig  # noqa: F401

    boto3.client("s3", region_name="us-east-1")  # loads and caches the service model; sends nothing


def _warm_from_environment() -> None:
    if "CRUCIBLE_DATABASE_URL" not in os.environ:
        return
    from workers.db import warm_engine
    from workers.settings import Settings, load_plugins
    from workers.storage import open_store

    settings = Settings()
    try:
        load_plugins(settings)
        open_store(
            settings.storage_url, settings.s3_endpoint, settings.s3_region
        )  # builds the S3 client; sends nothing
        warm_engine(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - a cold start is slower, not wrong: each job connects itself
        print(
            f"[crucible] fork server: could not warm up ({type(exc).__name__}: {exc}); jobs start cold",
            file=sys.stderr,
            flush=True,
        )


_warm_from_environment()
