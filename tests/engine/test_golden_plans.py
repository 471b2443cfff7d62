"""Golden plans: every built-in recipe on real (tiny) transformers architectures, from the live module and
from its saved checkpoint. The two plans must be identical, and must equal the reviewed golden file.

To regenerate after an intended change: ``MXRUN_UPDATE_GOLDEN=1 python -m pytest tests/engine/test_golden_plans.py``
and review the diff of ``tests/engine/golden_plans/`` like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import model_zoo
import pytest

from mxrun import resources
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.plan import Plan, resolve

GOLDEN = Path(__file__).parent / "golden_plans"
MODELS = ["llama", "qwen3_moe", "mixtral", "bert"]
RECIPES = resources.builtin_recipe_names()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    built = {}
    for name in MODELS:
        model = model_zoo.ZOO[name]()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        built[name] = (model, folder)
    return built


def _compact(plan: Plan) -> dict[str, Any]:
    """The parts of a plan a reviewer checks: per layer the outcome and the line that decided it."""
    rows = []
    for entry in plan.entries:
        source = ""
        if entry.source:
            file, line, _column = entry.source.rsplit(":", 2)
            source = f"{Path(file).name}:{line}"
        rows.append(
            [
                entry.layer.name,
                entry.layer.kind.value,
                "x".join(map(str, entry.layer.shape)),
                entry.decision.value,
                entry.scheme.name if entry.scheme else None,
                source,
            ]
        )
    return {
        "fingerprint": plan.fingerprint,
        "summary": {k: v for k, v in plan.summary().items() if k != "unmatched_rules"},
        "diagnostics": [f"{d.severity.value}: {d.code}: {d.message}" for d in plan.diagnostics],
        "layers": rows,
    }


@pytest.mark.parametrize("recipe_name", RECIPES)
@pytest.mark.parametrize("model_name", MODELS)
def test_golden_plan(model_name: str, recipe_name: str, sources: dict[str, tuple[Any, Path]]) -> None:
    recipe = load_recipe_or_raise(recipe_name)
    module, folder = sources[model_name]
    from_module = resolve(recipe, module)
    from_checkpoint = resolve(recipe, folder)
    assert _compact(from_module) == _compact(from_checkpoint)
    got = _compact(from_checkpoint)
    path = GOLDEN / f"{recipe_name}__{model_name}.json"
    if os.environ.get("MXRUN_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(path.read_text())
