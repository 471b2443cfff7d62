"""``mxrun export``: quantize a checkpoint with a recipe and write it in the compressed-tensors layout.

Registered on the ``mxrun`` group by :mod:`mxrun.cli`. Exit codes as for every mxrun command: 0 success, 1
invalid input (recipe errors, a target folder it must not write, a model it cannot export: one line on stderr
naming the file or layer, nothing written), 2 usage errors.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NoReturn

import click

EXIT_OK, EXIT_INVALID = 0, 1
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _fail(message: str) -> NoReturn:
    click.echo(f"mxrun: error: {message}", err=True)
    sys.exit(EXIT_INVALID)


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1048576"`` -> bytes."""
    match = _SIZE.match(text)
    if not match or float(match[1]) <= 0:
        raise click.BadParameter(
            f"{text!r} is not a size like 5GB, 500MB or 2GiB", param_hint="--max-shard-size"
        )
    return int(float(match[1]) * _UNITS[(match[2] or "B").upper()])


def _model_dtype(model_dir: Path):
    import json

    import torch

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return torch.float16 if name == "float16" else torch.bfloat16


@click.command("export")
@click.option("--recipe", "recipe_ref", required=True, metavar="RECIPE", help="Recipe file or built-in name.")
@click.option(
    "--model", metavar="DIR", help="Checkpoint folder (Hugging Face layout). Default: the bundled example."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    metavar="DIR",
    type=click.Path(path_type=Path),
    help="Folder to write; must not exist or be empty (see --force).",
)
@click.option(
    "--force", is_flag=True, help="Replace a non-empty --out folder (atomically, never the source)."
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    metavar="SIZE",
    help="Largest safetensors shard, e.g. 500MB.",
)
@click.option("--strict", is_flag=True, help="Treat recipe and plan warnings as errors.")
def export_command(
    recipe_ref: str, model: str | None, out_dir: Path, force: bool, max_shard_size: str, strict: bool
) -> None:
    """Quantize a checkpoint with RECIPE and write it in the compressed-tensors layout (vLLM, SGLang).

    Writes safetensors shards, an index, config.json with a quantization_config (quant_method
    compressed-tensors, the ignore list, and mxrun's resolved recipe with its fingerprint) and the source's
    tokenizer files, into a temporary folder renamed into place when complete.
    """
    from mxrun import resources
    from mxrun.engine.diagnostics import Severity
    from mxrun.engine.inventory import InventoryError, layers_from_checkpoint
    from mxrun.engine.loader import load_recipe
    from mxrun.engine.plan import resolve_layers
    from mxrun.export.writer import ExportError, check_target, export_checkpoint

    max_shard_bytes = parse_size(max_shard_size)
    model_dir = Path(model) if model else resources.example_model_dir()
    try:
        check_target(model_dir, out_dir, force)  # before the slow part
    except ExportError as exc:
        _fail(str(exc))

    result = load_recipe(recipe_ref)
    diagnostics = [d.as_error() if strict else d for d in result.diagnostics]
    for diagnostic in diagnostics:
        click.echo(diagnostic.format(), err=True)
    if result.recipe is None or any(d.severity is Severity.ERROR for d in diagnostics):
        sys.exit(EXIT_INVALID)
    recipe = result.recipe

    try:
        layers = layers_from_checkpoint(model_dir)
    except InventoryError as exc:
        _fail(str(exc))
    plan = resolve_layers(recipe, layers)
    diagnostics = [d.as_error() if strict else d for d in plan.diagnostics]
    for diagnostic in diagnostics:
        click.echo(diagnostic.format(), err=True)
    if any(d.severity is Severity.ERROR for d in diagnostics):
        sys.exit(EXIT_INVALID)
    if not plan.quantized():
        _fail(f"recipe {recipe.name} quantizes no layer of {model_dir} (see `mxrun plan`)")

    import torch

    from mxrun.engine.apply import ApplyError, apply_plan

    try:
        import transformers
    except ImportError:
        _fail("mxrun export needs transformers to load the model (pip install transformers)")
    try:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=_model_dtype(model_dir)
        )
    except (OSError, ValueError, RuntimeError) as exc:
        _fail(
            f"{model_dir}: cannot load the model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )
    hf_model.eval()
    try:
        with torch.no_grad():
            report = apply_plan(hf_model, plan)
        exported = export_checkpoint(
            hf_model, plan, recipe, model_dir, out_dir, force=force, max_shard_bytes=max_shard_bytes
        )
    except (ApplyError, ExportError) as exc:
        _fail(str(exc))
    click.echo(f"recipe {recipe.name} ({recipe.fingerprint})")
    click.echo(report.summary())
    for layer, reason in report.not_supported:
        click.echo(f"  left unquantized: {layer}: {reason}")
    click.echo(exported.summary())
    sys.exit(EXIT_OK)


__all__ = ["export_command", "parse_size"]
