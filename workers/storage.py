"""The object store: one small interface, a local folder by default, any S3-compatible server in production.

Keys are POSIX paths (`jobs/<id>/artifacts/...`, `models/<name>/<version>/...`, `datasets/<name>/...`).
Writes stream and record sha256; a local write lands under a temporary name and is renamed into
place, so a reader never sees half an object.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlparse

CHUNK = 1024 * 1024


class StorageKeyError(ValueError):
    """A key that could escape the store's root."""


class ObjectNotFound(KeyError):
    pass


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageKeyError(f"bad object key {key!r}")
    parts = key[:-1].split("/") if key.endswith("/") else key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageKeyError(f"object key {key!r} has an empty or relative segment")
    return "/".join(parts)


class ObjectStore(Protocol):
    def put_stream(self, key: str, stream: BinaryIO) -> StoredObject: ...

    def put_bytes(self, key: str, data: bytes) -> StoredObject: ...

    def put_file(self, key: str, path: Path) -> StoredObject: ...

    def get_bytes(self, key: str) -> bytes: ...

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]: ...

    def download(self, key: str, dest: Path) -> None: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def list(self, prefix: str) -> list[str]: ...


class LocalStore:
    """Objects as files under a root folder (0700)."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise StorageKeyError(f"object key {key!r} escapes the store")
        return path

    def put_stream(self, key: str, stream: BinaryIO) -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key, size, digest.hexdigest())

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        import io

        return self.put_stream(key, io.BytesIO(data))

    def put_file(self, key: str, path: Path) -> StoredObject:
        with open(path, "rb") as f:
            return self.put_stream(key, f)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        with f:
            while chunk := f.read(chunk_size):
                yield chunk

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as out:
            for chunk in self.iter_chunks(key):
                out.write(chunk)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [check_key(prefix)]
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".upload-")
        )


_s3_clients: dict[tuple[str | None, str, int], Any] = {}
_s3_clients_lock = threading.Lock()


def s3_client(endpoint_url: str | None, region: str, max_attempts: int = 8) -> Any:
    """One boto3 S3 client per endpoint and process (clients are thread-safe, and building one costs
    10-35 ms of a job's start: the job fork server builds it once and its jobs inherit it).
    Credentials come from the standard AWS variables and files, read when the client is built."""
    import boto3
    from botocore.config import Config

    key = (endpoint_url, region, max_attempts)
    with _s3_clients_lock:
        client = _s3_clients.get(key)
        if client is None:
            client = _s3_clients[key] = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(
                    retries={"max_attempts": max_attempts, "mode": "standard"}, s3={"addressing_style": "path"}
                ),
            )
        return client


def _close_inherited_connections() -> None:
    """A forked child keeps the clients but closes its copies of the parent's pooled sockets (closing
    a copy leaves the parent's connection open); the pools reconnect on the next request."""
    for client in list(_s3_clients.values()):
        client.close()


os.register_at_fork(after_in_child=_close_inherited_connections)


class S3Store:
    """Objects in an S3 bucket (SeaweedFS, MinIO, AWS); multipart uploads and retries come from boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        max_attempts: int = 8,
        retry_s: float = 60.0,
    ):
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = s3_client(endpoint_url, region, max_attempts)
        self.transfer = TransferConfig(multipart_threshold=16 * CHUNK, multipart_chunksize=16 * CHUNK)
        self.retry_s = retry_s  # how long a whole upload is retried while the server is unreachable

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def ensure_bucket(self) -> None:
        existing = {b["Name"] for b in self.client.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            self.client.create_bucket(Bucket=self.bucket)

    def put_stream(self, key: str, stream: BinaryIO) -> StoredObject:
        # Spool to a private temp file: we need the digest before publishing, and boto3 retries
        # multipart parts from a seekable source.
        with tempfile.TemporaryFile() as spool:
            digest, size = hashlib.sha256(), 0
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            self._upload(spool, key, digest.hexdigest())
        return StoredObject(key, size, digest.hexdigest())

    def _upload(self, spool: BinaryIO, key: str, sha256: str) -> None:
        """Upload (multipart above 16 MiB), retrying the whole upload with backoff while the server is
        down; botocore retries single requests, but a multipart upload dies with its first failed part.
        A failed multipart upload is aborted by boto3, so no partial object ever becomes visible."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        deadline, wait = time.monotonic() + self.retry_s, 0.5
        while True:
            spool.seek(0)
            try:
                self.client.upload_fileobj(
                    spool, self.bucket, self._key(key), Config=self.transfer, ExtraArgs={"Metadata": {"sha256": sha256}}
                )
                return
            except (BotoConnectionError, S3UploadFailedError, ClientError) as exc:
                status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
                if status < 500 or time.monotonic() + wait > deadline:
                    raise
            time.sleep(wait)
            wait = min(2 * wait, 8.0)

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        import io

        return self.put_stream(key, io.BytesIO(data))

    def put_file(self, key: str, path: Path) -> StoredObject:
        with open(path, "rb") as f:
            return self.put_stream(key, f)

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise ObjectNotFound(key) from None
        yield from body.iter_chunks(chunk_size)

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self.client.exceptions.ClientError:
            return False

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else self.prefix
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                keys.append(key[len(self.prefix) + 1 :] if self.prefix else key)
        return sorted(keys)


def open_store(url: str, s3_endpoint: str | None = None, region: str = "us-east-1") -> ObjectStore:
    """`file:///abs/folder`, `file://rel/folder` or `s3://bucket[/prefix]`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.netloc + parsed.path))
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, endpoint_url=s3_endpoint, region=region)
    raise ValueError(f"storage URL must start with file:// or s3://, got {url!r}")
