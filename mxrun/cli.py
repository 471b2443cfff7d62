"""The ``mxrun`` command line.

Exit codes, for every command: 0 success, 1 the input is invalid (recipe errors, or warnings under
``--strict``), 2 usage errors (unknown option, missing argument; click's convention).

``mxrun --recipe R [--model M]`` is the main job: it validates the recipe, resolves it against the model (the
bundled example when ``--model`` is omitted) and prints the plan, then loads the checkpoint with the planned
layers quantized as they stream in, evaluates it against the unquantized model and writes a run folder
(:mod:`mxrun.job`). Bad input there is one line on stderr and exit 1, with nothing written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from mxrun import __version__, resources
from mxrun.engine.diagnostics import Diagnostic, Severity
from mxrun.engine.loader import LoadResult, load_recipe
from mxrun.engine.plan import Plan, resolve_layers
from mxrun.engine.recipe import Recipe

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _apply_strict(diagnostics: list[Diagnostic], strict: bool) -> list[Diagnostic]:
    return [d.as_error() if strict else d for d in diagnostics]


def _print_diagnostics(diagnostics: list[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        click.echo(diagnostic.format(), err=True)


def _fail(message: str) -> NoReturn:
    click.echo(f"mxrun: error: {message}", err=True)
    sys.exit(EXIT_INVALID)


def _load_or_exit(reference: str, strict: bool = False) -> Recipe:
    result = load_recipe(reference)
    diagnostics = _apply_strict(result.diagnostics, strict)
    _print_diagnostics(diagnostics)
    if result.recipe is None or any(d.severity is Severity.ERROR for d in diagnostics):
        sys.exit(EXIT_INVALID)
    return result.recipe


def _layers(model: str | None) -> tuple[str, list[Any]]:
    """The layers of ``model`` (a checkpoint folder or file), or of the bundled example."""
    from mxrun.engine.inventory import InventoryError, layers_from_checkpoint

    path = Path(model) if model else resources.example_model_dir()
    label = model if model else f"the bundled example ({path.name})"
    try:
        return label, layers_from_checkpoint(path)
    except InventoryError as exc:
        _fail(str(exc))


def _plan_or_exit(recipe: Recipe, model: str | None, strict: bool) -> tuple[str, Plan]:
    label, layers = _layers(model)
    plan = resolve_layers(recipe, layers)
    diagnostics = _apply_strict(list(plan.diagnostics), strict)
    _print_diagnostics(diagnostics)
    if any(d.severity is Severity.ERROR for d in diagnostics):
        sys.exit(EXIT_INVALID)
    return label, plan


def _exported(model: str | None) -> Any:
    """The exported checkpoint at ``model`` (written by `mxrun export`), or None for any other folder."""
    if model is None:
        return None
    from mxrun.job.exported import open_exported

    return open_exported(model)


def _exported_plan_or_exit(exported: Any, recipe: Recipe | None, strict: bool) -> tuple[str, Plan]:
    """The plan of an exported checkpoint: its recorded recipe (``--recipe`` must have its fingerprint)."""
    from mxrun.job import JobError
    from mxrun.job.exported import exported_plan

    try:
        plan = exported_plan(exported, recipe)
    except JobError as exc:
        _fail(str(exc))
    diagnostics = _apply_strict(list(plan.diagnostics), strict)
    _print_diagnostics(diagnostics)
    if any(d.severity is Severity.ERROR for d in diagnostics):
        sys.exit(EXIT_INVALID)
    return f"{exported.folder} (exported)", plan


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--recipe", "recipe_ref", metavar="RECIPE", help="Recipe file or built-in name (see `mxrun recipes`)."
)
@click.option(
    "--model", metavar="DIR", help="Checkpoint folder (Hugging Face layout). Default: the bundled example."
)
@click.option(
    "--text",
    "text_file",
    metavar="FILE",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Text to measure perplexity on. Default: the held-out sample that ships with mxrun.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to load and evaluate: auto picks CUDA when available.",
)
@click.option(
    "--out",
    "out_dir",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder to write (must not exist, or be empty). Default: runs/<timestamp>-<recipe>/.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Tokens of text to evaluate on (default 8192).",
)
@click.option(
    "--reference",
    "reference_dir",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="For an exported --model: the unquantized checkpoint to compare with. Default: the source the "
    "export records, when it is still there.",
)
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.version_option(__version__, prog_name="mxrun")
@click.pass_context
def main(
    ctx: click.Context,
    recipe_ref: str | None,
    model: str | None,
    text_file: Path | None,
    device: str,
    out_dir: Path | None,
    max_tokens: int | None,
    reference_dir: Path | None,
    strict: bool,
) -> None:
    """mxrun: declarative FP8 / MXFP8 quantization recipes for PyTorch models.

    Run the main job with `mxrun --recipe mxfp8 [--model DIR]`: plan, quantize the model online while it loads,
    compare it with the unquantized model (perplexity, top-1 agreement, greedy continuation, per-layer error,
    memory, tokens/s) and write a run folder (report.json, report.md, plots). Or use a command below.
    """
    if ctx.invoked_subcommand is not None:
        if recipe_ref or model:
            raise click.UsageError("--recipe/--model go after the command name, e.g. `mxrun plan --recipe R`")
        return
    exported = _exported(model)
    if recipe_ref is None and exported is None:
        click.echo(ctx.get_help())
        ctx.exit(EXIT_USAGE)
    if reference_dir is not None and exported is None:
        raise click.UsageError("--reference is for an exported --model (written by `mxrun export`)")
    recipe = _load_or_exit(recipe_ref, strict) if recipe_ref is not None else None
    if exported is not None:
        label, plan = _exported_plan_or_exit(exported, recipe, strict)
    else:
        assert recipe is not None  # checked above
        label, plan = _plan_or_exit(recipe, model, strict)
    click.echo(f"recipe {plan.recipe.name} ({plan.recipe.fingerprint})")
    from mxrun.report import print_plan

    print_plan(plan, label)
    from mxrun.job import JobError, JobOptions, run_job
    from mxrun.job.evaluate import DEFAULT_MAX_TOKENS

    options = JobOptions(
        model_dir=Path(model) if model else resources.example_model_dir(),
        model_label=label,
        text_file=text_file,
        device=device,
        out_dir=out_dir,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        reference_dir=reference_dir,
    )
    try:
        run_job(plan, options)
    except JobError as exc:
        _fail(str(exc))


@main.command()
@click.argument("files", nargs=-1, required=True, metavar="RECIPE...")
@click.option("--model", metavar="DIR", help="Also check the recipe against this checkpoint's layers.")
@click.option("--strict", is_flag=True, help="Treat warnings as errors (exit 1).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def validate(files: tuple[str, ...], model: str | None, strict: bool, fmt: str) -> None:
    """Check recipes and report every problem as FILE:LINE:COL: severity: message.

    Exit 0 when all are valid, 1 when any has an error (or a warning with --strict).
    """
    layers = _layers(model)[1] if model else None
    reports: list[dict[str, Any]] = []
    failed = False
    for reference in files:
        result: LoadResult = load_recipe(reference)
        diagnostics = list(result.diagnostics)
        if result.recipe is not None and layers is not None:
            diagnostics += list(resolve_layers(result.recipe, layers).diagnostics)
        diagnostics = _apply_strict(diagnostics, strict)
        ok = result.recipe is not None and not any(d.severity is Severity.ERROR for d in diagnostics)
        failed |= not ok
        fingerprint = result.recipe.fingerprint if result.recipe is not None else None
        reports.append(
            {
                "file": reference,
                "valid": ok,
                "fingerprint": fingerprint,
                "diagnostics": [d.to_json() for d in diagnostics],
            }
        )
        if fmt == "text":
            _print_diagnostics(diagnostics)
            if ok:
                warnings = sum(d.severity is Severity.WARNING for d in diagnostics)
                note = f", {warnings} warning(s)" if warnings else ""
                click.echo(f"{reference}: valid{note} ({fingerprint})")
            else:
                errors = sum(d.severity is Severity.ERROR for d in diagnostics)
                click.echo(f"{reference}: invalid, {errors} error(s)", err=True)
    if fmt == "json":
        click.echo(json.dumps({"valid": not failed, "recipes": reports}, indent=2))
    sys.exit(EXIT_INVALID if failed else EXIT_OK)


@main.command()
@click.option("--version", "version", type=int, default=1, show_default=True, help="Recipe format version.")
def schema(version: int) -> None:
    """Print the JSON Schema of the recipe format (for editors and other tools)."""
    path = resources.schema_path(version)
    if not path.is_file():
        raise click.BadParameter(f"no schema for recipe version {version}", param_hint="--version")
    click.echo(path.read_text(encoding="utf-8"), nl=False)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def recipes(fmt: str) -> None:
    """List the built-in recipes (usable by name: `mxrun --recipe NAME`)."""
    rows = []
    for name in resources.builtin_recipe_names():
        result = load_recipe(name)
        recipe = result.recipe
        if recipe is None:  # a broken built-in is a bug; say so instead of hiding it
            _print_diagnostics(result.diagnostics)
            _fail(f"built-in recipe {name} is invalid")
        rows.append(
            {
                "name": name,
                "description": recipe.description,
                "tags": list(recipe.tags),
                "fingerprint": recipe.fingerprint,
                "path": str(resources.builtin_recipe_path(name)),
            }
        )
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    from mxrun.report import print_recipes

    print_recipes(rows)


@main.command()
@click.option("--recipe", "recipe_ref", required=True, metavar="RECIPE")
@click.option("--model", metavar="DIR", help="Checkpoint folder. Default: the bundled example.")
@click.option("--json", "as_json", is_flag=True, help="Print the full plan as JSON (stable order).")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
def plan(recipe_ref: str, model: str | None, as_json: bool, strict: bool) -> None:
    """Resolve a recipe against a model: which layer gets which scheme, and which rule decided it."""
    recipe = _load_or_exit(recipe_ref, strict)
    label, resolved = _plan_or_exit(recipe, model, strict)
    if as_json:
        click.echo(json.dumps({"model": label, **resolved.to_json()}, indent=2))
        return
    from mxrun.report import print_plan

    print_plan(resolved, label)


@main.command()
@click.option("--recipe", "recipe_ref", required=True, metavar="RECIPE")
@click.option(
    "--model", metavar="DIR", help="Explain every layer of this checkpoint whose name matches LAYER."
)
@click.option(
    "--kind",
    type=click.Choice(["linear", "moe_experts"]),
    default="linear",
    show_default=True,
    help="Layer kind to assume when no --model is given.",
)
@click.argument("layer")
def explain(recipe_ref: str, model: str | None, kind: str, layer: str) -> None:
    """Explain, for LAYER, which rules and skips matched and why the winner won."""
    from mxrun.engine.layers import LayerKind
    from mxrun.engine.matching import Matcher

    recipe = _load_or_exit(recipe_ref)
    matcher = Matcher(recipe)
    if model is None:
        targets = [(layer, LayerKind(kind))]
    else:
        layers = _layers(model)[1]
        targets = [(item.name, item.kind) for item in layers if item.name == layer]
        if not targets:
            _fail(f"model {model} has no layer named {layer!r}")
    for name, layer_kind in targets:
        click.echo("\n".join(matcher.explain(name, layer_kind).lines()))


from mxrun.export.cli import export_command  # noqa: E402 - registered after the group is defined

main.add_command(export_command)
