"""Layer-name patterns that cannot hang the engine.

Recipes come from other teams, so their regexes are untrusted. Matching uses RE2 (the ``google-re2``
binding), whose automaton runs in time linear in the name's length whatever the pattern; catastrophic
backtracking cannot happen. RE2 has no look-around or back-references; a pattern that needs them is refused
with a clear message. Python's ``re`` parses each pattern first only to report syntax errors with the exact
character offset (its parser, unlike its matcher, does no backtracking).

All patterns FULL-match: ``q_proj`` matches only the name ``q_proj``; write ``.*q_proj`` to match a suffix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import re2

MAX_PATTERN_LENGTH = 1000
"""Longest pattern accepted (the schema says the same)."""
_RE2_MAX_MEM = 8 << 20
"""Memory budget of one compiled pattern or set; larger programs are refused instead of built."""


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # we report errors ourselves, with positions
    options.max_mem = _RE2_MAX_MEM
    return options


class PatternError(ValueError):
    """A pattern that cannot be used. ``offset`` is the 0-based character in the pattern, if known."""

    def __init__(self, message: str, offset: int | None = None):
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class CompiledPattern:
    text: str
    _compiled: object

    def fullmatch(self, name: str) -> bool:
        return self._compiled.fullmatch(name) is not None  # type: ignore[attr-defined]


def compile_pattern(text: str) -> CompiledPattern:
    """Compile one pattern for full matching; raises :class:`PatternError` with an offset when possible."""
    check_pattern(text)
    return CompiledPattern(text, re2.compile(text, options=_options()))


def check_pattern(text: str) -> None:
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(f"pattern is longer than {MAX_PATTERN_LENGTH} characters")
    try:
        re.compile(text)
    except re.error as exc:
        raise PatternError(f"invalid regex: {exc.msg}", exc.pos) from None
    except (OverflowError, RecursionError):
        raise PatternError("invalid regex: too complex") from None
    try:
        re2.compile(text, options=_options())
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PatternError(
            f"regex not supported by the linear-time matcher (RE2): {detail}; look-around and "
            "back-references are not available"
        ) from None


class PatternSet:
    """Many patterns matched against a name in one pass; returns the indices of all that full-match.

    This is what makes resolution cost linear in layers x rules with a small constant: RE2 runs one
    combined automaton per name instead of one regex per rule.
    """

    def __init__(self, patterns: Sequence[str]):
        self.patterns = tuple(patterns)
        self._set = re2.Set.FullMatchSet(_options())
        for text in self.patterns:
            check_pattern(text)
            self._set.Add(text)
        self._empty = not self.patterns
        if not self._empty:
            try:
                self._set.Compile()
            except re2.error:
                raise PatternError(
                    "the recipe's patterns together exceed the matcher's memory budget"
                ) from None

    def match(self, name: str) -> list[int]:
        """Indices (ascending) of the patterns that full-match ``name``."""
        if self._empty:
            return []
        found = self._set.Match(name)
        if not found:
            return []
        return found if len(found) == 1 else sorted(found)
