"""The dataset registry: built-ins by name, plus parsers for uploaded datasets of each kind."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

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

_BUILTINS: dict[str, tuple[DatasetInfo, Callable[[], Dataset]]] = {}


def register_builtin(info: DatasetInfo, build: Callable[[], Dataset]) -> None:
    _BUILTINS[info.name] = (info, build)


def builtin_infos() -> list[DatasetInfo]:
    return [info for info, _ in _BUILTINS.values()]


def is_builtin(name: str) -> bool:
    return name in _BUILTINS


@lru_cache(maxsize=8)
def load_builtin(name: str) -> Dataset:
    """Build a built-in dataset once per process and validate it against its kind."""
    if name not in _BUILTINS:
        raise UnknownDatasetError(name, sorted(_BUILTINS))
    info, build = _BUILTINS[name]
    ds = build()
    KINDS[info.kind].validate(ds)
    return ds


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
