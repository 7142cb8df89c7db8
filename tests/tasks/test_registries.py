"""The scene format is generated from the registries: every registered loss term and
representation is accepted under its name, nothing else is, and log names of terms come from
their entries."""

import pytest
from pydantic import TypeAdapter, ValidationError

from diffworld.tasks.mpm.config import LossTermConfig
from diffworld.tasks.mpm.loss_terms import LOSS_TERMS, term_names
from diffworld.tasks.reconstruction.config import FLEXIBLE, RepresentationConfig
from diffworld.tasks.reconstruction.representations import REPRESENTATIONS


def _tags(union) -> set[str]:
    schema = TypeAdapter(union).json_schema()
    return set(schema["discriminator"]["mapping"])


def test_the_scene_sections_are_the_registries():
    assert _tags(LossTermConfig) == set(LOSS_TERMS.names())
    assert _tags(RepresentationConfig) == set(REPRESENTATIONS.names())
    assert FLEXIBLE == ("flexicubes", "gshell")
    with pytest.raises(ValidationError, match="'com', 'region'"):
        TypeAdapter(LossTermConfig).validate_python({"type": "nope", "body": "a"})


def test_term_log_names_come_from_the_entries():
    adapter = TypeAdapter(LossTermConfig)
    terms = [adapter.validate_python(t) for t in (
        {"type": "com", "body": "a", "target": [0, 0, 0]},
        {"type": "com", "body": "a", "target": [1, 0, 0]},
        {"type": "region", "body": "b", "lower": [0, 0, 0], "upper": [1, 1, 1]},
        {"type": "mixing", "bodies": ["a", "b"]},
        {"type": "python", "function": "math:dist"},
    )]
    assert term_names(terms) == ["com_a_0", "com_a_1", "region_b", "mixing_a_b", "python_dist"]
