"""The validated recipe: frozen values, independent of YAML and of which file each part came from.

A :class:`Recipe` is what :func:`mxrun.engine.loader.load_recipe` returns after parsing, schema and semantic
checks and ``extends`` merging. Each rule keeps the ``FILE:LINE`` it was written at, so a plan can say which
line of which file decided a layer.

The fingerprint is the sha256 of :meth:`Recipe.canonical`, a JSON form holding everything that can change a
plan or the numerics (resolved schemes, rule patterns/kinds/schemes in order, skip patterns/kinds, the
policy, the format version) and nothing that cannot (recipe and rule names, descriptions, schemes no rule uses, comments, formatting, key order,
which file of an ``extends`` chain a rule came from).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from mxrun.engine.diagnostics import Position
from mxrun.engine.layers import LayerKind
from mxrun.engine.schemes import Scheme, UnsupportedPolicy


def _kinds_json(kinds: frozenset[LayerKind] | None) -> list[str] | None:
    return None if kinds is None else sorted(k.value for k in kinds)


@dataclass(frozen=True)
class Rule:
    """A targeting rule: layers whose name full-matches ``pattern`` (and whose kind is in ``kinds``, if set)
    get ``scheme``, unless an earlier rule or a skip took them first."""

    name: str
    pattern: str
    scheme: str
    kinds: frozenset[LayerKind] | None = None
    origin: Position = field(default=Position("<memory>"), compare=False)
    """Where the rule was written (``FILE:LINE:COL`` of its mapping)."""
    pattern_origin: Position = field(default=Position("<memory>"), compare=False)

    def admits(self, kind: LayerKind) -> bool:
        return self.kinds is None or kind in self.kinds

    def canonical(self) -> dict[str, Any]:
        return {"match": self.pattern, "kind": _kinds_json(self.kinds), "scheme": self.scheme}


@dataclass(frozen=True)
class SkipRule:
    """A skip entry; skips win over every rule."""

    pattern: str
    kinds: frozenset[LayerKind] | None = None
    reason: str | None = None
    origin: Position = field(default=Position("<memory>"), compare=False)
    pattern_origin: Position = field(default=Position("<memory>"), compare=False)

    def admits(self, kind: LayerKind) -> bool:
        return self.kinds is None or kind in self.kinds

    def canonical(self) -> dict[str, Any]:
        return {"match": self.pattern, "kind": _kinds_json(self.kinds)}


@dataclass(frozen=True)
class Recipe:
    """A fully resolved recipe (after ``extends``). ``rules`` are in precedence order."""

    version: int
    name: str
    description: str
    schemes: Mapping[str, Scheme]
    rules: tuple[Rule, ...]
    skips: tuple[SkipRule, ...]
    on_unsupported: UnsupportedPolicy = UnsupportedPolicy.SKIP
    owner: str | None = None
    tags: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    """The files it was read from, the recipe itself first, then its ``extends`` chain."""

    def scheme_for(self, rule: Rule) -> Scheme:
        return self.schemes[rule.scheme]

    def policy_for(self, scheme: Scheme) -> UnsupportedPolicy:
        return scheme.on_unsupported or self.on_unsupported

    def canonical(self) -> dict[str, Any]:
        """Everything that can change a plan or the numerics, in a stable JSON form."""
        used = sorted({rule.scheme for rule in self.rules})
        return {
            "format": "mxrun-recipe",
            "version": self.version,
            "on_unsupported": self.on_unsupported.value,
            "schemes": {name: self.schemes[name].to_json() for name in used},
            "rules": [rule.canonical() for rule in self.rules],
            "skip": [skip.canonical() for skip in self.skips],
        }

    @cached_property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the canonical JSON (sorted keys, no whitespace, UTF-8)."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """The resolved recipe for reports and exported checkpoints (metadata + canonical form)."""
        return {
            "name": self.name,
            "description": self.description,
            "owner": self.owner,
            "tags": list(self.tags),
            "files": list(self.files),
            "fingerprint": self.fingerprint,
            "resolved": self.canonical(),
            "rules": [
                {**rule.canonical(), "name": rule.name, "source": str(rule.origin)} for rule in self.rules
            ],
            "skip": [
                {**skip.canonical(), "reason": skip.reason, "source": str(skip.origin)} for skip in self.skips
            ],
        }
