"""``mxrun export`` through click's runner: success, then the one-line errors with exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mxrun.export.cli import export_command, parse_size
from mxrun.export.reload import load_exported

from .conftest import TOKENS, Exported


def _run(*args: str):
    return CliRunner().invoke(export_command, list(args))


def test_export_command_writes_what_the_api_writes(exported: dict[str, Exported], tmp_path: Path) -> None:
    case = exported["mxfp8"]
    out = tmp_path / "cli"
    result = _run("--recipe", "mxfp8", "--model", str(case.source), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"recipe mxfp8 ({case.recipe.fingerprint})" in result.output
    assert "format mxfp8-quantized; quantized 12 x mxfp8; 3 module(s) left unquantized" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((case.out / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(load_exported(out)(TOKENS).logits, case.model(TOKENS).logits)

    again = _run("--recipe", "mxfp8", "--model", str(case.source), "--out", str(out))
    assert again.exit_code == 1
    assert again.output.strip().splitlines()[-1] == (
        f"mxrun: error: {out}: exists and is not empty (hint: --force replaces it)"
    )
    forced = _run("--recipe", "fp8-channel", "--model", str(case.source), "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "no-such-recipe"], "no-such-recipe"),
        (["--recipe", "mxfp8", "--model", "{tmp}/missing"], "missing: no such checkpoint folder"),
        (["--recipe", "mxfp8", "--out", "{source}"], "is the source checkpoint folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    exported: dict[str, Exported], tmp_path: Path, args, message
) -> None:
    source = exported["mxfp8"].source
    defaults = {"--model": str(source), "--out": str(tmp_path / "out")}
    args = [a.format(tmp=tmp_path, source=source) for a in args]
    for option, value in defaults.items():
        if option not in args:
            args += [option, value]
    result = _run(*args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1048576") == 1048576
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
