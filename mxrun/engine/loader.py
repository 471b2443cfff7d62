"""Load a recipe file (or a built-in recipe by name) into a validated :class:`Recipe`, collecting ALL problems.

Stages, per file: safe YAML with positions (:mod:`mxrun.engine.yaml_source`) -> format version dispatch ->
JSON Schema (:mod:`mxrun.engine.schema_check`) -> semantic checks of the file (scheme definitions, regex
syntax, kinds) -> ``extends`` (the parent is loaded the same way, recursively) -> merge -> checks of the
merged recipe (scheme references, duplicate and shadowed rules, unused schemes) -> :class:`Recipe` and its
fingerprint.

``extends`` merge, in one place:
- rules: this file's rules first, then the parent's (first match wins, so the child's rules take precedence);
- schemes: the parent's, then this file's; a scheme defined in both is replaced whole by the child's;
- skip: the parent's and this file's together (skips always win, so their order does not matter);
- on_unsupported: this file's if set, else the parent's, else ``skip``;
- metadata (name, description, owner, tags) is this file's own and is not inherited.

Format versions: each file declares its own ``version``; :data:`FORMAT_READERS` maps a version to the reader
that turns that version's YAML into this module's intermediate form. A later version adds a reader (and a
migration) next to v1's; files of both versions can then extend each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxrun import resources
from mxrun.engine.diagnostics import Diagnostic, DiagnosticList, Position, RecipeError, Severity
from mxrun.engine.layers import LayerKind
from mxrun.engine.patterns import PatternError, check_pattern
from mxrun.engine.recipe import Recipe, Rule, SkipRule
from mxrun.engine.schema_check import check_against_schema, suggest
from mxrun.engine.schemes import PRESETS, Scheme, UnsupportedPolicy, build_scheme, preset_scheme
from mxrun.engine.yaml_source import SourceMap, YamlDocument, load_yaml, read_recipe_text

_UNIVERSAL_PATTERNS = {".*", ".+", "(.*)", "(.+)", "(?s).*", "(?s).+", "^.*$", "^.+$", ".*.*"}
"""Patterns that match every (non-empty) name; anything after such a rule is shadowed."""


@dataclass
class FileRecipe:
    """One file's contribution before merging (the format-independent intermediate form)."""

    label: str
    path: Path | None
    version: int
    name: str | None
    description: str | None
    owner: str | None
    tags: tuple[str, ...]
    extends: str | None
    extends_position: Position | None
    on_unsupported: UnsupportedPolicy | None
    schemes: dict[str, Scheme] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    rule_scheme_positions: list[Position] = field(default_factory=list)
    skips: list[SkipRule] = field(default_factory=list)
    scheme_positions: dict[str, Position] = field(default_factory=dict)
    declared_schemes: set[str] = field(default_factory=set)
    """Every scheme name the file defines, valid or not (an invalid one is reported once, where defined)."""


@dataclass
class LoadResult:
    """What loading produced: the recipe (``None`` if any error) and every diagnostic, sorted."""

    recipe: Recipe | None
    diagnostics: list[Diagnostic]

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.WARNING]


def _parse_kinds(value: Any) -> frozenset[LayerKind] | None:
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    return frozenset(LayerKind(v) for v in values)


def _read_v1(doc: YamlDocument, path: Path | None, out: DiagnosticList) -> FileRecipe:
    """Schema-check a version-1 document and build its :class:`FileRecipe` from the parts that are valid."""
    data, smap = doc.data, doc.source_map
    check_against_schema(data, resources.load_schema(1), smap, out)

    def text(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) else None

    policy = data.get("on_unsupported")
    tags = data.get("tags")
    file = FileRecipe(
        label=doc.file,
        path=path,
        version=1,
        name=text("name"),
        description=text("description"),
        owner=text("owner"),
        tags=tuple(t for t in tags if isinstance(t, str)) if isinstance(tags, list) else (),
        extends=text("extends"),
        extends_position=smap.value(("extends",)) if "extends" in data else None,
        on_unsupported=UnsupportedPolicy(policy) if policy in ("skip", "error") else None,
    )
    _read_schemes(data, smap, file, out)
    _read_rules(data, smap, file, out)
    _read_skips(data, smap, file, out)
    return file


def _read_schemes(data: dict[str, Any], smap: SourceMap, file: FileRecipe, out: DiagnosticList) -> None:
    schemes = data.get("schemes")
    if not isinstance(schemes, dict):
        return
    for name, spec in schemes.items():
        if not isinstance(spec, dict):
            continue
        position = smap.key(("schemes", name))
        if name in PRESETS:
            out.error(
                "scheme-shadows-preset",
                f"scheme {name!r} has the name of a built-in preset",
                position,
                f"give it a new name and set `preset: {name}` to start from the preset",
            )
            continue
        file.declared_schemes.add(name)
        if spec.get("preset") not in (None, *PRESETS):
            continue  # the schema reports the unknown preset, with a suggestion
        try:
            scheme, problems = build_scheme(name, spec)
        except (ValueError, TypeError, KeyError, IndexError):
            continue  # values the schema already reported
        for sub_path, message in problems:
            out.error("bad-scheme", f"scheme {name!r}: {message}", smap.value(("schemes", name, *sub_path)))
        if scheme is not None:
            file.schemes[name] = scheme
            file.scheme_positions[name] = position


def _check_pattern_at(pattern: str, smap: SourceMap, path: tuple[Any, ...], out: DiagnosticList) -> bool:
    try:
        check_pattern(pattern)
    except PatternError as exc:
        where = smap.offset(path, exc.offset) if exc.offset is not None else smap.value(path)
        out.error("bad-regex", str(exc), where)
        return False
    return True


def _read_rules(data: dict[str, Any], smap: SourceMap, file: FileRecipe, out: DiagnosticList) -> None:
    rules = data.get("rules")
    if not isinstance(rules, list):
        return
    for index, entry in enumerate(rules):
        if not isinstance(entry, dict):
            continue
        pattern, scheme = entry.get("match"), entry.get("scheme")
        if not isinstance(pattern, str) or not isinstance(scheme, str) or not pattern:
            continue
        if not _check_pattern_at(pattern, smap, ("rules", index, "match"), out):
            continue
        try:
            kinds = _parse_kinds(entry.get("kind"))
        except ValueError:
            continue  # reported by the schema
        name = entry.get("name") if isinstance(entry.get("name"), str) else f"rules[{index}]"
        file.rules.append(
            Rule(
                name=name,
                pattern=pattern,
                scheme=scheme,
                kinds=kinds,
                origin=smap.value(("rules", index)),
                pattern_origin=smap.value(("rules", index, "match")),
            )
        )
        file.rule_scheme_positions.append(smap.value(("rules", index, "scheme")))


def _read_skips(data: dict[str, Any], smap: SourceMap, file: FileRecipe, out: DiagnosticList) -> None:
    skips = data.get("skip")
    if not isinstance(skips, list):
        return
    for index, entry in enumerate(skips):
        if isinstance(entry, str):
            pattern, kinds_value, reason, path = entry, None, None, ("skip", index)
        elif isinstance(entry, dict) and isinstance(entry.get("match"), str):
            pattern, kinds_value = entry["match"], entry.get("kind")
            reason = entry.get("reason") if isinstance(entry.get("reason"), str) else None
            path = ("skip", index, "match")
        else:
            continue
        if not pattern or not _check_pattern_at(pattern, smap, path, out):
            continue
        try:
            kinds = _parse_kinds(kinds_value)
        except ValueError:
            continue
        file.skips.append(
            SkipRule(
                pattern, kinds, reason, origin=smap.value(("skip", index)), pattern_origin=smap.value(path)
            )
        )


FORMAT_READERS: Mapping[int, Callable[[YamlDocument, Path | None, DiagnosticList], FileRecipe]] = {
    1: _read_v1
}
"""Recipe format versions this mxrun reads, and the reader for each."""


def supported_versions() -> list[int]:
    return sorted(FORMAT_READERS)


def _read_file(path: Path, label: str, out: DiagnosticList) -> FileRecipe | None:
    try:
        label, text = read_recipe_text(path, label)
        doc = load_yaml(text, label)
    except RecipeError as exc:
        out.extend(exc.diagnostics)
        return None
    if not isinstance(doc.data, dict):
        out.error(
            "not-a-mapping",
            f"a recipe is a mapping of keys (version, name, rules, ...), not {type(doc.data).__name__}",
            doc.source_map.value(()),
        )
        return None
    if "version" not in doc.data:
        out.error(
            "missing-version",
            "the recipe has no `version`",
            Position(label, 1, 1),
            f"add `version: {supported_versions()[-1]}` at the top",
        )
        return None
    version = doc.data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version not in FORMAT_READERS:
        versions = ", ".join(str(v) for v in supported_versions())
        out.error(
            "unsupported-version",
            f"unsupported recipe version {version!r}; this mxrun reads version {versions}",
            doc.source_map.value(("version",)),
            "upgrade mxrun to read newer recipes" if isinstance(version, int) and version > 1 else None,
        )
        return None
    return FORMAT_READERS[version](doc, path, out)


def _display(path: Path) -> str:
    """How a file is named in diagnostics: relative to the working directory when it is below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("..") else relative


def resolve_reference(reference: str, base_dir: Path | None = None) -> Path | None:
    """A recipe reference to a file: an existing path (relative to ``base_dir``) or a built-in name."""
    candidate = Path(reference) if base_dir is None else base_dir / reference
    if candidate.is_file():
        return candidate
    looks_like_path = os.sep in reference or "/" in reference or reference.endswith((".yaml", ".yml"))
    if not looks_like_path:
        builtin = resources.builtin_recipe_path(reference)
        if builtin is not None:
            return builtin
    return None


def _resolve_chain(
    path: Path, label: str, out: DiagnosticList, chain: tuple[Path, ...]
) -> list[FileRecipe] | None:
    """Read ``path`` and its ancestors; returns ``[file, parent, grandparent, ...]`` or ``None`` on error."""
    file = _read_file(path, label, out)
    if file is None:
        return None
    if file.extends is None:
        return [file]
    assert file.extends_position is not None
    parent_path = resolve_reference(file.extends, path.parent)
    if parent_path is None:
        names = ", ".join(resources.builtin_recipe_names())
        out.error(
            "extends-not-found",
            f"extends {file.extends!r}: no such file (relative to {_display(path.parent) or '.'}) "
            "or built-in recipe",
            file.extends_position,
            f"built-in recipes: {names}",
        )
        return None
    resolved = parent_path.resolve()
    if resolved in chain or resolved == path.resolve():
        loop = " -> ".join(_display(p) for p in (*chain, path.resolve(), resolved))
        out.error("extends-cycle", f"extends cycle: {loop}", file.extends_position)
        return None
    errors_before = sum(d.severity is Severity.ERROR for d in out.items)
    ancestors = _resolve_chain(parent_path, _display(parent_path), out, (*chain, path.resolve()))
    if ancestors is None:
        if sum(d.severity is Severity.ERROR for d in out.items) > errors_before and not any(
            d.code == "extends-cycle" for d in out.items
        ):
            out.error(
                "extends-invalid",
                f"the recipe it extends, {file.extends!r}, has errors (above)",
                file.extends_position,
            )
        return None
    return [file, *ancestors]


def _merge(files: list[FileRecipe], out: DiagnosticList) -> Recipe | None:
    """Merge ``[child, parent, ...]`` per the module docstring and check the merged recipe."""
    child = files[0]
    schemes: dict[str, Scheme] = {}
    scheme_positions: dict[str, Position] = {}
    for file in reversed(files):
        schemes.update(file.schemes)
        scheme_positions.update(file.scheme_positions)
    rules: list[Rule] = []
    scheme_refs: list[Position] = []
    for file in files:
        rules.extend(file.rules)
        scheme_refs.extend(file.rule_scheme_positions)
    skips = [skip for file in reversed(files) for skip in file.skips]
    policy = next((f.on_unsupported for f in files if f.on_unsupported is not None), UnsupportedPolicy.SKIP)

    resolved_schemes: dict[str, Scheme] = dict(schemes)
    declared = set().union(*(f.declared_schemes for f in files))
    for rule, where in zip(rules, scheme_refs, strict=True):
        if rule.scheme in resolved_schemes or rule.scheme in declared:
            continue
        if rule.scheme in PRESETS:
            resolved_schemes[rule.scheme] = preset_scheme(rule.scheme)
            continue
        known = sorted(set(schemes) | set(PRESETS))
        out.error(
            "unknown-scheme",
            f"rule {rule.name!r} names scheme {rule.scheme!r}, which is neither defined in `schemes` nor a "
            "built-in preset",
            where,
            suggest(rule.scheme, known) or f"known: {', '.join(known)}",
        )
    _check_rule_order(rules, skips, out)
    used = {rule.scheme for rule in rules}
    for name, where in scheme_positions.items():
        if name not in used and where.file == child.label:
            out.warning("unused-scheme", f"scheme {name!r} is defined but no rule uses it", where)
    if not rules and not out.has_errors:
        out.warning(
            "no-rules",
            "the recipe has no rules: it quantizes nothing",
            Position(child.label, 1, 1),
            "add a rule such as `{match: '.*', scheme: mxfp8}`",
        )
    if out.has_errors or child.name is None or child.description is None:
        return None
    return Recipe(
        version=child.version,
        name=child.name,
        description=child.description,
        schemes=resolved_schemes,
        rules=tuple(rules),
        skips=tuple(skips),
        on_unsupported=policy,
        owner=child.owner,
        tags=child.tags,
        files=tuple(f.label for f in files),
    )


def _check_rule_order(rules: list[Rule], skips: list[SkipRule], out: DiagnosticList) -> None:
    """Warn about rules that can never decide a layer: duplicates, and rules after a catch-all.

    This is the check that needs no model. Against a model, :mod:`mxrun.engine.plan` also reports rules
    that match nothing and rules whose every match an earlier rule or a skip took.
    """
    for index, rule in enumerate(rules):
        for earlier in rules[:index]:
            covers_kinds = earlier.kinds is None or (rule.kinds is not None and rule.kinds <= earlier.kinds)
            if not covers_kinds:
                continue
            if earlier.pattern == rule.pattern:
                out.warning(
                    "duplicate-rule",
                    f"rule {rule.name!r} repeats the pattern of rule {earlier.name!r} ({earlier.origin}); "
                    "it can never decide a layer",
                    rule.pattern_origin,
                )
                break
            if earlier.pattern in _UNIVERSAL_PATTERNS:
                out.warning(
                    "shadowed-rule",
                    f"rule {rule.name!r} is shadowed: rule {earlier.name!r} ({earlier.origin}) matches every "
                    "name first",
                    rule.pattern_origin,
                    "first match wins; move the more specific rule up",
                )
                break
        else:
            for skip in skips:
                covers_kinds = skip.kinds is None or (rule.kinds is not None and rule.kinds <= skip.kinds)
                if covers_kinds and (skip.pattern == rule.pattern or skip.pattern in _UNIVERSAL_PATTERNS):
                    out.warning(
                        "skipped-rule",
                        f"rule {rule.name!r} can never apply: the skip at {skip.origin} matches the same "
                        "layers, and skips always win",
                        rule.pattern_origin,
                    )
                    break


def load_recipe(reference: str | os.PathLike[str]) -> LoadResult:
    """Load a recipe by path or built-in name; never raises for bad input (see ``LoadResult``)."""
    out = DiagnosticList()
    text = os.fspath(reference)
    path = resolve_reference(text)
    if path is None and Path(text).is_dir():
        out.error(
            "not-a-file",
            "is a directory, not a recipe file",
            Position(text),
            "pass the recipe files, e.g. recipes/*.yaml",
        )
        return LoadResult(None, out.sorted())
    if path is None:
        names = ", ".join(resources.builtin_recipe_names())
        out.error(
            "recipe-not-found",
            "no such recipe file or built-in recipe",
            Position(text),
            f"built-in recipes: {names}",
        )
        return LoadResult(None, out.sorted())
    label = text if Path(text).is_file() else _display(path)
    files = _resolve_chain(path, label, out, ())
    recipe = _merge(files, out) if files is not None else None
    return LoadResult(recipe, out.sorted())


def load_recipe_or_raise(reference: str | os.PathLike[str]) -> Recipe:
    """Like :func:`load_recipe` but raises :class:`RecipeError` when the recipe has errors."""
    result = load_recipe(reference)
    if result.recipe is None:
        raise RecipeError(result.diagnostics)
    return result.recipe
