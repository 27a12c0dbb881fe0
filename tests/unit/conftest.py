"""Fixtures shared by unit tests in several folders (imported here so pytest offers them to every test below)."""

from tests.unit.llm_fixtures import smoke_base  # noqa: F401
