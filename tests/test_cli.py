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
    result = runner.invoke(
        main, ["validate", str(BAD / "unknown_key.yaml"), "fp8-block", str(BAD / "bad_regex.yaml")]
    )
    assert result.exit_code == 1
    assert (
        f"{BAD / 'unknown_key.yaml'}:4:1: error: unknown key 'rulez' in the recipe (did you mean 'rules'?)"
        in result.output
    )
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
    result = runner.invoke(
        main, ["validate", "--format", "json", "mixed-moe", str(BAD / "future_version.yaml")]
    )
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
    result = runner.invoke(
        main,
        ["explain", "--recipe", "mixed-moe", "--kind", "moe_experts", "model.layers.3.mlp.experts.down_proj"],
    )
    assert result.exit_code == 0
    assert "rule     'experts'" in result.output and "matches first -> scheme 'experts'" in result.output
    router = runner.invoke(main, ["explain", "--recipe", "mixed-moe", "model.layers.3.mlp.gate"])
    assert "skips always win" in router.output


def test_hostile_recipe_file_through_the_cli(runner: CliRunner, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "a: &a ["
        + "x, " * 9
        + "x]\n"
        + "".join(
            f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}" if i > 1 else "*a"] * 10) + "]\n" for i in range(1, 9)
        )
    )
    result = runner.invoke(main, ["validate", str(bomb)])
    assert result.exit_code == 1
    assert "aliases expand to more than" in result.output


def test_main_job_on_the_bundled_example(runner: CliRunner, tmp_path: Path) -> None:
    """The default run: plan first, then the job (tests/job covers it in depth), writing only --out."""
    from mxrun import resources

    out = tmp_path / "run"
    result = runner.invoke(main, ["--recipe", "mixed-moe", "--out", str(out), "--max-tokens", "256"])
    assert result.exit_code == 0, result.output
    assert "plan: recipe mixed-moe on the bundled example (default-moe)" in result.stdout
    assert "24/29 layers quantized (attention: 16, experts: 8, skipped: 5)" in result.stdout
    summary = result.stdout.index("mxrun: recipe mixed-moe on the bundled example (default-moe) (")
    assert result.stdout.index("24/29 layers quantized") < summary < result.stdout.index(f"run folder: {out}")
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["path"] == str(resources.example_model_dir())
    assert report["quantized_layers"]["count"] == 24 and report["plan"]["quantized"] == 24
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_main_job_help_lists_its_options(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--recipe", "--model", "--text", "--device [auto|cpu|cuda]", "--out", "--max-tokens"):
        assert option in result.output
    from mxrun.job.evaluate import DEFAULT_MAX_TOKENS

    assert f"(default {DEFAULT_MAX_TOKENS})" in result.output


def test_plan_json_is_complete_and_stable(runner: CliRunner) -> None:
    first = runner.invoke(main, ["plan", "--recipe", "mxfp8", "--json"])
    second = runner.invoke(main, ["plan", "--recipe", "mxfp8", "--json"])
    assert first.exit_code == 0 and first.output == second.output
    plan = json.loads(first.output)
    names = [entry["layer"] for entry in plan["layers"]]
    assert names[0] == "lm_head" and "model.layers.1.mlp.experts.gate_up_proj" in names
    experts = next(e for e in plan["layers"] if e["layer"] == "model.layers.0.mlp.experts.gate_up_proj")
    assert experts["shape"] == [8, 256, 256] and experts["family"] == "mxfp8"
    assert experts["source"].endswith("mxfp8.yaml:18:5")
    assert plan["fingerprint"].startswith("sha256:")


def test_validate_against_a_model(runner: CliRunner, tmp_path: Path) -> None:
    from mxrun import resources

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nname: r\ndescription: d\nrules:\n"
        "  - {match: 'model\\.layers\\.\\d+\\.self_attn\\.q_proj', scheme: mxfp8}\n"
        "  - {match: 'layers\\..*', scheme: mxfp8}\n"
    )
    model = str(resources.example_model_dir())
    result = runner.invoke(main, ["validate", str(recipe), "--model", model])
    assert result.exit_code == 1
    assert f"{recipe}:5:13: error: fused group model.layers.0.self_attn.qkv is split" in result.output
    assert f"{recipe}:6:13: warning: rule 'rules[1]' matches no layer of this model" in result.output


def test_missing_model_is_one_line_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["plan", "--recipe", "mxfp8", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "mxrun: error:" in result.output


def test_directory_instead_of_recipe(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["validate", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path}: error: is a directory, not a recipe file" in result.output
