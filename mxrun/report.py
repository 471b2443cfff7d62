"""Human-facing tables (rich) for plans and recipe listings; JSON output lives with each object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from mxrun.engine.plan import Decision, Plan


def _console() -> Console:
    """A console that does not fold layer names when output goes to a file or CI log (rich assumes 80)."""
    console = Console(soft_wrap=False)
    if not console.is_terminal:
        console.width = 200
    return console


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def print_plan(plan: Plan, model_label: str, console: Console | None = None) -> None:
    """The per-layer plan as a table, then the summary (layers per scheme, bytes before and after)."""
    console = console or _console()
    table = Table(title=f"plan: recipe {plan.recipe.name} on {model_label}", title_justify="left")
    table.add_column("layer", no_wrap=True)
    for column in ("kind", "shape", "decision", "scheme", "decided by"):
        table.add_column(column, overflow="fold")
    style = {
        Decision.QUANTIZE: "green",
        Decision.SKIPPED: "yellow",
        Decision.UNMATCHED: "dim",
        Decision.UNSUPPORTED: "red",
    }
    for entry in plan.entries:
        table.add_row(
            entry.layer.name,
            entry.layer.kind.value,
            "x".join(str(d) for d in entry.layer.shape),
            f"[{style[entry.decision]}]{entry.decision.value}[/]",
            entry.scheme.name if entry.scheme else "-",
            entry.source or entry.reason,
        )
    console.print(table)
    summary = plan.summary()
    parts = ", ".join(f"{name}: {count}" for name, count in summary["by_scheme"].items())
    console.print(
        f"{summary['quantized']}/{summary['layers']} layers quantized ({parts}); weights "
        f"{_mib(summary['bytes_before'])} -> {_mib(summary['bytes_after'])}; fingerprint {plan.fingerprint}",
        soft_wrap=True,
    )
    if summary["unmatched_rules"]:
        console.print("matched no layer: " + "; ".join(summary["unmatched_rules"]), soft_wrap=True)


def print_recipes(rows: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    console = console or _console()
    table = Table(title="built-in recipes (use by name: mxrun --recipe NAME)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_column("tags")
    for row in rows:
        table.add_row(row["name"], row["description"], ", ".join(row["tags"]))
    console.print(table)
