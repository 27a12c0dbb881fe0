"""Fixtures shared by the service tests: the tiny model folders zipped once per session."""

from tests.unit.service.test_deployments import model_zips  # noqa: F401
