"""Diagnostics: every problem the engine finds, with the place in the recipe it comes from.

Validation collects *all* problems instead of stopping at the first, so that one CI run shows everything
to fix. A :class:`Diagnostic` prints as ``FILE:LINE:COL: severity: message`` (1-based line and column, the
form editors and CI annotators understand). Code that cannot go on raises :class:`RecipeError`, which
carries the diagnostics found so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, order=True)
class Position:
    """A place in a source file; ``line`` and ``column`` are 1-based (0 means unknown)."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line <= 0:
            return self.file
        return f"{self.file}:{self.line}:{max(self.column, 1)}"


@dataclass(frozen=True)
class Diagnostic:
    """One problem. ``code`` is a stable short id (e.g. ``unknown-key``) that tools and tests can key on."""

    severity: Severity
    code: str
    message: str
    position: Position
    hint: str | None = None

    def format(self) -> str:
        text = f"{self.position}: {self.severity.value}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.position.file,
            "line": self.position.line,
            "column": self.position.column,
            "severity": self.severity.value,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
        }

    def as_error(self) -> Diagnostic:
        """The same diagnostic promoted to an error (``--strict``)."""
        return Diagnostic(Severity.ERROR, self.code, self.message, self.position, self.hint)


@dataclass
class DiagnosticList:
    """An ordered collection that stages append to; kept sorted by position when reported."""

    items: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, position: Position, hint: str | None = None) -> None:
        self.items.append(Diagnostic(Severity.ERROR, code, message, position, hint))

    def warning(self, code: str, message: str, position: Position, hint: str | None = None) -> None:
        self.items.append(Diagnostic(Severity.WARNING, code, message, position, hint))

    def extend(self, other: list[Diagnostic]) -> None:
        self.items.extend(other)

    @property
    def has_errors(self) -> bool:
        return any(d.severity is Severity.ERROR for d in self.items)

    def sorted(self) -> list[Diagnostic]:
        seen: set[tuple[object, ...]] = set()
        unique = []
        for d in self.items:
            key = (d.position, d.severity, d.code, d.message)
            if key not in seen:
                seen.add(key)
                unique.append(d)
        return sorted(unique, key=lambda d: (d.position.file, d.position.line, d.position.column))


class RecipeError(Exception):
    """A recipe could not be loaded. ``diagnostics`` holds every problem found (at least one error)."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics
        errors = [d for d in diagnostics if d.severity is Severity.ERROR] or diagnostics
        super().__init__("\n".join(d.format() for d in errors))
