"""A multi-label text set built from the standard library: docstrings → the modules the code uses.

Each example is a documented function, method or class of the interpreter's own standard library: the
text is its header and docstring (`def Class.name(args): docstring`, `class Name(bases): docstring`),
the labels are the standard-library modules its body refers to (names bound by the file's or the
body's own `import` statements, e.g. `os.path.join(...)` → `os`, `re.compile(...)` → `re`; a class's
body includes its methods). A docstring says what the code does, and what it does decides which
modules it needs, so the labels are predictable from the text but not trivially (the text seldom names
them). The `NUM_LABELS` public modules used by the most definitions are the labels, and only
definitions that use at least one of them are kept; an example usually has one to three labels (the
multi-label setting of LP-ICP, Maltoudoglou et al. 2022).

Everything is deterministic: files are read in sorted order, a text seen twice (vendored copies,
overloads) is kept once, and an example's split is fixed by a hash of its qualified name, so adding a
file to the library moves no existing example between splits. The split is 50/25/25: the calibration
and test sets of a conformal predictor need examples as much as the scorer does.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np

from models.datasets.base import Dataset, Split, stable_fraction
from models.datasets.builtins import stdlib_sources

NUM_LABELS = 40
MAX_DOC_CHARS = 600  # the embedder reads ≤ 128 word pieces; the first paragraph carries the meaning
MIN_DOC_CHARS = 20


def _import_aliases(nodes: list[ast.stmt] | list[ast.AST]) -> dict[str, str]:
    """Local name → top-level standard-library module, from `import a.b as c` / `from a.b import c` statements."""
    aliases: dict[str, str] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for name in node.names:
                top = name.name.split(".")[0]
                if top in sys.stdlib_module_names:
                    aliases[name.asname or top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            top = node.module.split(".")[0]
            if top in sys.stdlib_module_names:
                for name in node.names:
                    if name.name != "*":
                        aliases[name.asname or name.name] = top
    return aliases


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
    if args.vararg:
        names.append("*" + args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append("**" + args.kwarg.arg)
    return ", ".join(names)


Documented = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _definitions(tree: ast.Module) -> list[tuple[str, Documented]]:
    """(qualified name, node) of every function, method and class; a method is named `Class.method`."""
    found: list[tuple[str, Documented]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.append((prefix + child.name, child))
                visit(child, prefix + child.name + ".")

    visit(tree, "")
    return found


def _header(node: Documented, qualname: str) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {qualname}({', '.join(ast.unparse(b) for b in node.bases)})"
    return f"def {qualname}({_signature(node)})"


def _modules_used(node: Documented, file_aliases: dict[str, str]) -> set[str]:
    """Modules the body (a class's: all its methods) names through an import alias, or imports itself."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    nested = [n for stmt in body for n in ast.walk(stmt)]
    local = _import_aliases(nested)
    aliases = file_aliases | local
    used = {aliases[n.id] for n in nested if isinstance(n, ast.Name) and n.id in aliases}
    return used | set(local.values())  # a function-local `import x` is a use of x even if only passed on


def docstring_examples(max_files: int | None = None) -> list[tuple[str, str, set[str]]]:
    """(qualified name, text, modules used) for every documented definition, deduplicated (of the first
    `max_files` source files only, when given: a seconds-long sample for smoke runs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    examples, seen = [], set()
    for path in stdlib_sources()[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        own = module.split(".")[0]
        file_aliases = _import_aliases(tree.body)
        for qualname, node in _definitions(tree):
            doc = ast.get_docstring(node)
            if not doc or len(doc) < MIN_DOC_CHARS:
                continue
            text = f"{_header(node, qualname)}: {' '.join(doc.split())[:MAX_DOC_CHARS]}"
            if text in seen:
                continue
            seen.add(text)
            examples.append((f"{module}.{qualname}", text, _modules_used(node, file_aliases) - {own}))
    return examples


def build_stdlib_docstrings(num_labels: int = NUM_LABELS, max_files: int | None = None) -> Dataset:
    """The multi-label set: `text`, multi-hot `labels` [N, num_labels] (int8) and `name` per split."""
    examples = docstring_examples(max_files)
    counts = Counter(m for _, _, used in examples for m in used if not m.startswith("_"))  # no C accelerators
    label_names = sorted(counts, key=lambda m: (-counts[m], m))[:num_labels]
    column = {m: j for j, m in enumerate(label_names)}
    cols: dict[str, dict[str, list]] = {s: {"text": [], "labels": [], "name": []} for s in ("train", "val", "test")}
    for name, text, used in examples:
        hot = np.zeros(len(label_names), dtype=np.int8)
        hot[[column[m] for m in used if m in column]] = 1
        if not hot.any():
            continue
        u = stable_fraction(name)
        split = "train" if u < 0.5 else "val" if u < 0.75 else "test"
        cols[split]["text"].append(text)
        cols[split]["labels"].append(hot)
        cols[split]["name"].append(name)
    splits = {
        s: Split({"text": c["text"], "labels": np.stack(c["labels"]), "name": c["name"]}) for s, c in cols.items()
    }
    return Dataset(
        "stdlib-docstrings",
        "text-corpus",
        splits,
        {
            "task": "multi-label",
            "label_names": label_names,
            "num_labels": len(label_names),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        },
    )
