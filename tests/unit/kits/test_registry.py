import pytest

from models.registry import UnknownMethodError, deprecated_alias, get_method, list_methods


def test_methods_describe_the_contract_shape():
    items = [m.describe() for m in list_methods()]
    assert items, "no methods registered"
    for m in items:
        assert {"id", "family", "task", "paper", "params", "datasets", "reproduction"} <= set(m)
        assert m["params"]["type"] == "object"


def test_wildcards_filter_ids():
    assert [m.id for m in list_methods("test-*")] == ["test-counter", "test-sleep"]
    assert list_methods("no-such-*") == []


def test_unknown_method_names_itself():
    with pytest.raises(UnknownMethodError, match="nope"):
        get_method("nope")


def test_renamed_id_keeps_working_with_a_warning():
    deprecated_alias("old-counter", "test-counter")
    with pytest.warns(DeprecationWarning, match="test-counter"):
        assert get_method("old-counter").id == "test-counter"


def test_params_refuse_unknown_fields():
    spec = get_method("test-counter")
    with pytest.raises(Exception, match="extra"):
        spec.params.model_validate({"stepz": 3})
