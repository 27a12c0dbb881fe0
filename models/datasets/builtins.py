"""Built-in datasets: generated, or shipped inside an installed package (no downloads)."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np

from models.datasets.base import Dataset, Split, stable_fraction, stratified_split

# Folders of the standard library that are not library code (tests, demos, vendored installers).
_STDLIB_SKIP = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "tkinter",
    "pydoc_data",
}


def build_digits() -> Dataset:
    """scikit-learn's 8×8 handwritten digits, scaled to [0, 1], stratified 60/20/20."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    y = raw.target.astype(np.int64)
    idx = stratified_split(y, seed=0)
    splits = {s: Split({"x": x[i], "y": y[i], "index": i}) for s, i in idx.items()}
    return Dataset("digits", "image-class", splits, {"num_classes": 10, "shape": [1, 8, 8]})


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_SKIP)
        files.extend(Path(folder) / n for n in sorted(names) if n.endswith(".py"))
    return files


def build_stdlib_code() -> Dataset:
    """The interpreter's own standard-library sources; a file's split is fixed by a hash of its path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: dict[str, dict[str, list[str]]] = {s: {"text": [], "path": []} for s in ("train", "val", "test")}
    for path in stdlib_sources():
        rel = path.relative_to(root).as_posix()
        u = stable_fraction(rel)
        split = "val" if u < 0.05 else "test" if u < 0.10 else "train"
        docs[split]["text"].append(path.read_text(encoding="utf-8", errors="replace"))
        docs[split]["path"].append(rel)
    splits = {s: Split(cols) for s, cols in docs.items()}
    return Dataset("stdlib-code", "text-corpus", splits, {"language": "python"})


def build_synthetic_tabular() -> Dataset:
    """A 4-class, 20-feature classification table (8 informative features) from a fixed seed."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=3000, n_features=20, n_informative=8, n_redundant=4, n_classes=4, class_sep=1.0, random_state=0
    )
    x = x.astype(np.float32)
    idx = stratified_split(y.astype(np.int64), seed=0)
    splits = {s: Split({"x": x[i], "y": y[i].astype(np.int64)}) for s, i in idx.items()}
    return Dataset("synthetic-tabular", "tabular", splits, {"task": "classification", "num_classes": 4})
