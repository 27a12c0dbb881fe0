import io
import json

import numpy as np
import pytest

from models.datasets import KINDS, DatasetSchemaError, load_builtin, parse_upload


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["digits", "synthetic-tabular"])
def test_builtins_fit_their_kind_and_splits_are_disjoint(name):
    ds = load_builtin(name)
    KINDS[ds.kind].validate(ds)
    assert set(ds.splits) == {"train", "val", "test"}
    if "index" in ds.train:
        seen = [set(ds.splits[s]["index"].tolist()) for s in ds.splits]
        assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_stdlib_code_split_is_deterministic_and_keyed_by_path():
    ds = load_builtin("stdlib-code")
    assert ds.kind == "text-corpus" and len(ds.train) > 100 and len(ds.val) > 0
    assert not set(ds.train["path"]) & set(ds.val["path"])
    assert any(p.endswith("json/decoder.py") for s in ds.splits.values() for p in s["path"])


def test_image_upload_with_x_y_is_split_stratified():
    x = np.random.rand(100, 8, 8).astype(np.float32)
    y = np.repeat(np.arange(4), 25)
    ds = parse_upload("mine", "image-class", "npz", npz(x=x, y=y))
    assert ds.train["x"].shape[1:] == (1, 8, 8)  # channel axis added
    assert sum(len(s) for s in ds.splits.values()) == 100 and ds.meta["num_classes"] == 4


def test_upload_of_wrong_shape_names_the_field_and_fix():
    with pytest.raises(DatasetSchemaError) as exc:
        parse_upload("bad", "image-class", "npz", npz(x_train=np.zeros((10, 5), np.float32), y_train=np.zeros(10, int)))
    assert exc.value.field == "x_train" and "[N, C, H, W]" in str(exc.value)


def test_label_count_mismatch_is_refused():
    with pytest.raises(DatasetSchemaError, match="same length"):
        parse_upload("bad", "tabular", "npz", npz(x=np.zeros((10, 3)), y=np.zeros(9, int)))


def test_object_arrays_are_never_unpickled():
    with pytest.raises(DatasetSchemaError, match="object arrays are refused"):
        parse_upload("evil", "tabular", "npz", npz(x=np.array([{"a": 1}] * 3, dtype=object), y=np.zeros(3, int)))


def test_non_npz_bytes_are_refused():
    with pytest.raises(DatasetSchemaError, match="npz"):
        parse_upload("junk", "tabular", "npz", b"not a zip file")


def test_jsonl_corpus_and_a_bad_line():
    good = "\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)).encode()
    ds = parse_upload("corpus", "text-corpus", "jsonl", good)
    assert len(ds.train) + len(ds.val) == 50
    with pytest.raises(DatasetSchemaError) as exc:
        parse_upload("corpus", "text-corpus", "jsonl", b'{"text": "ok"}\n{"txt": 1}\n')
    assert exc.value.field == "line 2"


def test_format_must_fit_kind():
    with pytest.raises(DatasetSchemaError, match="jsonl"):
        parse_upload("c", "text-corpus", "npz", npz(x=np.zeros(3)))
