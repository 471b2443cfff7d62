"""The experimental Gluon block-scaled MoE grouped GEMM (``mxrun/kernels/moe_wgmma_block.py``) against a
float64 reference. It needs an sm_90 GPU (TMA, wgmma).

Bound, derived: the kernel's operand values are exact (E4M3 codes, power-of-two-free fp32 scales applied to
each 128-K step's product in fp32), but Hopper's FP8 wgmma accumulates a step's 128 products with a reduced
precision: test_scaled_gemm.py allows ``2^-10 sum_k |a_k w_k|`` for it, plus one bf16 ulp for the output
rounding and ``2^-12`` of the RMS for fp32 order effects. Gated, with gate ``g`` and up ``u`` each within
their allowances ``dg``, ``du``: ``|d(SiLU(g) u)| <= 1.1 dg (|u| + du) + (|SiLU(g)| + 1.1 dg) du`` (SiLU's
slope is within [-0.1, 1.1]), plus the ulp of the stored ``h``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F_nn

from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8_reference
from mxrun.kernels.moe_gemm import (
    ExpertActivation,
    ExpertWeightFormat,
    dequantize_experts,
    quantize_dequantize_activation,
)
from mxrun.kernels.moe_routing import group_tokens
from mxrun.kernels.moe_wgmma_decoded import HAS_GLUON
from tests.kernels.test_moe_gemm import _routing, _stack, _x

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not (HOPPER and HAS_GLUON), reason="needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("k", [256, 384])
@pytest.mark.parametrize("group_m", [0, 3])
def test_gpu_block_scaled_grouped_gemm_matches_reference(gated, k, group_m) -> None:
    """Two experts get 150 pairs each (two 128-row blocks apiece, the second mostly padding), three get
    nothing; N = 192 (gate columns in one row block, up columns in another; the down GEMM's last tile half
    past N); an even and an odd number of 128-K steps; both program orders (3 blocks per group leaves a
    partial last group)."""
    from mxrun.kernels.moe_wgmma_block import moe_wgmma_block_gemm

    experts, n, tokens, top_k = 5, 192, 150, 2
    weights = _stack(ExpertWeightFormat.FP8_BLOCK, experts, 2 * n if gated else n, k, seed=101)
    routing, index = _routing(tokens, experts, top_k, seed=102, only=[0, 3])
    x = _x(tokens if gated else tokens * top_k, k, seed=103)
    quantized = quantize_fp8_reference(x, Fp8Granularity.GROUP_1X128)
    groups = group_tokens(index, experts, 128)
    pairs = tokens * top_k
    out = torch.zeros(pairs, n, dtype=torch.bfloat16, device="cuda")
    moe_wgmma_block_gemm(
        quantized.data, quantized.scale, weights.data, weights.scale, groups.sorted_pair_ids,
        groups.block_expert, groups.num_pairs, out, gated=gated, gather_top_k=top_k if gated else None,
        routing_weights=None if gated else routing.reshape(-1), group_m=group_m,
    )  # fmt: skip

    a = quantize_dequantize_activation(x, ExpertActivation.FP8_GROUP).double()
    w = dequantize_experts(weights).double()
    expert = index.reshape(-1).long()
    rows = torch.arange(pairs, device="cuda") // top_k if gated else torch.arange(pairs, device="cuda")
    a_pairs = a[rows]  # [S, K]
    w_pairs = w[expert]  # [S, N_W, K]
    product = torch.einsum("sk,snk->sn", a_pairs, w_pairs)
    slack = 2.0**-10 * torch.einsum("sk,snk->sn", a_pairs.abs(), w_pairs.abs())
    ulp = 2.0**-7
    if gated:
        g, u = product[:, :n], product[:, n:]
        dg, du = slack[:, :n], slack[:, n:]
        reference = F_nn.silu(g) * u
        allowed = 1.1 * dg * (u.abs() + du) + (F_nn.silu(g).abs() + 1.1 * dg) * du
    else:
        scale = routing.reshape(-1, 1).double()
        reference = product * scale
        allowed = slack * scale.abs()
    allowed = allowed + ulp * reference.abs() + 2.0**-12 * reference.pow(2).mean().sqrt()
    excess = (out.double() - reference).abs() - allowed
    assert torch.isfinite(out.float()).all()
    assert excess.max() <= 0, f"max excess {excess.max().item():.3e} over the bound"


def test_wrong_scale_shapes_are_refused() -> None:
    """Checked before anything is launched, so this runs on any machine: scales of the wrong layout (per row
    instead of 1x128 groups, or missing) get a clear error, not a kernel reading out of bounds."""
    from mxrun.kernels.moe_wgmma_block import moe_wgmma_block_gemm
    from mxrun.kernels.scaled_gemm import GemmInputError

    data = torch.zeros(2, 128, 256, dtype=torch.float8_e4m3fn)
    block_scales = torch.ones(2, 1, 2)
    a = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    layout = torch.zeros(128, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    out = torch.zeros(4, 128, dtype=torch.bfloat16)
    for a_scale in (torch.ones(4, 1), None):
        with pytest.raises(GemmInputError, match="1x128 activation scales"):
            moe_wgmma_block_gemm(
                a, a_scale, data, block_scales, *layout, 4, out, gated=False, gather_top_k=None
            )
