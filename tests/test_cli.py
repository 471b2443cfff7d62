"""The command line through click's runner: output, exit codes (0 ok, 1 invalid, 2 usage), JSON."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mxrun.cli import main

HERE = Path(__file__).parent
BAD = HERE / "engine" / "bad_recipes"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_validate_valid_builtin_prints_fingerprint(runner: CliRunner) -> None:
    result = runner.invoke(main, ["validate", "mxfp8"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("mxfp8: valid (sha256:")


def test_validate_reports_all_files_and_exits_1(runner: CliRunner) -> None:
    result = runner.invoke(main, ["validate", str(BAD / "unknown_key.yaml"), "fp8-block",
                                  str(BAD / "bad_regex.yaml")])
    assert result.exit_code == 1
    assert f"{BAD / 'unknown_key.yaml'}:4:1: error: unknown key 'rulez' in the recipe (did you mean 'rules'?)" \
        in result.output
    assert "fp8-block: valid" in result.output
    assert f"{BAD / 'bad_regex.yaml'}:5:28: error: invalid regex" in result.output


def test_warnings_pass_unless_strict(runner: CliRunner) -> None:
    shadowed = str(BAD / "shadowed.yaml")
    relaxed = runner.invoke(main, ["validate", shadowed])
    assert relaxed.exit_code == 0 and "valid, 2 warning(s)" in relaxed.output
    strict = runner.invoke(main, ["validate", "--strict", shadowed])
    assert strict.exit_code == 1
    assert f"{shadowed}:9:12: error: rule 'experts' is shadowed" in strict.output


def test_validate_json(runner: CliRunner) -> None:
    result = runner.invoke(main, ["validate", "--format", "json", "mixed-moe", str(BAD / "future_version.yaml")])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["valid"] is False
    ok, bad = report["recipes"]
    assert ok["valid"] and ok["fingerprint"].startswith("sha256:")
    (diag,) = bad["diagnostics"]
    assert (diag["line"], diag["column"], diag["code"]) == (1, 10, "unsupported-version")


def test_usage_errors_exit_2(runner: CliRunner) -> None:
    assert runner.invoke(main, ["validate"]).exit_code == 2
    assert runner.invoke(main, ["validate", "--format", "xml", "mxfp8"]).exit_code == 2
    assert runner.invoke(main, ["no-such-command"]).exit_code == 2
    assert runner.invoke(main, []).exit_code == 2


def test_missing_recipe_is_invalid_not_a_traceback(runner: CliRunner) -> None:
    result = runner.invoke(main, ["validate", "no-such-recipe"])
    assert result.exit_code == 1
    assert "no-such-recipe: error: no such recipe file or built-in recipe" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_recipes_lists_the_library(runner: CliRunner) -> None:
    result = runner.invoke(main, ["recipes", "--format", "json"])
    assert result.exit_code == 0
    names = [row["name"] for row in json.loads(result.output)]
    assert {"fp8-dynamic", "fp8-channel", "fp8-block", "mxfp8", "mixed-moe"} <= set(names)
    table = runner.invoke(main, ["recipes"])
    assert table.exit_code == 0 and "mixed-moe" in table.output


def test_explain_without_model(runner: CliRunner) -> None:
    result = runner.invoke(main, ["explain", "--recipe", "mixed-moe", "--kind", "moe_experts",
                                  "model.layers.3.mlp.experts.down_proj"])
    assert result.exit_code == 0
    assert "rule     'experts'" in result.output and "matches first -> scheme 'experts'" in result.output
    router = runner.invoke(main, ["explain", "--recipe", "mixed-moe", "model.layers.3.mlp.gate"])
    assert "skips always win" in router.output


def test_hostile_recipe_file_through_the_cli(runner: CliRunner, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [" + "x, " * 9 + "x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i > 1 else "*a"] * 10) + "]\n" for i in range(1, 9)))
    result = runner.invoke(main, ["validate", str(bomb)])
    assert result.exit_code == 1
    assert "aliases expand to more than" in result.output
