"""Constraints: checked when built (a bad schema or regex names why), hashable, and on the wire intact."""

from __future__ import annotations

import json

import msgspec
import pytest

from appliance.engine.constraint import Constraint
from appliance.engine.request import SamplingParams
from appliance.serve.protocol import ConstraintSpec, Sampling


def test_kinds_build_and_hash() -> None:
    a = Constraint.json_schema({"type": "object", "properties": {"b": {"type": "integer"}}})
    assert a == Constraint("json_schema", a.spec) and hash(a) == hash(Constraint("json_schema", a.spec))
    assert Constraint.json_object().grammar()
    assert Constraint.regex("(yes|no)").grammar()
    p = SamplingParams(constraint=a)
    assert hash(p) == hash(SamplingParams(constraint=Constraint("json_schema", a.spec)))


def test_schema_property_order_is_kept() -> None:
    spec = Constraint.json_schema({"type": "object", "properties": {"z": {}, "a": {}}}).spec
    assert list(json.loads(spec)["properties"]) == ["z", "a"]


@pytest.mark.parametrize("kind, spec, words", [
    ("json_schema", '{"type": "nosuch"}', "invalid type"),
    ("json_schema", "{", "not valid json"),
    ("json_schema", "[1]", "object or a boolean"),
    ("regex", "[a-z", "unclosed character class"),
    ("regex", "", "non-empty"),
    ("xml", "", "kind must be one of"),
])
def test_bad_constraints_raise_naming_why(kind, spec, words) -> None:
    with pytest.raises(ValueError, match=f"(?i){words}"):
        Constraint(kind, spec)


def test_sampling_params_refuse_a_non_constraint() -> None:
    with pytest.raises(ValueError, match="constraint must be a Constraint"):
        SamplingParams(constraint="json")  # type: ignore[arg-type]


def test_the_wire_form_round_trips() -> None:
    s = Sampling(max_tokens=5, constraint=ConstraintSpec(kind="regex", spec="[0-9]+"))
    back = msgspec.json.decode(msgspec.json.encode(s), type=Sampling)
    assert back == s
    assert back.to_params().constraint == Constraint.regex("[0-9]+")
    assert Sampling().to_params().constraint is None
    with pytest.raises(ValueError, match="unclosed"):  # a worker answers 400 for this
        Sampling(constraint=ConstraintSpec(kind="regex", spec="(")).to_params()
