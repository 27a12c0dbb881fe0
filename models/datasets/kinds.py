"""Dataset kinds (schemas) and the parsers that turn an uploaded file into a validated Dataset.

Uploads are `.npz` (numeric kinds; loaded with `allow_pickle=False`) or `.jsonl` (text kinds).
Each parser either returns a dataset that passed its kind's validator or raises
`DatasetSchemaError` naming the field and the fix.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from models.datasets.base import (
    SPLITS,
    Dataset,
    DatasetKind,
    DatasetSchemaError,
    Split,
    random_split,
    stable_fraction,
    stratified_split,
)

NPZ_LAYOUT = (
    "x_train, y_train (and optionally x_val, y_val, x_test, y_test), or x and y to be split 60/20/20 deterministically"
)


def _require_splits(ds: Dataset) -> None:
    missing = [s for s in SPLITS if s not in ds.splits]
    if missing:
        raise DatasetSchemaError("splits", f"missing split(s) {missing}", "provide train, val and test splits")


def _check_labels(ds: Dataset, column: str = "y") -> int:
    labels = [np.asarray(split[column]) for _, split in ds]
    for (name, _), y in zip(ds, labels):
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DatasetSchemaError(
                f"{column}_{name}",
                f"labels must be a 1-D integer array, got {y.dtype}{list(y.shape)}",
                "store class indices 0..K-1 as int64",
            )
        if y.size and y.min() < 0:
            raise DatasetSchemaError(f"{column}_{name}", "negative class index", "use class indices 0..K-1")
    return int(max((int(y.max()) for y in labels if y.size), default=-1)) + 1


def _check_rows(ds: Dataset, x_col: str, y_col: str) -> None:
    for name, split in ds:
        x, y = split[x_col], split[y_col]
        if len(x) != len(y):
            raise DatasetSchemaError(
                f"{x_col}_{name}",
                f"{len(x)} rows but {len(y)} labels",
                f"give {x_col}_{name} and {y_col}_{name} the same length",
            )
        if len(x) == 0 and name == "train":
            raise DatasetSchemaError(f"{x_col}_train", "the train split is empty", "provide at least one training row")
        if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all():
            raise DatasetSchemaError(f"{x_col}_{name}", "contains NaN or infinity", "replace or drop non-finite values")


def validate_image_class(ds: Dataset) -> None:
    _require_splits(ds)
    for name, split in ds:
        x = np.asarray(split["x"])
        if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
            raise DatasetSchemaError(
                f"x_{name}",
                f"images must be float arrays [N, C, H, W], got {x.dtype}{list(x.shape)}",
                "store images as float32 in [0, 1] with a channel axis",
            )
    _check_rows(ds, "x", "y")
    ds.meta["num_classes"] = max(int(ds.meta.get("num_classes", 0)), _check_labels(ds))
    ds.meta["shape"] = list(np.asarray(ds.train["x"]).shape[1:])


def validate_tabular(ds: Dataset) -> None:
    _require_splits(ds)
    for name, split in ds:
        x = np.asarray(split["x"])
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
            raise DatasetSchemaError(
                f"x_{name}",
                f"features must be a numeric [N, D] array, got {x.dtype}{list(x.shape)}",
                "store one row per example and one column per feature",
            )
    _check_rows(ds, "x", "y")
    if np.issubdtype(np.asarray(ds.train["y"]).dtype, np.integer):
        ds.meta.setdefault("task", "classification")
        ds.meta["num_classes"] = _check_labels(ds)
    else:
        ds.meta.setdefault("task", "regression")
    ds.meta["num_features"] = int(np.asarray(ds.train["x"]).shape[1])


def validate_text_corpus(ds: Dataset) -> None:
    _require_splits(ds)
    for name, split in ds:
        texts = split["text"]
        if not all(isinstance(t, str) for t in texts):
            raise DatasetSchemaError(
                f"text ({name})", "every document must be a string", 'write lines like {"text": "..."}'
            )
    if len(ds.train) == 0:
        raise DatasetSchemaError("text", "the train split is empty", "provide at least one document")


KINDS: dict[str, DatasetKind] = {
    "image-class": DatasetKind(
        "image-class", "images [N, C, H, W] in [0, 1] with integer class labels", ("npz",), validate_image_class
    ),
    "tabular": DatasetKind(
        "tabular", "feature rows [N, D] with integer classes or float targets", ("npz",), validate_tabular
    ),
    "text-corpus": DatasetKind("text-corpus", "documents as strings", ("jsonl",), validate_text_corpus),
}


def _npz_arrays(blob: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetSchemaError(
            "file",
            f"not a readable .npz archive of plain arrays ({exc})",
            "save with numpy.savez of numeric arrays (object arrays are refused)",
        ) from exc


def _splits_from_arrays(arrays: dict[str, np.ndarray], kind: str) -> dict[str, Split]:
    if "x_train" in arrays:
        if "y_train" not in arrays:
            raise DatasetSchemaError("y_train", "missing", "add the training labels as y_train")
        out = {
            s: Split({"x": arrays[f"x_{s}"], "y": arrays[f"y_{s}"]})
            for s in SPLITS
            if f"x_{s}" in arrays and f"y_{s}" in arrays
        }
        missing = [s for s in ("val", "test") if s not in out]
        if missing:  # carve each missing split (10%) out of train, deterministically
            x, y = out["train"]["x"], out["train"]["y"]
            order = np.random.default_rng(0).permutation(len(x))
            cut = max(1, len(x) // 10) if len(x) > 1 else 0
            for i, s in enumerate(missing):
                take = order[i * cut : (i + 1) * cut]
                out[s] = Split({"x": x[take], "y": y[take]})
            keep = np.sort(order[len(missing) * cut :])
            out["train"] = Split({"x": x[keep], "y": y[keep]})
        return out
    if "x" in arrays and "y" in arrays:
        x, y = arrays["x"], arrays["y"]
        if len(x) != len(y):
            raise DatasetSchemaError("x", f"{len(x)} rows but {len(y)} labels", "give x and y the same length")
        idx = stratified_split(y) if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 else random_split(len(x))
        return {s: Split({"x": x[i], "y": y[i]}) for s, i in idx.items()}
    raise DatasetSchemaError("file", f"arrays {sorted(arrays)} do not match the layout", f"use {NPZ_LAYOUT}")


def parse_npz(name: str, kind: str, blob: bytes) -> Dataset:
    arrays = _npz_arrays(blob)
    if kind == "image-class":
        arrays = {k: (v[:, None] if k.startswith("x") and v.ndim == 3 else v) for k, v in arrays.items()}
        arrays = {
            k: (
                v.astype(np.float32)
                if k.startswith("x") and np.issubdtype(v.dtype, np.number) and not np.issubdtype(v.dtype, np.floating)
                else v
            )
            for k, v in arrays.items()
        }
    return Dataset(name, kind, _splits_from_arrays(arrays, kind), {})


def parse_jsonl(name: str, kind: str, blob: bytes) -> Dataset:
    docs: dict[str, list[str]] = {s: [] for s in SPLITS}
    try:
        lines = blob.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetSchemaError("file", "not UTF-8 text", "save the file as UTF-8 JSON lines") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetSchemaError(
                f"line {n}", f"not JSON ({exc.msg})", 'write one object per line, like {"text": "..."}'
            ) from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DatasetSchemaError(
                f"line {n}", 'has no string field "text"', 'write one object per line, like {"text": "..."}'
            )
        split = row.get("split") or ("val" if stable_fraction(row["text"]) < 0.1 else "train")
        if split not in SPLITS:
            raise DatasetSchemaError(f"line {n}.split", f"unknown split {split!r}", f"use one of {SPLITS}")
        docs[split].append(row["text"])
    if not docs["test"]:
        docs["test"] = list(docs["val"])
    return Dataset(name, kind, {s: Split({"text": d}) for s, d in docs.items()}, {})


PARSERS: dict[str, Callable[[str, str, bytes], Dataset]] = {"npz": parse_npz, "jsonl": parse_jsonl}


def parse_upload(name: str, kind: str, fmt: str, blob: bytes) -> Dataset:
    """Parse and validate an uploaded file; raises DatasetSchemaError with the field and fix."""
    if kind not in KINDS:
        raise DatasetSchemaError("kind", f"unknown kind {kind!r}", f"use one of {sorted(KINDS)}")
    spec = KINDS[kind]
    if fmt not in spec.formats:
        raise DatasetSchemaError(
            "format", f"kind {kind} takes {', '.join(spec.formats)}, not {fmt}", f"upload a .{spec.formats[0]} file"
        )
    ds = PARSERS[fmt](name, kind, blob)
    spec.validate(ds)
    return ds
