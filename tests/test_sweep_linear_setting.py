"""The A/B tool's summary: each value's time against the first value's, over all and per column."""

from __future__ import annotations

from benchmarks.sweep_linear_setting import summarize


def _row(value: int, repeat: int, shape: str, m: int, **us: float) -> dict:
    return {"shape": shape, "M": m, "value": value, "repeat": repeat, "us": {"scaled_mm": 10.0, **us}}


def test_summary_gives_each_columns_geometric_mean(capsys) -> None:
    """Value 1 halves ``a``'s time and doubles ``b``'s in both cases: over all it is even (x1.000, faster in 2 of
    4), per column x0.500 (2 of 2) and x2.000 (0 of 2), which the overall line alone would hide."""
    shapes = ["8B qkv 4096->6144", "8B o 4096->4096"]
    rows = [
        _row(value, 0, shape, 1, a=4.0 / (2 if value else 1), b=4.0 * (2 if value else 1))
        for shape in shapes
        for value in (0, 1)
    ]
    summarize(rows, [0, 1], ["scaled_mm", "a", "b"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("8B qkv 4096->6144") and "| a 0: 2.500 | a 1: 5.000 |" in out[0]
    assert out[2] == "value 1 against 0: time x1.000, faster in 2 of 4 (geometric mean)"
    assert out[3] == "    a: x0.500, faster in 2 of 2"
    assert out[4] == "    b: x2.000, faster in 0 of 2"
