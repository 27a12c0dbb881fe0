"""S3Store behind the same interface, against moto's in-process S3 (a unit-test fake; the real
S3-compatible server is exercised by the production-stack integration suite)."""

import hashlib
import io

import pytest

moto = pytest.importorskip("moto")


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with moto.mock_aws():
        from workers.storage import S3Store

        store = S3Store("crucible", prefix="env1")
        store.ensure_bucket()
        yield store


def test_round_trip_list_and_delete(s3):
    data = bytes(range(256)) * 100_000  # 25.6 MB: crosses the multipart threshold
    obj = s3.put_stream("jobs/j/artifacts/big.bin", io.BytesIO(data))
    assert obj.sha256 == hashlib.sha256(data).hexdigest() and obj.size == len(data)
    assert s3.get_bytes("jobs/j/artifacts/big.bin") == data
    s3.put_bytes("jobs/j/artifacts/a.txt", b"a")
    assert s3.list("jobs/j/") == ["jobs/j/artifacts/a.txt", "jobs/j/artifacts/big.bin"]
    assert s3.exists("jobs/j/artifacts/a.txt")
    s3.delete_prefix("jobs/j/")
    assert s3.list("jobs/") == [] and not s3.exists("jobs/j/artifacts/a.txt")


def test_missing_object_and_bad_keys(s3):
    from workers.storage import ObjectNotFound, StorageKeyError

    with pytest.raises(ObjectNotFound):
        s3.get_bytes("nope/x")
    with pytest.raises(StorageKeyError):
        s3.put_bytes("../x", b"")
