"""JSON Schema validation of a parsed recipe, reported as positioned, human-sized diagnostics.

jsonschema finds the problems; this module turns each into one line a person can act on: the key or value it
is about (``FILE:LINE:COL`` from the YAML source map), what was expected, and for misspelt keys or enum values
the closest valid spelling.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from mxrun.engine.diagnostics import DiagnosticList
from mxrun.engine.yaml_source import JsonPath, SourceMap

_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def suggest(word: str, choices: Iterable[str]) -> str | None:
    """``did you mean 'x'?`` for the closest choice, or ``None`` if nothing is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _where(path: Iterable[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the recipe"


def check_against_schema(
    data: Any, schema: dict[str, Any], source_map: SourceMap, out: DiagnosticList
) -> None:
    """Append one diagnostic per schema violation in ``data`` to ``out``."""
    validator = Draft202012Validator(schema)
    for error in validator.iter_errors(data):
        _report(error, source_map, out)


def _report(error: ValidationError, source_map: SourceMap, out: DiagnosticList) -> None:
    path: JsonPath = tuple(error.absolute_path)
    kind = error.validator
    where = _where(path)
    if kind == "oneOf" and error.context:
        # Pick the alternative the value was closest to (e.g. a skip mapping with a typo, not "not a string"):
        # a branch whose type the value has, so leave out the branches that refuse the value's own type (an
        # integer field written as a string inside a mapping is that field's error, not "must be null").
        candidates = [e for e in error.context if e.validator != "type" or e.relative_path]
        candidates = candidates or list(error.context)
        _report(best_match(candidates), source_map, out)
        return
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        for key in error.instance:
            if key not in allowed:
                out.error(
                    "unknown-key",
                    f"unknown key {key!r} in {where}",
                    source_map.key((*path, key)),
                    suggest(key, allowed) or f"allowed keys: {', '.join(sorted(allowed))}",
                )
        return
    if kind == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        for key in missing:
            out.error("missing-key", f"{where} is missing the required key {key!r}", source_map.value(path))
        return
    if kind == "propertyNames":
        name = error.instance
        out.error(
            "bad-name",
            f"invalid name {name!r} in {where}: use letters, digits, '_', '-' and '.', starting with a "
            "letter or '_'",
            source_map.key((*path, name)) if isinstance(name, str) else source_map.value(path),
        )
        return
    position = source_map.value(path)
    if kind == "type":
        expected = error.validator_value
        expected_list = expected if isinstance(expected, list) else [expected]
        wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in expected_list)
        out.error("wrong-type", f"{where} must be {wanted}, not {_describe(error.instance)}", position)
    elif kind == "enum":
        choices = [str(c) for c in error.validator_value]
        hint = suggest(str(error.instance), choices) if isinstance(error.instance, str) else None
        out.error(
            "bad-value",
            f"{where} is {error.instance!r}; expected one of: {', '.join(choices)}",
            position,
            hint,
        )
    elif kind == "const":
        out.error("bad-value", f"{where} must be {error.validator_value!r}, not {error.instance!r}", position)
    elif kind == "pattern":
        out.error(
            "bad-value", f"{where} {error.instance!r} does not match {error.validator_value!r}", position
        )
    elif kind in ("minLength", "minItems") and error.validator_value == 1:
        out.error("empty-value", f"{where} must not be empty", position)
    elif kind in ("minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum"):
        bound = {
            "minLength": "at least {} characters",
            "maxLength": "at most {} characters",
            "minItems": "at least {} items",
            "maxItems": "at most {} items",
            "minimum": "at least {}",
            "maximum": "at most {}",
        }[kind].format(error.validator_value)
        out.error("out-of-range", f"{where} must be {bound}", position)
    elif kind == "uniqueItems":
        out.error("duplicate-item", f"{where} lists an item twice", position)
    else:
        out.error("schema", f"{where}: {error.message}", position)
