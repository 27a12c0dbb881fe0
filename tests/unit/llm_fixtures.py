"""Shared fixtures of the LLM tests: a few-document corpus and the smoke-size base model in a private cache."""

from __future__ import annotations

import pytest

from models.context import InMemoryRunContext
from models.datasets import Dataset, Split, load_builtin
from models.llm.base import base_model
from models.llm.folder import CausalLM, load_folder


def small_corpus(documents: int = 4) -> Dataset:
    ds = load_builtin("stdlib-code")
    return Dataset(
        "stdlib-small",
        "text-corpus",
        {s: Split({"text": list(ds.splits[s]["text"][:documents])}) for s in ("train", "val", "test")},
    )


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory) -> CausalLM:
    """The smoke recipe's micro base model, trained once per test module in a private CRUCIBLE_HOME."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRUCIBLE_HOME", str(home))
        yield load_folder(base_model(InMemoryRunContext(), smoke=True))
