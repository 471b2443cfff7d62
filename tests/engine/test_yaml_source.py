"""Hostile YAML: every case is a clear, positioned error, fast and without building Python objects."""

import time
from pathlib import Path

import pytest

from mxrun.engine.diagnostics import RecipeError
from mxrun.engine.yaml_source import MAX_BYTES, MAX_DEPTH, load_yaml, read_recipe_text


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_yaml(text, "r.yaml")
    assert len(info.value.diagnostics) >= 1
    return info.value.diagnostics[0].format()


def _timed_error(text: str) -> str:
    start = time.process_time()
    message = _error(text)
    # A safety bound, not a speed benchmark: hostile input must be refused quickly (issue: < 1 s). CPU time
    # of this process, so that a loaded machine (the suite run with 15 workers beside GPU compiles took
    # 2.5 s of wall time here) does not fail it while an exponential expansion still would.
    assert time.process_time() - start < 1.0
    return message


def test_billion_laughs_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    message = _timed_error("\n".join(lines) + "\n")
    assert "aliases expand to more than" in message
    assert message.startswith("r.yaml:")


def test_deep_nesting_is_refused_before_building() -> None:
    message = _timed_error("[" * 100_000 + "]" * 100_000)
    # Our depth check fires at column MAX_DEPTH + 1; PyYAML's pure-Python scanner (no libyaml) refuses flow
    # nesting itself past 1000 levels, a few tokens ahead of the parser events. Both are positioned errors.
    assert f"r.yaml:1:{MAX_DEPTH + 1}: error: nesting deeper than {MAX_DEPTH}" in message or (
        message.startswith("r.yaml:1:1001: error: invalid YAML: exceeded maximum nesting depth")
    )


def test_deep_block_nesting() -> None:
    text = "".join("  " * i + f"k{i}:\n" for i in range(200))
    assert "nesting deeper" in _timed_error(text)


def test_python_tags_build_nothing() -> None:
    message = _timed_error('x: !!python/object/apply:os.system ["touch /tmp/mxrun-pwned"]\n')
    assert "YAML tag" in message and "not allowed" in message
    assert not Path("/tmp/mxrun-pwned").exists()


def test_custom_local_tag_is_refused() -> None:
    assert "YAML tag '!foo'" in _error("x: !foo bar\n")


def test_standard_explicit_tags_are_fine() -> None:
    assert load_yaml("x: !!str 12\n", "r.yaml").data == {"x": "12"}


def test_tabs_get_a_hint() -> None:
    message = _error("a:\n\tb: 1\n")
    assert message.startswith("r.yaml:2:1: error: invalid YAML")
    assert "spaces, not tabs" in message


def test_duplicate_keys_name_both_lines() -> None:
    message = _error("a: 1\nb: 2\na: 3\n")
    assert message.startswith("r.yaml:3:1: error: duplicate key 'a' (first defined at line 1)")


def test_nested_duplicate_key() -> None:
    assert _error("s:\n  x: 1\n  x: 2\n").startswith("r.yaml:3:3: error: duplicate key 'x'")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "   \n# c\n"])
def test_empty_files(text: str) -> None:
    assert "the recipe is empty" in _error(text)


def test_merge_keys_are_refused() -> None:
    assert "merge keys" in _error("base: &b {x: 1}\nother:\n  <<: *b\n")


def test_non_string_keys() -> None:
    assert "must be a string" in _error("1: a\n")
    assert "must be a string" in _error("? [a, b]\n: c\n")


def test_multiple_documents() -> None:
    assert "more than one YAML document" in _error("a: 1\n---\nb: 2\n")


def test_small_aliases_still_work() -> None:
    doc = load_yaml("a: &x [1, 2]\nb: *x\n", "r.yaml")
    assert doc.data == {"a": [1, 2], "b": [1, 2]}


def test_positions_are_recorded() -> None:
    doc = load_yaml("version: 1\nrules:\n  - match: 'ab(c'\n", "r.yaml")
    assert str(doc.source_map.value(("rules", 0, "match"))) == "r.yaml:3:12"
    assert str(doc.source_map.key(("rules",))) == "r.yaml:2:1"
    # index 2 of the quoted value is one column past the quote
    assert str(doc.source_map.offset(("rules", 0, "match"), 2)) == "r.yaml:3:15"


def test_huge_file_is_refused_without_parsing(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as handle:
        handle.write(b"a: " + b"x" * (MAX_BYTES * 40) + b"\n")
    start = time.process_time()
    with pytest.raises(RecipeError) as info:
        read_recipe_text(path)
    assert time.process_time() - start < 1.0
    assert "larger than the 256 KiB limit" in str(info.value)


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"version: 1\nname: x\x00\x01\x02")
    with pytest.raises(RecipeError) as info:
        read_recipe_text(path)
    assert str(info.value).startswith(f"{path}:2:8: error: file contains a NUL byte")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        read_recipe_text(path)
    assert "1:10: error: file is not valid UTF-8" in str(info.value)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        read_recipe_text(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a directory"):
        read_recipe_text(tmp_path)


def test_largest_allowed_file_parses_quickly() -> None:
    # A wide, legal document just under the size limit: the bound that keeps parsing under a second.
    row = "  - {match: 'model\\.layers\\.\\d+\\.mlp', scheme: mxfp8}\n"
    text = "rules:\n" + row * ((MAX_BYTES - 100) // len(row))
    start = time.process_time()
    doc = load_yaml(text, "r.yaml")
    assert time.process_time() - start < 2.0
    assert len(doc.data["rules"]) > 1000
