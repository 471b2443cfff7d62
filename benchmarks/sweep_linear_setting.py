"""Sweep one module setting of the Linear GEMMs over ``bench_linear.py`` cases, the values interleaved and
repeated in one run (single cases move +-5% between runs; interleaving keeps drift out of the comparison),
every case with its ``torch._scaled_mm`` anchor. This is how the Gluon kernel's pipeline depths
(``WGMMA_NARROW_STAGES``, ``WGMMA_WIDE_STAGES``) were chosen.

    PYTHONPATH=. python benchmarks/sweep_linear_setting.py --setting wgmma.WGMMA_WIDE_STAGES --values 4 3 \\
        --ms 4096 16384 --columns scaled_mm fp8-channel fp8-tensor --json out.json
"""

from __future__ import annotations

import argparse
import math

from benchmarks import bench_linear
from benchmarks.sweep_moe_gluon import _write, check_setting
from mxrun.kernels import (
    fp8_quantize,
    fp8_tma_gemm,
    fp8_wgmma_gemm,
    mid_m_gemm,
    mx_wgmma_small_m,
    mxfp8_gemm,
    scaled_gemm,
    small_m_gemm,
)

MODULES = {
    "tma": fp8_tma_gemm,
    "wgmma": fp8_wgmma_gemm,
    "mxfp8": mxfp8_gemm,
    "scaled": scaled_gemm,
    "quantize": fp8_quantize,
    "mid": mid_m_gemm,
    "small": small_m_gemm,
    "mxrows": mx_wgmma_small_m,
}


def sweep(setting: str, values: list[int], shapes: list[str], ms: list[int], columns: list[str], rep_ms: int,
          repeats: int, json_path: str | None = None, cold_weights: bool = False) -> list[dict]:  # fmt: skip
    """``bench_linear.run`` once per value and repeat (values interleaved), the setting restored afterwards;
    rows carry ``setting``, ``value`` and ``repeat`` and are written to ``json_path`` after each run.
    ``cold_weights``: as ``bench_linear.py --graph --cold-weights`` (weights from DRAM, as in a forward)."""
    module_name, name = setting.split(".", 1)
    module = MODULES[module_name]
    saved = getattr(module, name)
    rows: list[dict] = []
    try:
        for repeat in range(repeats):
            for value in values:
                setattr(module, name, value)
                fp8_quantize._fp8_launch_plan.cache_clear()  # launch plans read the quantize settings
                print(f"{setting} = {value} (repeat {repeat})", flush=True)
                for row in bench_linear.run(
                    shapes, ms, columns, rep_ms, graph=True, cold_weights=cold_weights
                ):
                    rows.append({**row, "setting": setting, "value": value, "repeat": repeat})
                if json_path:
                    _write(rows, json_path)
    finally:
        setattr(module, name, saved)
        fp8_quantize._fp8_launch_plan.cache_clear()
    return rows


def summarize(rows: list[dict], values: list[int], columns: list[str]) -> None:
    """Per case and column: each value's ratio against ``scaled_mm`` (one per repeat); then, for each value after
    the first, the geometric mean of its time over the first value's, over every case, column and repeat, and
    per column (a setting may help one kind of operand and hurt another)."""
    timed = [c for c in columns if c not in ("bf16", "scaled_mm")]
    logs: dict[int, dict[str, list[float]]] = {v: {c: [] for c in timed} for v in values}
    cases = sorted(
        {(r["shape"], r["M"]) for r in rows}, key=lambda c: (list(bench_linear.SHAPES).index(c[0]), c[1])
    )
    for shape, m in cases:
        line = f"{shape:<26} M={m:>6}"
        for column in timed:
            for value in values:
                runs = [r for r in rows if (r["shape"], r["M"], r["value"]) == (shape, m, value)]
                ratios = [r["us"]["scaled_mm"] / r["us"][column] for r in runs if r["us"].get(column)]
                line += f" | {column} {value}: " + " ".join(f"{x:.3f}" for x in ratios)
                base = [r for r in rows if (r["shape"], r["M"], r["value"]) == (shape, m, values[0])]
                for run, first in zip(runs, base, strict=True):
                    if run["us"].get(column) and first["us"].get(column):
                        logs[value][column].append(math.log(run["us"][column] / first["us"][column]))
        print(line)
    for value in values[1:]:
        every = [x for column in timed for x in logs[value][column]]
        print(f"value {value} against {values[0]}: time {_geomean_line(every)} (geometric mean)")
        for column in timed:
            print(f"    {column}: {_geomean_line(logs[value][column])}")


def _geomean_line(log_ratios: list[float]) -> str:
    """``x<geometric mean>, faster in <n> of <all>`` for log time ratios (negative: faster)."""
    mean = math.exp(sum(log_ratios) / max(len(log_ratios), 1))
    faster = sum(1 for x in log_ratios if x < 0)
    return f"x{mean:.3f}, faster in {faster} of {len(log_ratios)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True, help="module.NAME, module one of: " + ", ".join(MODULES))
    parser.add_argument("--values", type=int, nargs="+", required=True)
    parser.add_argument(
        "--shapes", nargs="+", default=list(bench_linear.SHAPES), choices=list(bench_linear.SHAPES)
    )
    parser.add_argument("--ms", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--columns", nargs="+", default=["scaled_mm", "fp8-channel", "fp8-tensor"])
    parser.add_argument("--rep-ms", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the rows here (atomically)")
    parser.add_argument(
        "--cold-weights", action="store_true", help="weights from DRAM, as bench_linear.py --cold-weights"
    )
    args = parser.parse_args()
    check_setting(parser, args.setting, MODULES)
    columns = list(dict.fromkeys(["scaled_mm", *args.columns]))
    rows = sweep(
        args.setting,
        args.values,
        args.shapes,
        args.ms,
        columns,
        args.rep_ms,
        args.repeats,
        args.json,
        args.cold_weights,
    )
    summarize(rows, args.values, columns)


if __name__ == "__main__":
    main()
