"""Which rule decides a layer, and why: the matching semantics of a recipe in one place.

For a layer with name ``n`` and kind ``k``:
1. if any skip full-matches ``n`` (and admits ``k``), the layer is skipped: skips always win;
2. otherwise the FIRST rule, in recipe order, whose pattern full-matches ``n`` and whose ``kind`` admits
   ``k`` decides the scheme;
3. otherwise no rule applies and the layer stays unquantized.

:class:`Matcher` compiles all rule patterns into one RE2 set and all skip patterns into another, so one
name costs two automaton passes however many rules there are.
"""

from __future__ import annotations

from dataclasses import dataclass

from mxrun.engine.layers import LayerKind
from mxrun.engine.patterns import PatternSet
from mxrun.engine.recipe import Recipe, Rule, SkipRule


@dataclass(frozen=True)
class Explanation:
    """Every rule and skip that bears on one layer, and the outcome."""

    name: str
    kind: LayerKind
    skips: tuple[SkipRule, ...]
    """Skips whose pattern matches and whose kind admits the layer (any one skips it)."""
    matched: tuple[Rule, ...]
    """Rules whose pattern matches and whose kind admits the layer, in precedence order."""
    kind_filtered: tuple[Rule, ...]
    """Rules whose pattern matches but whose ``kind`` excludes this layer's kind."""
    scheme_summary: str = ""
    """What the winning rule's scheme computes (:meth:`~mxrun.engine.schemes.Scheme.describe`), if known."""

    @property
    def winner(self) -> Rule | None:
        """The rule that decides the scheme (``None`` if skipped or nothing matched)."""
        if self.skips or not self.matched:
            return None
        return self.matched[0]

    def lines(self) -> list[str]:
        """A human explanation, one line per rule or skip considered."""
        out = [f"{self.name} ({self.kind.value})"]
        for skip in self.skips:
            out.append(f"  skip     '{skip.pattern}' at {skip.origin}: matches; skips always win")
        for index, rule in enumerate(self.matched):
            if self.skips:
                verdict = "matches, but the layer is skipped"
            elif index == 0:
                verdict = f"matches first -> scheme {rule.scheme!r}"
            else:
                verdict = f"matches, but {self.matched[0].name!r} comes earlier (first match wins)"
            out.append(f"  rule     {rule.name!r} '{rule.pattern}' at {rule.origin}: {verdict}")
        for rule in self.kind_filtered:
            kinds = ", ".join(sorted(k.value for k in rule.kinds or ()))
            out.append(
                f"  rule     {rule.name!r} '{rule.pattern}' at {rule.origin}: name matches, but kind "
                f"{self.kind.value!r} is not in [{kinds}]"
            )
        if self.winner is not None and self.scheme_summary:
            out.append(f"  scheme   {self.winner.scheme!r}: {self.scheme_summary}")
        if not self.skips and not self.matched:
            out.append("  no rule matches: the layer stays unquantized")
        return out


class Matcher:
    """Matches layer names against one recipe's rules and skips."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        # One set for rules and skips: index < len(rules) is a rule, the rest are skips.
        self._patterns = PatternSet(
            [rule.pattern for rule in recipe.rules] + [s.pattern for s in recipe.skips]
        )
        self._n_rules = len(recipe.rules)

    def explain(self, name: str, kind: LayerKind) -> Explanation:
        rules = self.recipe.rules
        skips = self.recipe.skips
        n_rules = self._n_rules
        matched: list[Rule] = []
        filtered: list[Rule] = []
        skipped: list[SkipRule] = []
        for index in self._patterns.match(name):
            if index < n_rules:
                rule = rules[index]
                (matched if rule.admits(kind) else filtered).append(rule)
            elif skips[index - n_rules].admits(kind):
                skipped.append(skips[index - n_rules])
        summary = ""
        if matched and not skipped and matched[0].scheme in self.recipe.schemes:
            summary = self.recipe.schemes[matched[0].scheme].describe()
        return Explanation(name, kind, tuple(skipped), tuple(matched), tuple(filtered), summary)
