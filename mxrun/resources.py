"""Where the shipped recipe library and JSON Schemas live.

The top-level ``recipes/`` and ``schemas/`` folders are the sources. A wheel carries copies under
``mxrun/_data/`` (see ``pyproject.toml``); a source checkout or editable install has none there and uses the
repository folders next to the package. Both layouts are looked up here and nowhere else.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"mxrun's {name}/ folder is missing from this installation (looked in {_PACKAGE_DIR / '_data'} "
        f"and {_PACKAGE_DIR.parent}); reinstall mxrun"
    )


def recipes_dir() -> Path:
    """Folder of the built-in recipes (``<name>.yaml``)."""
    return _data_dir("recipes")


def schemas_dir() -> Path:
    return _data_dir("schemas")


def builtin_recipe_names() -> list[str]:
    """Names of the built-in recipes, sorted."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def builtin_recipe_path(name: str) -> Path | None:
    """Path of built-in recipe ``name``, or ``None`` if there is none by that name."""
    path = recipes_dir() / f"{name}.yaml"
    return path if name in builtin_recipe_names() else None


def schema_path(version: int) -> Path:
    return schemas_dir() / f"recipe.v{version}.schema.json"


@cache
def load_schema(version: int) -> dict[str, Any]:
    """The published JSON Schema for recipe format ``version``."""
    with open(schema_path(version), encoding="utf-8") as handle:
        return json.load(handle)


def example_model_dir() -> Path:
    """The small trained checkpoint that ships with mxrun (a 5M-parameter Qwen3-MoE with its tokenizer, see
    ``mxrun/examples/default-moe/README.md``), used when no ``--model`` is given."""
    return _PACKAGE_DIR / "examples" / "default-moe"
