"""``mxrun --model EXPORT``: an exported checkpoint is reloaded as stored (not requantized) and gives the
online path's outputs bit for bit; its recipe comes from the export's record; its reference is the source
the export records, ``--reference DIR``, or none (reference columns unavailable)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mxrun import resources
from mxrun.cli import main
from mxrun.engine.apply import apply_plan
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.plan import resolve
from mxrun.export.writer import export_checkpoint
from mxrun.job.exported import exported_plan, load_exported_model, open_exported, recipe_from_record
from mxrun.job.loading import load_quantized, open_checkpoint

transformers = pytest.importorskip("transformers")

RECIPE = "mxfp8"
MAX_TOKENS = "300"  # two windows of the tiny model's context (256): the window logic runs on both paths


def _export(source: Path, out: Path, recipe_ref: str = RECIPE) -> Path:
    """As tests/export/conftest.py does: the source loaded by transformers, apply_plan, export."""
    recipe = load_recipe_or_raise(recipe_ref)
    plan = resolve(recipe, source)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        apply_plan(model, plan)
    export_checkpoint(model, plan, recipe, source, out)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("source") / "tiny-moe"
    shutil.copytree(resources.example_model_dir().parent / "tiny-moe", folder)
    return folder


@pytest.fixture(scope="module")
def exported(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(source, tmp_path_factory.mktemp("exported") / "tiny-moe-mxfp8")


def _run(*args: str) -> dict:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("--out") + 1])
    report = json.loads((out / "report.json").read_text())
    report["_output"] = result.output
    report["_markdown"] = (out / "report.md").read_text()
    return report


def test_record_names_source_and_rebuilds_the_recipe(exported: Path, source: Path) -> None:
    checkpoint = open_exported(exported)
    assert checkpoint is not None and open_exported(source) is None
    assert checkpoint.source == source.resolve()
    recipe = load_recipe_or_raise(RECIPE)
    assert recipe_from_record(checkpoint).fingerprint == recipe.fingerprint
    # the plan from the export's headers is the source's plan
    online, offline = resolve(recipe, source), exported_plan(checkpoint)
    assert [(e.layer.name, e.layer.shape, e.layer.dtype, e.decision) for e in offline.entries] == [
        (e.layer.name, e.layer.shape, e.layer.dtype, e.decision) for e in online.entries
    ]
    assert offline.summary() == online.summary()


def test_logits_bit_identical_to_online_path(exported: Path, source: Path) -> None:
    """Both models on the same tokens: the reloaded export computes exactly what the streamed one does."""
    recipe = load_recipe_or_raise(RECIPE)
    device = torch.device("cpu")
    online = load_quantized(open_checkpoint(source), resolve(recipe, source), device)
    checkpoint = open_exported(exported)
    offline = load_exported_model(checkpoint, open_checkpoint(exported), exported_plan(checkpoint), device)
    assert offline.report.replaced == online.report.replaced
    assert offline.report.by_scheme == online.report.by_scheme
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = online.model(ids).logits
        b = offline.model(ids).logits
    assert torch.equal(a, b)


def test_job_on_export_matches_online_job(exported: Path, source: Path, tmp_path: Path) -> None:
    online = _run(
        "--recipe", RECIPE, "--model", str(source), "--max-tokens", MAX_TOKENS, "--out", str(tmp_path / "a")
    )
    offline = _run("--model", str(exported), "--max-tokens", MAX_TOKENS, "--out", str(tmp_path / "b"))
    assert online["load"]["path"] == "online" and offline["load"]["path"] == "exported"
    assert offline["model"]["reference"] == str(source.resolve())
    assert offline["recipe"]["fingerprint"] == online["recipe"]["fingerprint"]
    on, off = online["evaluation"], offline["evaluation"]
    assert off["perplexity"] == on["perplexity"]  # reference and quantized, exactly
    assert off["top1_agreement"] == on["top1_agreement"]
    assert off["mean_kl_nats"] == on["mean_kl_nats"]
    assert off["continuation"] == on["continuation"]
    assert off["layer_errors"]["all"] == on["layer_errors"]["all"]
    assert off["weight_bytes"] == on["weight_bytes"]
    assert "exported checkpoint" in offline["_output"] and "exported checkpoint" in offline["_markdown"]
    assert "online" in online["_markdown"]


def test_export_without_its_source(source: Path, tmp_path: Path) -> None:
    """The source is gone: the quantized model's own numbers, reference columns unavailable; --reference
    brings them back."""
    moved = tmp_path / "gone" / "tiny-moe"
    shutil.copytree(source, moved)
    export = _export(moved, tmp_path / "export")
    shutil.rmtree(moved)
    alone = _run("--model", str(export), "--max-tokens", MAX_TOKENS, "--out", str(tmp_path / "alone"))
    ev = alone["evaluation"]
    assert ev["reference_available"] is False
    assert ev["perplexity"]["reference"] is None and ev["top1_agreement"] is None
    assert ev["continuation"]["reference"] is None and ev["weight_bytes"]["reference"] is None
    assert any("no reference" in note for note in alone["notes"])
    assert "n/a" in alone["_markdown"] and "n/a" in alone["_output"]
    compared = _run(
        "--model", str(export), "--reference", str(source), "--max-tokens", MAX_TOKENS,
        "--out", str(tmp_path / "compared"),
    )  # fmt: skip
    assert compared["evaluation"]["perplexity"]["quantized"] == ev["perplexity"]["quantized"]
    assert compared["evaluation"]["top1_agreement"] is not None


def test_recipe_with_another_fingerprint_is_one_line(exported: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--recipe", "fp8-block", "--model", str(exported), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("mxrun: error:")]
    assert len(errors) == 1 and "fingerprint" in errors[0] and str(exported) in errors[0]
    assert not (tmp_path / "r").exists()
    same = _run(
        "--recipe", RECIPE, "--model", str(exported), "--max-tokens", "64", "--out", str(tmp_path / "s")
    )
    assert same["load"]["path"] == "exported"
