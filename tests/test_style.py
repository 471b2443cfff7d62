"""The repository stays ruff-clean (lint and format), so CI catches style drift the same way it catches bugs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["mxrun", "tests", "benchmarks", "scripts"]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (it is in the dev extra)")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run(["ruff", *command, *PATHS], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
