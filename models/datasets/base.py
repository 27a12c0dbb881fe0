"""Datasets: named, of a kind, split into train/val/test columns.

A kind is a schema: which columns a split must have, their shapes and types. Built-in datasets
are generated or ship in a PyPI package; user uploads are parsed (never unpickled) and validated
against their kind before anything is stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")


class DatasetSchemaError(ValueError):
    """A dataset that does not fit its kind; `field` names the offending part, `fix` says what to do."""

    def __init__(self, field: str, message: str, fix: str):
        self.field = field
        self.fix = fix
        super().__init__(f"{field}: {message}. {fix}")


class UnknownDatasetError(KeyError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(f"no dataset named {name!r}; known: {', '.join(known)}")


@dataclass
class Split:
    """One split's columns (arrays or lists of equal length)."""

    columns: dict[str, Any]

    def __getitem__(self, column: str) -> Any:
        return self.columns[column]

    def __contains__(self, column: str) -> bool:
        return column in self.columns

    def __len__(self) -> int:
        first = next(iter(self.columns.values()), [])
        return len(first)


@dataclass
class Dataset:
    name: str
    kind: str
    splits: dict[str, Split]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def val(self) -> Split:
        return self.splits["val"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    def __iter__(self) -> Iterator[tuple[str, Split]]:
        return iter(self.splits.items())


@dataclass(frozen=True)
class DatasetInfo:
    """What a listing shows without building the dataset."""

    name: str
    kind: str
    description: str
    source: str  # "builtin" or "upload"
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "source": self.source,
            "meta": dict(self.meta),
        }


@dataclass(frozen=True)
class DatasetKind:
    """A dataset kind: a name, the upload formats it takes, and a validator for built splits."""

    name: str
    description: str
    formats: tuple[str, ...]
    validate: Callable[[Dataset], None]


def stable_fraction(key: str) -> float:
    """A deterministic number in [0, 1) from a string, for splits that never move."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32


def stratified_split(
    y: np.ndarray, fractions: tuple[float, float] = (0.6, 0.2), seed: int = 0
) -> dict[str, np.ndarray]:
    """Index arrays for train/val/test, stratified by label and fixed by seed."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def random_split(n: int, fractions: tuple[float, float] = (0.6, 0.2), seed: int = 0) -> dict[str, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    return {
        "train": np.sort(idx[:n_train]),
        "val": np.sort(idx[n_train : n_train + n_val]),
        "test": np.sort(idx[n_train + n_val :]),
    }
