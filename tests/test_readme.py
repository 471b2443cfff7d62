"""The README's quick start is what CI runs, and its examples are real."""

import re
from pathlib import Path

import yaml

from mxrun.engine.loader import load_recipe

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = _bash_blocks()[1].strip()
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd ", "export "))
    ]
    assert ci_lines == [test_command]


def test_first_command_installs_and_runs_the_main_job() -> None:
    first = _bash_blocks()[0].strip()
    assert first.startswith("pip install") and "mxrun --recipe" in first


def test_readme_recipe_example_is_valid(tmp_path: Path) -> None:
    example = re.search(r"```yaml\n(# the schema file.*?)```", README, flags=re.S).group(1)
    assert yaml.safe_load(example)["version"] == 1
    path = tmp_path / "example.yaml"
    path.write_text(example)
    result = load_recipe(path)
    assert result.recipe is not None, [d.format() for d in result.diagnostics]
    assert [d for d in result.diagnostics if d.severity.value == "error"] == []
    assert [r.name for r in result.recipe.rules][:2] == ["experts", "rules[1]"]


def test_pre_commit_hook_runs_validate() -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hooks[0]["id"] == "mxrun-validate" and hooks[0]["entry"].startswith("mxrun validate")
