"""Sweep one module setting of the Gluon MoE kernels (program order, ring slots) over whole MoE layers timed by
``bench_moe.py``, every value in the same run with the bf16 ``torch._grouped_mm`` anchor beside it. This is how
``DECODED_WGMMA_GROUP_M``, ``DECODED_WGMMA_STAGES``, ``BLOCK_GROUP_M`` and the launcher's Gluon settings in
``moe_gemm`` are chosen.

    PYTHONPATH=. python benchmarks/sweep_moe_gluon.py --setting decoded.DECODED_WGMMA_GROUP_M --values 0 8 16 \\
        --shapes DeepSeek-V3-like --tokens 1024 8192 --columns mxfp8-wo:gluon fp8-channel-wo:gluon --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from benchmarks import bench_moe
from mxrun.kernels import moe_gemm, moe_wgmma_block, moe_wgmma_decoded

MODULES = {"decoded": moe_wgmma_decoded, "block": moe_wgmma_block, "moe_gemm": moe_gemm}


def _write(rows: object, path: str) -> None:
    """``rows`` as JSON at ``path``, atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
        json.dump(rows, handle, indent=1)
    os.replace(handle.name, path)


def check_setting(parser: argparse.ArgumentParser, setting: str, modules: dict) -> None:
    """Exit through ``parser`` unless ``setting`` is ``module.NAME`` of one of ``modules`` and a GPU is there
    (also used by ``sweep_linear_setting.py``)."""
    module_name, _, name = setting.partition(".")
    if module_name not in modules or not hasattr(modules[module_name], name):
        parser.error(f"--setting {setting!r}: expected module.NAME with module one of {', '.join(modules)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")


def sweep(setting: str, values: list[int], shapes: list[str], tokens: list[int], columns: list[str],
          rep_ms: int, draws: int, json_path: str | None = None) -> list[dict]:  # fmt: skip
    """``bench_moe.run`` of each shape once per value of ``setting`` (``module.NAME``), the value restored
    afterwards; the rows so far are written to ``json_path`` after each run, so that a sweep cut short keeps
    every shape it finished with all values side by side."""
    module_name, name = setting.split(".", 1)
    module = MODULES[module_name]
    saved = getattr(module, name)
    rows = []
    try:
        for shape in shapes:
            for value in values:
                setattr(module, name, value)
                print(f"{setting} = {value}", flush=True)
                for row in bench_moe.run([shape], tokens, columns, rep_ms, draws):
                    rows.append({**row, "setting": setting, "value": value})
                if json_path:
                    _write(rows, json_path)
    finally:
        setattr(module, name, saved)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", required=True, help="module.NAME, module one of: " + ", ".join(MODULES))
    parser.add_argument("--values", type=int, nargs="+", required=True)
    parser.add_argument("--shapes", nargs="+", default=["DeepSeek-V3-like"], choices=list(bench_moe.SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--columns", nargs="+", default=["mxfp8-wo:gluon"])
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--json", help="write the rows here (atomically)")
    args = parser.parse_args()
    check_setting(parser, args.setting, MODULES)
    sweep(
        args.setting, args.values, args.shapes, args.tokens, args.columns, args.rep_ms, args.draws, args.json
    )


if __name__ == "__main__":
    main()
