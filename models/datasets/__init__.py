"""The dataset registry: built-ins by name, plus parsers for uploaded datasets of each kind."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from models.datasets.base import (
    SPLITS,
    Dataset,
    DatasetInfo,
    DatasetKind,
    DatasetSchemaError,
    Split,
    UnknownDatasetError,
    random_split,
    stable_fraction,
    stratified_split,
)
from models.datasets.builtins import build_digits, build_stdlib_code, build_synthetic_tabular
from models.datasets.kinds import KINDS, parse_upload
from models.datasets.stdlib_docstrings import build_stdlib_docstrings
from models.provenance import note_input

_BUILTINS: dict[str, tuple[DatasetInfo, Callable[[], Dataset]]] = {}


def register_builtin(info: DatasetInfo, build: Callable[[], Dataset]) -> None:
    _BUILTINS[info.name] = (info, build)


def builtin_infos() -> list[DatasetInfo]:
    return [info for info, _ in _BUILTINS.values()]


def is_builtin(name: str) -> bool:
    return name in _BUILTINS


def load_builtin(name: str) -> Dataset:
    """A built-in dataset, built once per process and validated against its kind. A reproduction that
    loads it records its content hash (`models.provenance`): some built-ins come from the machine (the
    standard library's sources differ between Python releases)."""
    if name not in _BUILTINS:
        raise UnknownDatasetError(name, sorted(_BUILTINS))
    ds, digest = _build_builtin(name)
    note_input(f"dataset:{name}", digest)
    return ds


@lru_cache(maxsize=8)
def _build_builtin(name: str) -> tuple[Dataset, str]:
    info, build = _BUILTINS[name]
    ds = build()
    KINDS[info.kind].validate(ds)
    return ds, dataset_digest(ds)


def dataset_digest(ds: Dataset) -> str:
    """16 hex digits of SHA-256 over every split's columns (arrays by their bytes, lists by their items)."""
    h = hashlib.sha256()
    for split_name in sorted(ds.splits):
        for column, values in sorted(ds.splits[split_name].columns.items()):
            h.update(f"{split_name}/{column}\0".encode())
            if isinstance(values, np.ndarray):
                h.update(str(values.dtype).encode() + str(values.shape).encode())
                h.update(np.ascontiguousarray(values).tobytes())
            else:
                for item in values:
                    h.update(repr(item).encode() + b"\0")
    return h.hexdigest()[:16]


register_builtin(
    DatasetInfo(
        "digits",
        "image-class",
        "scikit-learn 8×8 handwritten digits (1,797 images, 10 classes)",
        "builtin",
        {"num_classes": 10, "shape": [1, 8, 8], "size": 1797},
    ),
    build_digits,
)
register_builtin(
    DatasetInfo(
        "stdlib-code", "text-corpus", "the Python standard library's own .py sources", "builtin", {"language": "python"}
    ),
    build_stdlib_code,
)
register_builtin(
    DatasetInfo(
        "synthetic-tabular",
        "tabular",
        "generated 4-class table, 20 features (8 informative)",
        "builtin",
        {"num_classes": 4, "num_features": 20, "size": 3000},
    ),
    build_synthetic_tabular,
)
register_builtin(
    DatasetInfo(
        "stdlib-docstrings",
        "text-corpus",
        "standard-library docstrings (functions, methods, "
        "classes) labelled with the 40 modules their code uses: multi-label, multi-hot `labels`",
        "builtin",
        {"task": "multi-label", "num_labels": 40},
    ),
    build_stdlib_docstrings,
)

__all__ = [
    "SPLITS",
    "Dataset",
    "DatasetInfo",
    "DatasetKind",
    "DatasetSchemaError",
    "KINDS",
    "Split",
    "UnknownDatasetError",
    "builtin_infos",
    "is_builtin",
    "load_builtin",
    "parse_upload",
    "random_split",
    "register_builtin",
    "stable_fraction",
    "stratified_split",
]
