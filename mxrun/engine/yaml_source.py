"""Load a YAML recipe safely and remember where every value came from.

Recipes are shared between teams and validated in CI, so they are untrusted input. This module is the only
place that parses YAML, and it bounds every cost before paying it:

1. size: the file is read up to :data:`MAX_BYTES`; larger files are refused without parsing;
2. text: NUL bytes and invalid UTF-8 are refused with the position of the first bad byte;
3. structure: the event stream (a streaming, non-recursive parse) is checked for nesting depth, event count
   and tags *before* any tree is built, so deep nesting cannot exhaust the stack and a tag that would build a
   Python object is reported instead of honoured;
4. construction: aliases are expanded with a budget, so "billion laughs" documents stop early; duplicate
   keys, non-string keys and merge keys (``<<``) are errors.

The result is plain JSON-like data plus a :class:`SourceMap` from JSON paths (tuples of keys and indices) to
positions, so later stages (JSON Schema, semantic checks) can report ``FILE:LINE:COL``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mxrun.engine.diagnostics import DiagnosticList, Position, RecipeError

MAX_BYTES = 256 * 1024
"""Largest recipe accepted. Real recipes are a few KB; the bound keeps parsing under a second."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and sequences accepted (a v1 recipe needs 5)."""
MAX_EVENTS = 200_000
"""Most parser events accepted; bounds time and memory for wide documents."""
MAX_EXPANDED_NODES = 100_000
"""Most nodes after alias expansion; stops alias bombs whose text is small but expansion exponential."""

JsonPath = tuple[str | int, ...]

_SAFE_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq")}

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class SourceMap:
    """Positions of the values (and of the keys) of one YAML document, by JSON path."""

    file: str
    values: dict[JsonPath, Position] = field(default_factory=dict)
    keys: dict[JsonPath, Position] = field(default_factory=dict)
    styles: dict[JsonPath, str | None] = field(default_factory=dict)
    """Scalar styles (``None`` plain, ``"'"``, ``'"'``, ``"|"``, ``">"``) for mapping offsets into a value."""

    def offset(self, path: JsonPath, index: int) -> Position:
        """Position of character ``index`` of the string value at ``path``.

        Exact for plain and quoted one-line scalars; for block scalars and double-quoted strings with escapes
        (where source columns and string offsets differ) it falls back to the start of the value.
        """
        start = self.value(path)
        style = self.styles.get(path)
        if style in (None, "'", '"') and path in self.values:
            return Position(start.file, start.line, start.column + index + (0 if style is None else 1))
        return start

    def value(self, path: JsonPath) -> Position:
        """Position of the value at ``path``, or of its nearest ancestor that has one."""
        return self._lookup(self.values, path)

    def key(self, path: JsonPath) -> Position:
        """Position of the mapping key that introduces ``path`` (falls back to the value's position)."""
        if path in self.keys:
            return self.keys[path]
        return self.value(path)

    def _lookup(self, table: dict[JsonPath, Position], path: JsonPath) -> Position:
        while path:
            if path in table:
                return table[path]
            path = path[:-1]
        return table.get((), Position(self.file, 1, 1))


@dataclass
class YamlDocument:
    """A parsed recipe file: its data, where each value came from, and its raw text (for fingerprints)."""

    file: str
    data: Any
    source_map: SourceMap


def _pos(file: str, mark: Any) -> Position:
    return Position(file, mark.line + 1, mark.column + 1)


def _position_of_offset(file: str, raw: bytes, offset: int) -> Position:
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    return Position(file, line, column)


def read_recipe_text(path: Path, label: str | None = None) -> tuple[str, str]:
    """Read ``path`` within the size limit and decode it; returns ``(label, text)``.

    Raises :class:`RecipeError` for a missing, unreadable, oversized or binary file.
    """
    label = label or str(path)
    start = Position(label)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise _fail("file-not-found", "no such file", start) from None
    except IsADirectoryError:
        raise _fail("not-a-file", "is a directory, not a recipe file", start) from None
    except OSError as exc:
        raise _fail("unreadable", f"cannot read the file: {exc.strerror or exc}", start) from None
    return label, decode_recipe_bytes(raw, label)


def decode_recipe_bytes(raw: bytes, label: str) -> str:
    """Check size and encoding of raw recipe bytes and return the text."""
    if len(raw) > MAX_BYTES:
        raise _fail(
            "too-large",
            f"file is larger than the {MAX_BYTES // 1024} KiB limit for a recipe",
            Position(label),
            "a recipe is a few KB of YAML; is this the right file?",
        )
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise _fail(
            "binary-file",
            "file contains a NUL byte; it looks binary, not a YAML recipe",
            _position_of_offset(label, raw, nul),
        )
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(
            "bad-encoding",
            "file is not valid UTF-8",
            _position_of_offset(label, raw, exc.start),
        ) from None


def load_yaml(text: str, label: str) -> YamlDocument:
    """Parse one YAML document from ``text`` with the bounds described in the module docstring."""
    if not text.strip() or all(
        not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        raise _fail("empty-file", "the recipe is empty", Position(label, 1, 1), "start with `version: 1`")
    _check_events(text, label)
    try:
        documents = list(yaml.compose_all(text, Loader=_Parser))
    except yaml.YAMLError as exc:  # already parsed once, but keep the guarantee of no traceback
        raise _yaml_error(exc, label, text) from None
    documents = [d for d in documents if d is not None]
    if not documents:
        raise _fail("empty-file", "the recipe is empty", Position(label, 1, 1), "start with `version: 1`")
    if len(documents) > 1:
        raise _fail(
            "multiple-documents",
            "the file holds more than one YAML document (`---`); a recipe is one document",
            _pos(label, documents[1].start_mark),
        )
    builder = _Builder(label)
    data = builder.build(documents[0], ())
    if builder.diagnostics.has_errors:
        raise RecipeError(builder.diagnostics.sorted())
    return YamlDocument(label, data, builder.source_map)


def _check_events(text: str, label: str) -> None:
    depth = 0
    count = 0
    try:
        for event in yaml.parse(text, Loader=_Parser):
            count += 1
            if count > MAX_EVENTS:
                raise _fail(
                    "too-complex",
                    f"the document has more than {MAX_EVENTS} YAML nodes",
                    _pos(label, event.start_mark),
                )
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _fail(
                        "too-deep",
                        f"nesting deeper than {MAX_DEPTH} levels",
                        _pos(label, event.start_mark),
                        "a recipe needs only a few levels; is this the right file?",
                    )
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                depth -= 1
            tag = getattr(event, "tag", None)
            if tag is not None and _explicit(event) and tag not in _SAFE_TAGS:
                raise _fail(
                    "yaml-tag",
                    f"YAML tag {tag!r} is not allowed in a recipe",
                    _pos(label, event.start_mark),
                    "recipes hold plain data only; remove the tag",
                )
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, label, text) from None


def _explicit(event: Any) -> bool:
    implicit = getattr(event, "implicit", True)
    if isinstance(implicit, tuple):  # scalars: (plain, quoted)
        return not any(implicit)
    return not implicit


def _yaml_error(exc: yaml.YAMLError, label: str, text: str = "") -> RecipeError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    position = _pos(label, mark) if mark is not None else Position(label)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    hint = None
    lines = text.splitlines()
    at_tab = mark is not None and mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]
    if at_tab or "\\t" in problem or "tab" in problem:
        hint = "YAML indentation must use spaces, not tabs"
    return _fail("yaml-syntax", message, position, hint)


def _fail(code: str, message: str, position: Position, hint: str | None = None) -> RecipeError:
    diagnostics = DiagnosticList()
    diagnostics.error(code, message, position, hint)
    return RecipeError(diagnostics.items)


class _Builder:
    """Turns a composed node graph into plain data, recording positions; expands aliases on a budget."""

    def __init__(self, label: str):
        self.label = label
        self.source_map = SourceMap(label)
        self.diagnostics = DiagnosticList()
        self.expanded = 0
        self._scalars = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: JsonPath) -> Any:
        self.expanded += 1
        if self.expanded > MAX_EXPANDED_NODES:
            raise _fail(
                "alias-bomb",
                f"aliases expand to more than {MAX_EXPANDED_NODES} nodes",
                _pos(self.label, node.start_mark),
                "remove the anchors and aliases (&name / *name)",
            )
        self.source_map.values[path] = _pos(self.label, node.start_mark)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]
        self.source_map.styles[path] = node.style
        if (node.style == '"' and "\\" in str(node.value)) or node.end_mark.line != node.start_mark.line:
            self.source_map.styles[path] = "escaped"
        return self._scalar(node)

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self._scalars.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            self.diagnostics.error(
                "yaml-value", f"cannot read value {node.value!r}: {exc}", _pos(self.label, node.start_mark)
            )
            return None

    def _mapping(self, node: yaml.MappingNode, path: JsonPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_seen: dict[str, Position] = {}
        for key_node, value_node in node.value:
            key_position = _pos(self.label, key_node.start_mark)
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.diagnostics.error(
                    "yaml-merge-key",
                    "YAML merge keys (<<) are not supported in recipes",
                    key_position,
                    "use `extends:` or a named scheme with `preset:` to share settings",
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                self.diagnostics.error(
                    "non-string-key",
                    f"mapping key {shown!r} must be a string",
                    key_position,
                    "quote it",
                )
                continue
            key = key_node.value
            if key in first_seen:
                before = first_seen[key]
                self.diagnostics.error(
                    "duplicate-key",
                    f"duplicate key {key!r} (first defined at line {before.line})",
                    key_position,
                    "YAML would silently keep only the last one",
                )
                continue
            first_seen[key] = key_position
            self.source_map.keys[(*path, key)] = key_position
            result[key] = self.build(value_node, (*path, key))
        return result
