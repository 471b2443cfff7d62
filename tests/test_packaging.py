"""The wheel carries the recipe library and the schema, and an installed mxrun finds them there."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    # With the build backend already installed, build against it: that works on an offline machine (the GPU
    # box). Otherwise pip fetches it into an isolated build environment, as a user's install would.
    if importlib.util.find_spec("hatchling") is not None:
        command.append("--no-build-isolation")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and "No matching distribution found for hatchling" in done.stderr:
        pytest.skip("offline and no hatchling installed: the wheel cannot be built here")
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("mxrun-*.whl")
    return path


def test_wheel_contains_recipes_and_schemas(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"mxrun/_data/recipes/{recipe.name}" in names
    assert "mxrun/_data/schemas/recipe.v1.schema.json" in names
    assert not any(name.startswith(("engine/", "kernels/", "tests/")) for name in names)


def test_installed_wheel_finds_its_data_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from mxrun import resources; from mxrun.engine.loader import load_recipe;"
        "r = load_recipe('mxfp8'); print(resources.recipes_dir()); print(r.recipe.fingerprint)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    recipes_dir, fingerprint = done.stdout.split()
    assert Path(recipes_dir) == site / "mxrun" / "_data" / "recipes"
    assert fingerprint.startswith("sha256:")
