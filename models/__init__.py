"""Crucible's methods and everything they need, importable without the service.

`models` never imports `api` or `workers`: every method runs and is tested with an
`InMemoryRunContext` alone.
"""

from models.checkpoint import Checkpoint
from models.context import InMemoryRunContext, RunContext
from models.registry import MethodParams, MethodSpec, get_method, list_methods, method
from models.reproduction import Outcome, reproduction

__all__ = [
    "Checkpoint",
    "InMemoryRunContext",
    "MethodParams",
    "MethodSpec",
    "Outcome",
    "RunContext",
    "get_method",
    "list_methods",
    "method",
    "reproduction",
]
