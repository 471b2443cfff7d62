"""The published schema: valid draft 2020-12, documented, closed, and in step with the engine's enums."""

import json
from collections.abc import Iterator
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from mxrun import resources
from mxrun.engine.layers import LayerKind
from mxrun.engine.loader import load_recipe
from mxrun.engine.schemes import PRESETS

SCHEMA = resources.load_schema(1)


def _objects(node: Any, path: str = "#") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield path, node
        for key, value in node.items():
            yield from _objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _objects(value, f"{path}/{index}")


def test_schema_is_valid_2020_12_with_id() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$id"].endswith("recipe.v1.schema.json")


def test_every_object_is_closed_and_every_property_described() -> None:
    objects = list(_objects(SCHEMA))
    assert len(objects) >= 6
    for path, node in objects:
        assert node.get("additionalProperties") is False or "additionalProperties" in node, path
        for name, prop in node.get("properties", {}).items():
            assert prop.get("description"), f"{path}/properties/{name} has no description"


def test_enums_match_the_engine() -> None:
    defs = SCHEMA["$defs"]
    assert set(defs["scheme"]["properties"]["preset"]["enum"]) == set(PRESETS)
    assert set(defs["kind"]["enum"]) == {k.value for k in LayerKind}


def test_builtin_recipes_validate_against_the_schema_and_load_cleanly() -> None:
    names = resources.builtin_recipe_names()
    assert {"fp8-dynamic", "fp8-channel", "fp8-block", "mxfp8", "mixed-moe"} <= set(names)
    validator = Draft202012Validator(SCHEMA)
    for name in names:
        path = resources.builtin_recipe_path(name)
        data = yaml.safe_load(path.read_text())
        assert list(validator.iter_errors(data)) == [], name
        assert data["name"] == name  # usable by the name it is listed under
        result = load_recipe(name)
        assert result.recipe is not None and result.diagnostics == [], (name, result.diagnostics)
        assert path.read_text().lstrip().startswith("# yaml-language-server: $schema=")


def test_cli_schema_output_is_the_file(tmp_path) -> None:
    from click.testing import CliRunner

    from mxrun.cli import main

    out = CliRunner().invoke(main, ["schema"])
    assert out.exit_code == 0
    assert json.loads(out.output) == SCHEMA
