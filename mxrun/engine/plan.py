"""Resolve a recipe against a model's layers into a per-layer plan, and check the recipe against the model.

The plan is the contract between the recipe and everything after it: for each quantizable layer, the
scheme chosen (or why none was), and the rule or skip that decided it with its ``FILE:LINE``. It is computed
from :class:`~mxrun.engine.layers.Layer` values only, so a live module and its checkpoint give the same plan.

Model-aware checks (reported as diagnostics at the recipe's positions, so CI can gate a recipe change
against the checkpoints it is meant for):
- a rule or skip that matches no layer (the most reported failure of recipe tools: a typo that quantizes
  nothing);
- a rule that matches layers but never decides one (every match taken by an earlier rule or a skip);
- a fused group (q/k/v, gate/up, the experts of one MoE layer) split across schemes: an error naming the
  group and the rules involved, since serving engines run the group as one matmul;
- layers a scheme cannot serve, handled by the recipe's ``on_unsupported`` policy.

Entries that come from the built-in recipe library are exempt from the "matches nothing" warnings: they are
written to be generic across architectures (a router skip on a dense model is expected to match nothing).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from mxrun import resources
from mxrun.engine.diagnostics import Diagnostic, DiagnosticList, Position
from mxrun.engine.inventory import layers_from_source
from mxrun.engine.layers import Layer
from mxrun.engine.matching import Explanation, Matcher
from mxrun.engine.recipe import Recipe, Rule, SkipRule
from mxrun.engine.schemes import Scheme, UnsupportedPolicy, quantized_weight_bytes

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}
"""Bytes per element by the torch dtype names that :mod:`mxrun.engine.inventory` reports."""


class Decision(str, Enum):
    QUANTIZE = "quantize"
    SKIPPED = "skipped"
    """A skip entry matched."""
    UNMATCHED = "unmatched"
    """No rule matched: the layer stays in its original dtype."""
    UNSUPPORTED = "unsupported"
    """A rule chose a scheme that cannot serve this layer, and the policy is ``skip``."""


@dataclass(frozen=True)
class PlanEntry:
    layer: Layer
    decision: Decision
    scheme: Scheme | None
    rule: Rule | None
    """The rule that matched first (also set for UNSUPPORTED)."""
    skip: SkipRule | None
    reason: str

    @property
    def source(self) -> str:
        """``FILE:LINE:COL`` of the rule or skip that decided the layer (empty when none did)."""
        if self.skip is not None:
            return str(self.skip.origin)
        if self.rule is not None:
            return str(self.rule.origin)
        return ""

    @property
    def bytes_before(self) -> int:
        return self.layer.numel * _DTYPE_BYTES.get(self.layer.dtype, 2)

    @property
    def bytes_after(self) -> int:
        if self.decision is Decision.QUANTIZE and self.scheme is not None:
            return quantized_weight_bytes(self.scheme, self.layer.shape)
        return self.bytes_before

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer.name,
            "kind": self.layer.kind.value,
            "shape": list(self.layer.shape),
            "dtype": self.layer.dtype,
            "group": self.layer.group,
            "decision": self.decision.value,
            "scheme": self.scheme.name if self.scheme else None,
            "family": self.scheme.family.value
            if self.scheme and self.decision is Decision.QUANTIZE
            else None,
            "rule": self.rule.name if self.rule else None,
            "skip": self.skip.pattern if self.skip else None,
            "source": self.source,
            "reason": self.reason,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    entries: tuple[PlanEntry, ...]
    diagnostics: tuple[Diagnostic, ...] = field(default=())
    unmatched_rules: tuple[str, ...] = field(default=())
    """``name (FILE:LINE:COL)`` of each rule and skip that matched no layer (built-in ones too)."""

    @property
    def fingerprint(self) -> str:
        return self.recipe.fingerprint

    def entry(self, name: str) -> PlanEntry:
        for entry in self.entries:
            if entry.layer.name == name:
                return entry
        raise KeyError(name)

    def quantized(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.decision is Decision.QUANTIZE]

    def summary(self) -> dict[str, Any]:
        per_scheme: dict[str, int] = defaultdict(int)
        for entry in self.entries:
            key = (
                entry.scheme.name
                if entry.decision is Decision.QUANTIZE and entry.scheme
                else entry.decision.value
            )
            per_scheme[key] += 1
        return {
            "layers": len(self.entries),
            "quantized": sum(e.decision is Decision.QUANTIZE for e in self.entries),
            "by_scheme": dict(sorted(per_scheme.items())),
            "bytes_before": sum(e.bytes_before for e in self.entries),
            "bytes_after": sum(e.bytes_after for e in self.entries),
            "unmatched_rules": list(self.unmatched_rules),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "fingerprint": self.fingerprint,
            "summary": self.summary(),
            "layers": [entry.to_json() for entry in self.entries],
            "diagnostics": [d.to_json() for d in self.diagnostics],
        }


def _is_builtin(position: Position) -> bool:
    try:
        return Path(position.file).resolve().parent == resources.recipes_dir().resolve()
    except (OSError, FileNotFoundError):
        return False


def resolve(recipe: Recipe, source: Any) -> Plan:
    """Resolve ``recipe`` against a model: an ``nn.Module`` or a checkpoint path (headers only are read)."""
    return resolve_layers(recipe, layers_from_source(source))


def resolve_layers(recipe: Recipe, layers: Iterable[Layer]) -> Plan:
    """Decide every layer and run the model-aware checks; never raises for recipe/model mismatches."""
    matcher = Matcher(recipe)
    out = DiagnosticList()
    entries: list[PlanEntry] = []
    rule_hits: dict[int, int] = defaultdict(int)
    rule_wins: dict[int, int] = defaultdict(int)
    skip_hits: dict[int, int] = defaultdict(int)
    rule_index = {id(rule): i for i, rule in enumerate(recipe.rules)}
    skip_index = {id(skip): i for i, skip in enumerate(recipe.skips)}
    unsupported: dict[int, list[str]] = defaultdict(list)
    serve_cache: dict[tuple[str, tuple[int, ...]], str | None] = {}

    for layer in layers:
        why = matcher.explain(layer.name, layer.kind)
        for rule in why.matched:
            rule_hits[rule_index[id(rule)]] += 1
        for skip in why.skips:
            skip_hits[skip_index[id(skip)]] += 1
        entries.append(_decide(recipe, layer, why, rule_wins, rule_index, unsupported, serve_cache, out))

    _check_usage(recipe, rule_hits, rule_wins, skip_hits, out)
    entries = _demote_partly_unsupported_groups(entries, rule_index, unsupported)
    _check_groups(entries, out)
    for index, names in unsupported.items():
        rule = recipe.rules[index]
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        out.warning(
            "unsupported-layers",
            f"rule {rule.name!r}: scheme {rule.scheme!r} cannot serve {len(names)} layer(s), left unquantized: "
            f"{shown}",
            rule.pattern_origin,
        )
    unmatched = [f"rule {r.name} ({r.origin})" for i, r in enumerate(recipe.rules) if not rule_hits[i]]
    unmatched += [f"skip '{s.pattern}' ({s.origin})" for i, s in enumerate(recipe.skips) if not skip_hits[i]]
    return Plan(recipe, tuple(entries), tuple(out.sorted()), tuple(unmatched))


def _decide(
    recipe: Recipe,
    layer: Layer,
    why: Explanation,
    rule_wins: dict[int, int],
    rule_index: dict[int, int],
    unsupported: dict[int, list[str]],
    serve_cache: dict[tuple[str, tuple[int, ...]], str | None],
    out: DiagnosticList,
) -> PlanEntry:
    if why.skips:
        skip = why.skips[0]
        reason = skip.reason or f"skipped by {skip.pattern!r}"
        return PlanEntry(layer, Decision.SKIPPED, None, None, skip, reason)
    rule = why.winner
    if rule is None:
        return PlanEntry(layer, Decision.UNMATCHED, None, None, None, "no rule matches")
    rule_wins[rule_index[id(rule)]] += 1
    scheme = recipe.scheme_for(rule)
    key = (scheme.name, layer.shape)
    if key not in serve_cache:  # shapes repeat thousands of times in large models
        serve_cache[key] = scheme.cannot_serve(layer)
    problem = serve_cache[key]
    if problem is None:
        return PlanEntry(layer, Decision.QUANTIZE, scheme, rule, None, f"rule {rule.name!r}")
    if recipe.policy_for(scheme) is UnsupportedPolicy.ERROR:
        out.error(
            "unsupported-layer",
            f"layer {layer.name}: scheme {scheme.name!r} cannot serve it: {problem}",
            rule.pattern_origin,
            "exclude the layer with a skip or a narrower rule, or set `on_unsupported: skip`",
        )
    unsupported[rule_index[id(rule)]].append(layer.name)
    return PlanEntry(layer, Decision.UNSUPPORTED, scheme, rule, None, problem)


def _check_usage(
    recipe: Recipe,
    rule_hits: dict[int, int],
    rule_wins: dict[int, int],
    skip_hits: dict[int, int],
    out: DiagnosticList,
) -> None:
    for index, rule in enumerate(recipe.rules):
        if _is_builtin(rule.origin):
            continue
        if not rule_hits[index]:
            out.warning(
                "rule-matches-nothing",
                f"rule {rule.name!r} matches no layer of this model",
                rule.pattern_origin,
                "patterns full-match the whole layer name; prefix with '.*' to match a suffix",
            )
        elif not rule_wins[index]:
            out.warning(
                "rule-shadowed",
                f"rule {rule.name!r} matches {rule_hits[index]} layer(s), but earlier rules or skips decide "
                "all of them",
                rule.pattern_origin,
                "first match wins; move it above the rules that take its layers, or remove it",
            )
    for index, skip in enumerate(recipe.skips):
        if not skip_hits[index] and not _is_builtin(skip.origin):
            out.warning(
                "skip-matches-nothing",
                f"skip {skip.pattern!r} matches no layer of this model",
                skip.pattern_origin,
                "only Linear and MoE expert weights are layers; embeddings and norms are never quantized",
            )


def _demote_partly_unsupported_groups(
    entries: list[PlanEntry], rule_index: dict[int, int], unsupported: dict[int, list[str]]
) -> list[PlanEntry]:
    """If a scheme cannot serve one member of a fused group (and the policy is ``skip``), leave the whole group
    unquantized: serving engines run the group as one matmul, so quantizing only part of it is no plan.
    E.g. MXFP8 experts whose ``down_proj`` has in_features 48 also keep ``gate_up_proj`` unquantized."""
    blocked: dict[str, str] = {}
    for entry in entries:
        if entry.decision is Decision.UNSUPPORTED and entry.layer.group is not None:
            blocked.setdefault(entry.layer.group, entry.layer.name)
    if not blocked:
        return entries
    result = []
    for entry in entries:
        group = entry.layer.group
        if entry.decision is Decision.QUANTIZE and group in blocked and entry.rule is not None:
            reason = f"its fused group {group} has a member the scheme cannot serve ({blocked[group]})"
            entry = PlanEntry(entry.layer, Decision.UNSUPPORTED, entry.scheme, entry.rule, None, reason)
            unsupported[rule_index[id(entry.rule)]].append(entry.layer.name)
        result.append(entry)
    return result


def _check_groups(entries: list[PlanEntry], out: DiagnosticList) -> None:
    """A fused group must resolve to one outcome: one scheme for all members, or all unquantized."""
    groups: dict[str, list[PlanEntry]] = defaultdict(list)
    for entry in entries:
        if entry.layer.group is not None:
            groups[entry.layer.group].append(entry)
    for group, members in groups.items():
        outcomes = {
            (e.scheme.name if e.decision is Decision.QUANTIZE and e.scheme else "unquantized")
            for e in members
        }
        if len(outcomes) <= 1:
            continue
        deciders = []
        for e in members:
            what = f"{e.scheme.name if e.decision is Decision.QUANTIZE and e.scheme else e.decision.value}"
            by = f" by {e.source}" if e.source else ""
            deciders.append(f"{e.layer.name} -> {what}{by}")
        anchor = next((e for e in members if e.rule is not None or e.skip is not None), members[0])
        position = (
            anchor.rule.pattern_origin
            if anchor.rule is not None
            else anchor.skip.pattern_origin
            if anchor.skip is not None
            else Position(anchor.layer.name)
        )
        out.error(
            "split-group",
            f"fused group {group} is split across schemes ({', '.join(sorted(outcomes))}): "
            + "; ".join(sorted(set(deciders))[:6]),
            position,
            "serving engines run the group as one matmul; give all its members the same scheme",
        )
