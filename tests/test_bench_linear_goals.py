"""The Linear benchmark's goal summary: counts and verdicts come from the ratios, the worst case is named."""

from __future__ import annotations

from benchmarks.bench_linear import goals


def _row(shape: str, m: int, **us: float) -> dict:
    return {"shape": shape, "M": m, "us": us}


def test_goal_lines_count_cases_and_name_the_worst() -> None:
    rows = [
        _row("a", 4096, bf16=100.0, scaled_mm=60.0, **{"fp8-channel": 62.0, "fp8-block": 70.0}),
        _row("b", 4096, bf16=100.0, scaled_mm=60.0, **{"fp8-channel": 75.0, "fp8-block": 70.0}),
        _row("a", 16, bf16=20.0, scaled_mm=18.0, **{"fp8-channel": 11.0}),
        _row("a", 256, bf16=30.0, scaled_mm=20.0, **{"fp8-channel": 100.0}),  # in no goal's rows
    ]
    lines = goals(rows)
    assert lines[0] == (
        "fp8-channel M >= 1024: >= 0.95x scaled_mm: MISSED (1/2 cases meet it; worst 0.80x, b M=4096)"
    )
    assert lines[1].startswith("fp8-channel M <= 16: >= 1.7x bf16: met (1/1 cases meet it; worst 1.82x")
    assert lines[2].startswith("fp8-block M >= 1024: >= 0.85x scaled_mm: met (2/2")
    assert len(lines) == 3  # columns absent from the rows give no line


def test_rotating_goes_round_the_copies() -> None:
    """--cold-weights: each call takes the next copy's callable, wrapping around, so consecutive calls (and the
    calls a CUDA graph captures) read different weights."""
    from benchmarks.bench_linear import _rotating

    seen: list[int] = []
    call = _rotating([lambda i=i: seen.append(i) for i in range(3)])
    for _ in range(7):
        call()
    assert seen == [0, 1, 2, 0, 1, 2, 0]
