"""Fixtures shared by the kit tests: the KV-cache tests' tiny Llama, its token ids and one layer's inputs."""

from tests.unit.kits.test_kv_cache import ids, layer_inputs, model  # noqa: F401
