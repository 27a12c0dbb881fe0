"""The method registry: a plain decorator over flat dictionaries, as timm's `register_model`.

A method id is declared once, in the module that implements it (`@method("ldr", ...)`), one id per
paper. The registry never imports method modules by name: `discover()`
walks the `models.methods` package, so adding a method touches one new file and there is no
import cycle.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from models.context import RunContext, cpu_threads

Task = Literal["train", "compress", "evaluate", "sample", "select", "analyze"]
TASKS: tuple[str, ...] = ("train", "compress", "evaluate", "sample", "select", "analyze")


class MethodParams(BaseModel):
    """Base for every method's params: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class UnknownMethodError(KeyError):
    """Raised when an id names no registered method (nor a deprecated alias)."""

    def __init__(self, method_id: str, known: list[str]):
        self.method_id = method_id
        self.known = known
        close = [k for k in known if k.startswith(method_id[:2])][:5]
        hint = f"; did you mean one of {close}?" if close else ""
        super().__init__(f"no method named {method_id!r}{hint}")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the service needs to know about one method."""

    id: str
    family: str
    task: str
    paper: str
    datasets: tuple[str, ...]
    params: type[MethodParams]
    run: Callable[[RunContext, Any], None]
    module: str
    summary: str = ""
    resources: dict[str, float] = field(default_factory=dict)
    # params for a seconds-long run on the first built-in dataset of the method's kind (the contract suite's
    # run, cancel and resume checks use them; a notebook can too)
    tiny: dict[str, Any] = field(default_factory=dict)
    tiny_dataset: str | None = None  # a built-in dataset for that run when the kind's first one does not fit

    def validate(self, raw_params: Any = None) -> MethodParams:
        """The params model from a mapping (a job's JSON), or the params object itself."""
        if isinstance(raw_params, self.params):
            return raw_params
        return self.params.model_validate(raw_params or {})

    def invoke(self, ctx: RunContext, raw_params: Any = None) -> bool:
        """Run the method the one way every caller does (runner, reproductions, tests, notebooks).

        Validates the params, pins torch and BLAS to `ctx.resources["cpus"]` threads for the run, and
        turns a cancellation (a loop raising `InterruptedError`, e.g. `models.context.Cancelled`, after
        `ctx.cancelled()` turned true) into a clean return. True when the method ran to the end, False
        when it stopped because it was cancelled. Any other exception propagates.
        """
        params = self.validate(raw_params)
        with cpu_threads(ctx.resources):
            try:
                self.run(ctx, params)
            except InterruptedError:
                if not ctx.cancelled():
                    raise
                return False
        return True

    def params_schema(self) -> dict[str, Any]:
        return self.params.model_json_schema()

    def describe(self) -> dict[str, Any]:
        """The JSON shape of `crucible methods --json` and `GET /api/v1/methods`."""
        return {
            "id": self.id,
            "family": self.family,
            "task": self.task,
            "paper": self.paper,
            "summary": self.summary,
            "params": self.params_schema(),
            "datasets": list(self.datasets),
            "resources": dict(self.resources),
            "reproduction": self.id in _WITH_REPRODUCTION,
        }


_METHODS: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}
_WITH_REPRODUCTION: set[str] = set()  # ids whose module declares a reproduction (models.reproduction keeps them)
_discovered = False


def method(
    id: str,
    *,
    family: str,
    task: Task,
    paper: str,
    datasets: tuple[str, ...],
    params: type[MethodParams],
    resources: dict[str, float] | None = None,
    tiny: dict[str, Any] | None = None,
    tiny_dataset: str | None = None,
) -> Callable[[Callable[[RunContext, Any], None]], Callable[[RunContext, Any], None]]:
    """Register `fn(ctx, params)` as method `id`; `tiny` are params for a seconds-long run (see `MethodSpec`)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def register(fn: Callable[[RunContext, Any], None]) -> Callable[[RunContext, Any], None]:
        existing = _METHODS.get(id)
        if existing is not None and existing.module != fn.__module__:
            raise ValueError(f"method {id!r} registered twice ({existing.module}, {fn.__module__})")
        doc = (fn.__doc__ or "").strip().splitlines()
        _METHODS[id] = MethodSpec(
            id=id,
            family=family,
            task=task,
            paper=paper,
            datasets=tuple(datasets),
            params=params,
            run=fn,
            module=fn.__module__,
            summary=doc[0] if doc else "",
            resources=dict(resources or {"cpus": 1}),
            tiny=dict(tiny or {}),
            tiny_dataset=tiny_dataset,
        )
        return fn

    return register


def note_reproduction(method_id: str) -> None:
    """Called by `models.reproduction` when a module declares a reproduction, so `describe()` can say so
    without the registry importing the reproduction machinery (which imports the registry)."""
    _WITH_REPRODUCTION.add(method_id)


def deprecated_alias(old: str, new: str) -> None:
    """Keep a renamed id working; using it warns."""
    _ALIASES[old] = new


def _declared_ids(path: str) -> list[str]:
    """Method ids a module declares, read from its source (`@method("id", ...)`) without importing it."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return []
    ids = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and getattr(dec.func, "id", getattr(dec.func, "attr", None)) == "method"
                    and dec.args
                    and isinstance(dec.args[0], ast.Constant)
                    and isinstance(dec.args[0].value, str)
                ):
                    ids.append(dec.args[0].value)
    return ids


METHODS_PACKAGE = "models.methods"


def _method_modules() -> list[pkgutil.ModuleInfo]:
    """Every module under `models.methods`, found on disk: the registry names the package by string, so
    the import graph runs from methods to the registry only (plugins register themselves, timm-style)."""
    spec = importlib.util.find_spec(METHODS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(pkgutil.walk_packages(list(spec.submodule_search_locations), prefix=METHODS_PACKAGE + "."))


@lru_cache(maxsize=1)
def _module_index() -> dict[str, str]:
    """id → module name for every method module, so running one job imports one method module
    (and its heavy libraries), not all of them."""
    index: dict[str, str] = {}
    for info in _method_modules():
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            for mid in _declared_ids(spec.origin):
                index[mid] = info.name
    return index


def discover(method_id: str | None = None) -> None:
    """Import method modules so their decorators run: only the one declaring `method_id` when given."""
    global _discovered
    if _discovered:
        return
    if method_id is not None:
        module = _module_index().get(_ALIASES.get(method_id, method_id))
        if module is not None:
            importlib.import_module(module)
            return
    for info in _method_modules():
        importlib.import_module(info.name)
    _discovered = True


def get_method(method_id: str) -> MethodSpec:
    if method_id not in _METHODS:
        discover(method_id)
    if method_id in _ALIASES:
        new = _ALIASES[method_id]
        warnings.warn(f"method id {method_id!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=2)
        method_id = new
    try:
        return _METHODS[method_id]
    except KeyError:
        discover()
        if method_id in _METHODS:
            return _METHODS[method_id]
        raise UnknownMethodError(method_id, sorted(_METHODS)) from None


def registered_spec(fn: Callable[..., Any]) -> MethodSpec:
    """The spec a `run` function was registered under (its module is imported, so it is registered)."""
    for spec in _METHODS.values():
        if spec.run is fn:
            return spec
    raise UnknownMethodError(getattr(fn, "__qualname__", repr(fn)), sorted(_METHODS))


def list_methods(pattern: str = "*", family: str | None = None) -> list[MethodSpec]:
    """Registered methods whose id matches a shell-style wildcard, sorted by id."""
    discover()
    return [
        spec
        for mid, spec in sorted(_METHODS.items())
        if fnmatch.fnmatchcase(mid, pattern) and (family is None or spec.family == family)
    ]
