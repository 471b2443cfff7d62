"""Compile :func:`mxrun.kernels.mid_m_gemm._mid_m_kernel` for sm_90 without a GPU and print the pending counts of
its ``wgmma.wait_group`` instructions, one JSON list per case given on the command line.

Run as a script, in a process without ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` gives functions
that cannot be compiled): ``python tests/kernels/sm90_ptx.py bf16,channel,0,128,1 ...`` where each case is
``dtype,weights,fold,m,split_k`` with dtype ``bf16``, ``fp16`` or ``e4m3`` (W8A8: activation codes, per-row or
1x128 group scales, a bf16 output) and weights one of ``channel``, ``block`` and ``mx``. Used by
``test_mid_m_gemm.py``.
"""

from __future__ import annotations

import json
import re
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from mxrun.kernels.mid_m_gemm import MX_CODES_AHEAD, _mid_m_kernel, config_for


def wgmma_waits(dtype: str, weights: str, fold: int, m: int, split_k: int) -> list[int]:
    """The ``N`` of every ``wgmma.wait_group.sync.aligned N`` in the kernel's sm_90 PTX for ``m`` rows' tile."""
    config = config_for(m)
    codes = dtype == "e4m3"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "e4m3": torch.float8_e4m3fn}[dtype]
    act = torch.empty(256, 4096, dtype=torch_dtype)
    weight = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn)
    constants = {
        "B_MX": weights == "mx", "B_SCALE": {"mx": 0, "channel": 2, "block": 3}[weights], "HAS_BIAS": True,
        "A_SCALE": (3 if weights == "block" else 2) if codes else 0, "SPLIT_K": split_k,
        "MMA": {"bf16": 1, "fp16": 2, "e4m3": 3}[dtype], "FAST_WIDEN": True, "MX_FOLD": fold,
        "CODES_AHEAD": weights == "mx" and MX_CODES_AHEAD,
        "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
    }  # fmt: skip
    out = "bf16" if codes else dtype
    pointers = {"bs_ptr": "*u8", "p_ptr": "*fp32", "b_scale_ptr": "*fp32", "a_scale_ptr": "*fp32"}
    pointers["bias_ptr"] = pointers["c_ptr"] = f"*{out}"
    names = _mid_m_kernel.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif name == "a_desc":
            signature[name] = mangle_type(TensorDescriptor.from_tensor(act, [config.block_m, config.block_k]))
        elif name == "w_desc":
            signature[name] = mangle_type(
                TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k])
            )
        elif name in pointers:
            signature[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "step_one" else "i32"
    source = ASTSource(_mid_m_kernel, signature, {(names.index(n),): v for n, v in constants.items()}, attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    ptx = compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    if "wgmma.mma_async" not in ptx:
        raise AssertionError("no wgmma in the kernel's PTX")
    return [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)]


if __name__ == "__main__":
    for case in sys.argv[1:]:
        dtype, weights, fold, m, split_k = case.split(",")
        print(json.dumps(wgmma_waits(dtype, weights, int(fold), int(m), int(split_k))))
