"""Exported checkpoints of the bundled tiny MoE (Qwen3-MoE, hidden 128, 4 experts of intermediate 128: every K
is a multiple of 128, so each built-in recipe quantizes every Linear and expert), one per recipe family,
shared by the tests of this folder (exporting is the slow part: about a second each on 2 CPU cores)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from mxrun import resources
from mxrun.engine.apply import apply_plan
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.plan import Plan, resolve
from mxrun.engine.recipe import Recipe
from mxrun.export.writer import ExportResult, export_checkpoint

transformers = pytest.importorskip("transformers")

RECIPES = ("fp8-dynamic", "fp8-channel", "fp8-block", "mxfp8")
SIDE_FILES = {
    "tokenizer_config.json": '{"model_max_length": 256}\n',
    "generation_config.json": '{"do_sample": false}\n',
}
TOKENS = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(0))


@dataclass
class Exported:
    recipe: Recipe
    plan: Plan
    model: nn.Module
    """The online path: the source loaded by transformers, then ``apply_plan``."""
    source: Path
    out: Path
    result: ExportResult


def load_source(source: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16).eval()


def export(recipe_ref: str, source: Path, out: Path, **kwargs) -> Exported:
    recipe = load_recipe_or_raise(recipe_ref)
    plan = resolve(recipe, source)
    model = load_source(source)
    with torch.no_grad():
        apply_plan(model, plan)
    result = export_checkpoint(model, plan, recipe, source, out, **kwargs)
    return Exported(recipe, plan, model, source, out, result)


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled tiny MoE with a tokenizer config and a generation config beside it."""
    folder = tmp_path_factory.mktemp("source") / "tiny-moe"
    shutil.copytree(resources.example_model_dir().parent / "tiny-moe", folder)  # small and fast
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def exported(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Recipe name -> its export of ``source`` (sharded small, so the index spans several files)."""
    root = tmp_path_factory.mktemp("exported")
    return {name: export(name, source, root / name, max_shard_bytes=300_000) for name in RECIPES}
