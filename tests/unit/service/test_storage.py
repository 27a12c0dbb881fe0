import hashlib
import io

import pytest

from workers.storage import LocalStore, ObjectNotFound, StorageKeyError, open_store


def test_put_get_list_delete_with_digest(tmp_path):
    store = LocalStore(tmp_path / "objects")
    data = b"x" * 3_000_000
    obj = store.put_stream("jobs/a/artifacts/big.bin", io.BytesIO(data))
    assert obj.size == len(data) and obj.sha256 == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("jobs/a/artifacts/big.bin") == data
    assert b"".join(store.iter_chunks("jobs/a/artifacts/big.bin")) == data
    store.put_bytes("jobs/a/artifacts/small.txt", b"hi")
    assert store.list("jobs/a/") == ["jobs/a/artifacts/big.bin", "jobs/a/artifacts/small.txt"]
    store.delete_prefix("jobs/a/")
    assert store.list("jobs/") == []
    with pytest.raises(ObjectNotFound):
        store.get_bytes("jobs/a/artifacts/small.txt")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "a\\b", "a/\x00b", "", "a//b/./c"])
def test_keys_that_could_escape_are_refused(tmp_path, key):
    with pytest.raises(StorageKeyError):
        LocalStore(tmp_path).put_bytes(key, b"x")


def test_failed_write_leaves_no_object(tmp_path):
    store = LocalStore(tmp_path)

    class Broken(io.RawIOBase):
        calls = 0

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 1:
                raise OSError("connection reset")
            return b"partial"

    with pytest.raises(OSError):
        store.put_stream("jobs/x/a.bin", Broken())
    assert store.list("") == []


def test_open_store_understands_urls(tmp_path):
    assert isinstance(open_store(f"file://{tmp_path}/o"), LocalStore)
    with pytest.raises(ValueError, match="file:// or s3://"):
        open_store("ftp://x")
