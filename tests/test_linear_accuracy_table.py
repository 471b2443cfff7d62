"""The accuracy table of ``benchmarks/linear_accuracy.py`` on a small layer (CPU reference path): every preset
and kind of data is measured, every error is inside the bound the method tests derive, and the table orders
what it should (bf16 output rounding < weight-only < W8A8), so a scheme that silently skipped quantization or
doubled its error would show."""

from __future__ import annotations

import pytest

from benchmarks import linear_accuracy as acc
from mxrun.engine.schemes import PRESETS


@pytest.fixture
def rows(monkeypatch) -> list[dict]:
    monkeypatch.setattr(acc, "SHAPES", {"small 256->160": (256, 160)})
    return acc.run(acc.torch.device("cpu"), [8])


def test_every_preset_and_kind_within_its_bound(rows: list[dict]) -> None:
    assert {(r["scheme"], r["kind"]) for r in rows} == {(s, k) for s in ["bf16", *PRESETS] for k in acc.KINDS}
    for r in rows:
        assert 0 < r["rel_err"] <= r["bound"], r
        assert r["max_err"] > 0


def test_error_orders_bf16_weight_only_w8a8(rows: list[dict]) -> None:
    err = {(r["scheme"], r["kind"]): r["rel_err"] for r in rows}
    for kind in acc.KINDS:
        for name, scheme in PRESETS.items():
            if scheme["activations"] is None:
                continue
            weight_only = name + "-weight-only"
            assert err["bf16", kind] < err[weight_only, kind] < err[name, kind], (name, kind)
            # one quantized operand: about 2^-4 / sqrt(3) / 1.6 relative (E4M3 rounding), never near bf16's 2^-9
            assert 2.0**-7 < err[weight_only, kind] < 2.0**-4


def test_markdown_names_every_scheme_once_per_table(rows: list[dict]) -> None:
    text = acc.markdown(rows, "cpu", "benchmarks/linear_accuracy.py --device cpu")
    tables = text.count("| scheme |")
    assert tables == 2  # the worst case, then the one shape and M
    for name in PRESETS:
        assert text.count(f"| {name} |") == tables
