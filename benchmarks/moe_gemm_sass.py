"""What the MoE grouped GEMM compiles to on Hopper, without a GPU: compiles the regular kernel of
``mxrun/kernels/moe_gemm.py`` for sm_90 with ``triton.compile`` and prints the MMA layout Triton chose, registers,
stack and shared memory per program, and the instruction mix of the main loop's SASS (from the ``cuobjdump``
that ships with Triton), register moves counted apart. ``--gluon`` compiles the Gluon kernel of
``mxrun/kernels/moe_wgmma_decoded.py`` instead (its K step is 128; ``--block-n`` and ``--block-k`` do not apply).
The README's and the kernels' instruction counts came from this with Triton 3.6 (the device's version; other
versions give other numbers):

    PYTHONPATH=. python benchmarks/moe_gemm_sass.py --block-m 32 --block-n 64 --block-k 256 --weights mxfp8
    PYTHONPATH=. python benchmarks/moe_gemm_sass.py --gluon --block-m 64 --stages 2 --weights mxfp8
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mxrun.kernels.moe_gemm import _moe_grouped_gemm_kernel

_W_MODES = {"fp8-channel": 0, "mxfp8": 2}
_POINTERS = {
    "a_ptr": "*bf16",
    "a_scale_ptr": "*fp32",
    "w_ptr": "*fp8e4nv",
    "routing_ptr": "*fp32",
    "c_ptr": "*bf16",
    "sorted_pairs_ptr": "*i32",
    "block_expert_ptr": "*i32",
}


def _source(source_type, kernel, constexprs: dict, w_mode: int, divisible) -> object:
    """The compile source of ``kernel``: constexprs as given, pointers 16-byte aligned, and the int arguments
    for which ``divisible(name)`` holds specialized as multiples of 16 (as the launcher's would be)."""
    pointers = dict(_POINTERS, w_scale_ptr="*u8" if w_mode == 2 else "*fp32")
    names = kernel.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if divisible(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return source_type(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()}, attrs)


def compile_kernel(
    block_m: int, block_n: int, block_k: int, warps: int, stages: int, weights: str, gated: bool
):
    """The kernel as the launcher runs it for bf16 activations (K-contiguous operands, 16-aligned pointers and
    strides, even K, MX scales folded into the widening)."""
    w_mode = _W_MODES[weights]
    constexprs = {
        "A_GATHER": gated, "A_MODE": 0, "A_ROUND_UP": True, "W_MODE": w_mode, "GATED": gated,
        "MUL_ROUTING": not gated, "SOFT_CAST": True, "DOT_FP32": False, "EVEN_K": True, "BLOCK_M": block_m,
        "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 16, "MAX_IMPRECISE_ACC": None, "FAST_WIDEN": True,
        "MX_FOLD": w_mode == 2, "ZERO_PADDING": False, "stride_ak": 1, "stride_wk": 1, "stride_cn": 1,
    }  # fmt: skip
    source = _source(
        ASTSource, _moe_grouped_gemm_kernel, constexprs, w_mode,
        lambda name: name.startswith("stride") or name in ("N", "K", "n_rows_layout"),
    )  # fmt: skip
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )


def compile_gluon_kernel(
    block_m: int, warps: int, stages: int, weights: str, gated: bool, row_sets: int = 2, tail_m: int = 32
):
    """The Gluon kernel as the launcher runs it (only K and the layout's row count specialized as multiples of
    16; the strides as the kernel's hints make them)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from mxrun.kernels.moe_wgmma_decoded import moe_decoded_wgmma_kernel

    w_mode = {**_W_MODES, "fp8-block": 1}[weights]
    constexprs = {
        "A_GATHER": gated, "W_MODE": w_mode, "GATED": gated, "ROW_SETS": row_sets, "MUL_ROUTING": not gated,
        "BLOCK_M": block_m, "STAGES": stages, "GROUP_M": 8, "TAIL_M": tail_m if tail_m < block_m else 0,
    }  # fmt: skip
    source = _source(
        GluonASTSource,
        moe_decoded_wgmma_kernel,
        constexprs,
        w_mode,
        lambda name: name in ("K", "n_rows_layout"),
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _cuobjdump(*args: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def mma_loops(sass: str) -> list[list[str]]:
    """The innermost loops holding MMAs (a backward branch's range with no such loop inside), longest first: one
    per variant a kernel compiles into its body (the Gluon kernel's full and narrow blocks)."""
    code = [
        (int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s*(.*?);", sass)
    ]
    ranges = []
    for address, text in code:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            if any("MMA" in t for a, t in code if start <= a <= address):
                ranges.append((start, address))
    innermost = [r for r in ranges if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in ranges)]
    loops = [[t for a, t in code if start <= a <= end] for start, end in innermost]
    return sorted(loops, key=len, reverse=True)


def loop_mix(body: list[str]) -> tuple[int, collections.Counter, int]:
    """Instructions of one loop, their opcodes, and how many are register moves (MOV, IMAD.MOV)."""
    opcodes = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    moves = sum(1 for t in body if re.search(r"\b(IMAD\.MOV|MOV)\b", t))
    return len(body), opcodes, moves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-m", type=int, default=32)
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--block-k", type=int, default=256)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--weights", choices=[*_W_MODES, "fp8-block"], default="mxfp8")
    parser.add_argument("--down", action="store_true", help="the down GEMM (default: gate/up, SiLU fused)")
    parser.add_argument("--gluon", action="store_true", help="the Gluon decoded-weight wgmma kernel")
    parser.add_argument("--row-sets", type=int, choices=[1, 2], default=2, help="--gluon --down: row sets")
    parser.add_argument("--tail-m", type=int, choices=[0, 16, 32, 64], default=32, help="--gluon: tail MMA N")
    args = parser.parse_args()
    if args.gluon:
        kernel = compile_gluon_kernel(
            args.block_m, args.warps, args.stages, args.weights, not args.down, args.row_sets, args.tail_m
        )
        args.block_k = 128
    elif args.weights == "fp8-block":
        parser.error("--weights fp8-block: the Gluon kernel only (--gluon)")
    else:
        kernel = compile_kernel(
            args.block_m, args.block_n, args.block_k, args.warps, args.stages, args.weights, not args.down
        )
    layouts = sorted(set(re.findall(r"#ttg\.nvidia_mma<\{[^}]*\}>", kernel.asm["ttgir"])))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = re.search(r"REG:\d+ STACK:\d+", _cuobjdump("-res-usage", cubin.name))
        sass = _cuobjdump("-sass", cubin.name)
    print(
        f"triton {triton.__version__}, sm_90: {usage.group(0) if usage else '?'} SHARED:{kernel.metadata.shared}"
    )
    print("MMA layout:", *layouts)
    for i, body in enumerate(mma_loops(sass)):  # the Gluon kernel: the full block's loop, then narrow ones
        count, opcodes, moves = loop_mix(body)
        name = "main loop" if i == 0 else "narrower loop"
        print(f"{name}: {count} instructions per K step of {args.block_k} (per warp), {moves} register moves")
        print("  " + ", ".join(f"{op} {n}" for op, n in opcodes.most_common(16)))


if __name__ == "__main__":
    main()
