"""The corpus of bad recipes: each file's diagnostics must be exactly the lines of its ``.expected`` file.

The expected files were written by hand-checking each position (1-based line and column of the offending
key or value); a change in any message or position shows up here as a diff.
"""

from pathlib import Path

import pytest

from mxrun.engine.loader import load_recipe

HERE = Path(__file__).parent
CORPUS = sorted((HERE / "bad_recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_diagnostics_match_expected(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(HERE)
    relative = path.relative_to(HERE).as_posix()
    result = load_recipe(relative)
    got = [d.format() for d in result.diagnostics]
    expected = path.with_suffix(".expected").read_text().splitlines()
    assert got == expected
    if any(line.split(": ")[1] == "error" for line in expected):
        assert result.recipe is None


def test_corpus_covers_the_failure_classes() -> None:
    codes = set()
    for path in CORPUS:
        codes |= {d.code for d in load_recipe(path).diagnostics}
    for code in (
        "unknown-key",
        "missing-version",
        "unsupported-version",
        "bad-regex",
        "unknown-scheme",
        "shadowed-rule",
        "duplicate-rule",
        "bad-scheme",
        "yaml-syntax",
        "duplicate-key",
        "yaml-tag",
        "empty-file",
        "wrong-type",
        "extends-not-found",
        "extends-cycle",
        "not-a-mapping",
    ):
        assert code in codes, code
