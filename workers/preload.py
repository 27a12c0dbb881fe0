"""What the job fork server loads once, so that every forked job starts with it already in memory.

Imported only by the fork server (`workers.job_start`). Besides torch and the runner, it loads the
production drivers a job touches in its first second — psycopg, boto3 — and builds one S3 client on
boto3's default session: that parses botocore's S3 service model (JSON, hundreds of milliseconds),
which the session then caches, so a forked job's own client costs milliseconds. No connection is
opened here: a fork must not share sockets with its parent.
"""

from __future__ import annotations

import contextlib

import workers.run_job  # noqa: F401  (workers.runner and the job's entry point)
import models.plots  # noqa: F401
import models.training  # noqa: F401

with contextlib.suppress(ImportError):  # the embedded default runs without the production extras
    import psycopg  # noqa: F401
    import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401

with contextlib.suppress(ImportError):
    import boto3
    from boto3.s3.transfer import TransferConfig  # noqa: F401

    boto3.client("s3", region_name="us-east-1")  # loads and caches the service model; sends nothing
