"""Quantized MoE experts: a Triton grouped GEMM over expert-sorted tokens, its launcher, the torch reference.

The experts of one MoE layer hold two weight stacks, K last (the transformers-5 layout):

* ``gate_up`` ``[E, 2I, H]``: rows ``0..I-1`` of expert ``e`` are its gate projection, rows ``I..2I-1`` its up
  projection;
* ``down`` ``[E, H, I]``.

For tokens ``x`` ``[T, H]`` routed to ``k`` experts each (``top_k_index`` / ``top_k_weights`` ``[T, k]``, from
the model's own router), the layer computes, for each pair ``p = (t, j)`` with expert ``e``,

    h_p = SiLU(x_t W_gate[e]^T) * (x_t W_up[e]^T)              (fp32, then rounded to x's dtype)
    y_p = top_k_weights[t, j] * (h_p W_down[e]^T)              (fp32, then rounded to x's dtype)
    out_t = sum_j y_(t, j)                                     (fp32 sum of the rounded y, rounded once)

which is what the transformers-5 experts modules compute (they round the same intermediates to the model dtype).

Weight formats (:class:`ExpertWeightFormat`), all E4M3 codes ``[E, N, K]``:

* ``FP8_TENSOR``: fp32 scale ``[E, 1, 1]`` (one per expert), applied in the epilogue;
* ``FP8_CHANNEL``: fp32 ``[E, N, 1]`` (one per output row), applied in the epilogue;
* ``FP8_BLOCK``: fp32 ``[E, ceil(N/128), ceil(K/128)]``, applied to each 128-wide K step's partial product
  (``BLOCK_K = 128``);
* ``MXFP8``: uint8 E8M0 ``[E, N, K/32]``: decoded in registers, ``E4M3 * 2^(code-127)``, which is exact in
  bf16/fp16, so the bf16 MMA sees exactly the reference's weight values.

Activations (:class:`ExpertActivation`): ``NONE`` keeps them bf16/fp16 (W8A16, the weight-bound regime: the
weight is widened in registers, E4M3 -> bf16 is exact); ``FP8_TOKEN`` / ``FP8_TENSOR`` / ``FP8_GROUP``
quantize them dynamically to E4M3 (per row, per tensor, 1x128 groups) with the quantize kernels and run FP8 MMAs
(W8A8); ``MX_*`` quantize-dequantize them to MXFP8 in registers (the MXFP8 W8A8 scheme's numerics on Hopper,
which has no MX MMA) and run a bf16 MMA. The down projection's activations are ``h``, quantized the same way.

The grouped GEMM (:func:`moe_grouped_gemm_triton`) reads the rows of its A operand through the expert-sorted,
``BLOCK_M``-padded layout of :func:`~mxrun.kernels.moe_routing.group_tokens` (built in one launch by
:mod:`mxrun.kernels.moe_grouping` for up to 4096 pairs): each program owns ``BLOCK_M``
rows of one expert and ``BLOCK_N`` output columns; blocks past the routed pairs (the layout is sized by a host
bound, not by the routing) exit at once. Gate/up variant: two accumulators (gate rows ``n``, up rows ``I + n``)
and ``SiLU(gate) * up`` in the epilogue; down variant: the routing weight multiplied in the epilogue. The top-k
reduction adds the ``k`` rows of each token in fp32 in one launch (:mod:`mxrun.kernels.moe_topk_sum`). Where
the weight is decoded in registers for a bf16 MMA and the blocks are large, a variant with the operands swapped
runs instead (:mod:`mxrun.kernels.moe_weight_rows_gemm`, chosen by :func:`moe_swap_ab`); on sm_90 with 17-256
pairs per expert a Gluon kernel takes both GEMMs of such layers (:mod:`mxrun.kernels.moe_wgmma_decoded`, chosen
by :func:`moe_decoded_wgmma`). No host sync anywhere
on this path: the pair count, grid and buffers depend only on ``T``, ``k``, ``E`` and ``BLOCK_M``.

Launch rules are those of :mod:`mxrun.kernels.scaled_gemm`: M (pairs) is a run-time argument; ``BLOCK_M`` and
the tile come from a bucket of the mean pairs per expert; ragged N and K tails are masked; ``T = 1`` works.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mxrun.kernels.backend import Backend, resolve_backend, tl, triton, triton_interpreting
from mxrun.kernels.e4m3 import e4m3_to_bf16, fast_widen_usable
from mxrun.kernels.fp8_quantize import (
    FP8_BLOCK,
    Fp8Granularity,
    dequantize_fp8,
    quantize_fp8,
    quantize_fp8_reference,
)
from mxrun.kernels.moe_grouping import group_tokens_fast
from mxrun.kernels.moe_routing import TokenGroups
from mxrun.kernels.moe_topk_sum import topk_sum_triton
from mxrun.kernels.moe_weight_rows_gemm import layout_rows, moe_weight_rows_gemm_kernel
from mxrun.kernels.moe_wgmma_block import block_wgmma_usable, moe_wgmma_block_gemm
from mxrun.kernels.moe_wgmma_decoded import decoded_wgmma_usable, moe_decoded_wgmma_gemm
from mxrun.kernels.mx_regroup import regroup_mxfp8_reference, regroup_mxfp8_triton
from mxrun.kernels.mxfp8_gemm import mx_decode_weight
from mxrun.kernels.mxfp8_quantize import (
    MX_BLOCK_SIZE,
    MxScaleRule,
    dequantize_mxfp8,
    mx_round_rows,
    mx_round_triton,
    quantize_mx_group128_reference,
    quantize_mx_group128_triton,
    quantize_mxfp8,
    quantize_mxfp8_reference,
    resolve_cast,
)
from mxrun.kernels.scaled_gemm import GemmConfig, GemmInputError, m_bucket, tile_ids

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
MOE_ALIGNED_MIN_PAIRS_PER_EXPERT = 512
"""MXFP8 W8A8 experts with at least this many routed pairs per expert on average take the aligned path:
both stacks regrouped per call to 128x128 power-of-two tiles (:mod:`mxrun.kernels.mx_regroup`), activations
MX-quantized over 1x128 groups, the block-scaled FP8 grouped GEMM. The regrouping costs one pass over both
stacks per call, which many rows per expert pay back. H100 (``benchmarks/bench_moe.py``, results in
``benchmarks/results/moe-aligned-h100.md`` and ``moe-h100.md``): at 2048 pairs per expert (Mixtral, 8192
tokens) aligned 0.87x of bf16 ``_grouped_mm`` against 0.61x decoded, at 512 (Qwen3, 8192 tokens) 1.10x
against 0.99x; at 256 (Mixtral, 1024 tokens) 0.67x, where the decoded path runs the weight-only GEMM (0.74x)."""
MOE_ALIGNED_MAX_BYTES = 2 << 30
"""...unless the two regrouped stacks (1 byte per weight, held for the call) would exceed this."""
MOE_ZERO_PADDING: bool | None = None
"""Forces how the grouped GEMMs read padding rows (True: zeros, False: pair 0's row); None: the rule of
:func:`moe_zero_padding`. Benchmarks set it to compare both in one run."""
MOE_DECODED_WGMMA: bool | None = None
"""Forces the Gluon kernel for weights decoded in registers on (where it can run) or off; None: the rule of
:func:`moe_decoded_wgmma`. Benchmarks set it to compare both in one run."""
MOE_BLOCK_WGMMA = True
"""Runs the Gluon block-scaled grouped GEMM (:mod:`mxrun.kernels.moe_wgmma_block`: FP8 1x128 activations met
by 128x128-block weights, 128-row layout blocks, sm_90) where it can, else the Triton kernel. H100, same run
(``bench_moe.py --columns fp8-block fp8-block:gluon-block``, ``benchmarks/results/moe-gluon-block-h100.md``):
1.09-1.32x faster on Mixtral-8x7B at 1024 / 8192 tokens and DeepSeek-V3-like at 8192, even at 1024; with its
program order since (:data:`~mxrun.kernels.moe_wgmma_block.BLOCK_GROUP_M`) more. Benchmarks turn it off
(column suffix ``:triton-block``) to compare."""
MOE_DECODED_WGMMA_BUCKETS = (32, 256)
"""The Gluon kernel of :mod:`mxrun.kernels.moe_wgmma_decoded` runs where the mean pairs per expert, rounded up
to a power of two, lies in this range (17-256 pairs). H100, weight-only columns (mxfp8-wo / fp8-channel-wo /
fp8-block-wo) against the Triton kernels in the same run (``bench_moe.py --columns X:gluon X:triton``,
``benchmarks/results/moe-gluon-warps-h100.json``): at 17-32 pairs the Triton kernels' 32-row blocks spill and
decode a busy expert's weights twice, the Gluon kernel's 64-row blocks rarely do (Mixtral-8x7B at 128 tokens
669 / 589 / 626 against 796 / 725 / 750 us; Qwen3-30B-A3B at 512 tokens 13-18% less time; the DeepSeek-V3-like
layer at 1024 tokens 3-9% less with :data:`MOE_DECODED_WGMMA_WIDE_EXPERTS`); with 128-row blocks at 33-256
pairs it gains too (Mixtral at 1024 tokens 2181 / 2032 / 2631 against 2551 / 2256 / 3189 us; DeepSeek at 8192
tokens mxfp8-wo 3% and fp8-block-wo 12% less time, fp8-channel-wo 3% more). With fewer pairs the Triton
kernels stream the weights faster (Mixtral at 16 tokens: 575-615 against 482-525 us), and with more (Qwen3 at
8192 tokens, 512 pairs: mxfp8-wo 2580 against 2472 us, ``results/moe-gluon-large-h100.json``)."""
MOE_DECODED_WGMMA_WIDE_EXPERTS: int | None = None
"""Layers with more experts than this run the Gluon kernel with two warp groups (128 weight rows per program,
sharing each activation tile); None: never. With every layout block read per column tile, two paid on the
DeepSeek-V3-like layer (256 experts; at 1024 tokens 6193 / 5598 / 5620 against 6592 / 6353 / 6218 us with
one, same sweep as above) while Mixtral and Qwen3 took 2-12% more time with two in 13 of their 15 cells. Since
the program order keeps the activation tiles in L2 (:data:`~mxrun.kernels.moe_wgmma_decoded.DECODED_WGMMA_GROUP_M`)
one warp group is faster there too (H100, same run, ``benchmarks/sweep_moe_gluon.py --setting
moe_gemm.MOE_DECODED_WGMMA_WIDE_EXPERTS --values 128 100000 --shapes DeepSeek-V3-like --tokens 1024 8192
--columns mxfp8 mxfp8-wo fp8-channel-wo``, ``results/moe-gluon-wide-h100.json``): at 1024 tokens 5430 / 5463 /
4877 -> 5206 / 5347 / 4751 us, at 8192 18582 / 19120 / 17114 -> 18088 / 18466 / 16450."""


class ExpertWeightFormat(enum.Enum):
    """How an expert stack is quantized (scale layouts in the module docstring)."""

    FP8_TENSOR = "fp8_tensor"
    FP8_CHANNEL = "fp8_channel"
    FP8_BLOCK = "fp8_block"
    MXFP8 = "mxfp8"


class ExpertActivation(enum.Enum):
    """What happens to the activations of both expert GEMMs (see the module docstring)."""

    NONE = "none"
    FP8_TENSOR = "fp8_tensor"
    FP8_TOKEN = "fp8_token"
    FP8_GROUP = "fp8_group"
    MX_ROUND_UP = "mx_round_up"
    MX_FLOOR = "mx_floor"

    @property
    def is_fp8(self) -> bool:
        return self in (ExpertActivation.FP8_TENSOR, ExpertActivation.FP8_TOKEN, ExpertActivation.FP8_GROUP)

    @property
    def is_mx(self) -> bool:
        return self in (ExpertActivation.MX_ROUND_UP, ExpertActivation.MX_FLOOR)


class ExpertWeights(NamedTuple):
    """One quantized projection stack: E4M3 ``data`` ``[E, N, K]`` and its ``scale`` (layout per ``format``)."""

    data: torch.Tensor
    scale: torch.Tensor
    format: ExpertWeightFormat


FP8_WEIGHT_GRANULARITY = {
    ExpertWeightFormat.FP8_TENSOR: Fp8Granularity.PER_TENSOR,
    ExpertWeightFormat.FP8_CHANNEL: Fp8Granularity.PER_ROW,
    ExpertWeightFormat.FP8_BLOCK: Fp8Granularity.BLOCK_128X128,
}
FP8_ACTIVATION_GRANULARITY = {
    ExpertActivation.FP8_TENSOR: Fp8Granularity.PER_TENSOR,
    ExpertActivation.FP8_TOKEN: Fp8Granularity.PER_ROW,
    ExpertActivation.FP8_GROUP: Fp8Granularity.GROUP_1X128,
}
_MX_RULE = {ExpertActivation.MX_ROUND_UP: MxScaleRule.ROUND_UP, ExpertActivation.MX_FLOOR: MxScaleRule.FLOOR}


def expert_scale_shape(fmt: ExpertWeightFormat, experts: int, n: int, k: int) -> tuple[int, int, int]:
    """Shape of the scale tensor of an ``[E, N, K]`` stack in ``fmt``."""
    if fmt is ExpertWeightFormat.FP8_TENSOR:
        return (experts, 1, 1)
    if fmt is ExpertWeightFormat.FP8_CHANNEL:
        return (experts, n, 1)
    if fmt is ExpertWeightFormat.FP8_BLOCK:
        return (experts, math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))
    return (experts, n, k // MX_BLOCK_SIZE)


def expert_scale_dtype(fmt: ExpertWeightFormat) -> torch.dtype:
    return torch.uint8 if fmt is ExpertWeightFormat.MXFP8 else torch.float32


def quantize_expert(
    weight: torch.Tensor, fmt: ExpertWeightFormat, mx_rule: MxScaleRule = MxScaleRule.ROUND_UP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one expert's ``[N, K]`` projection: ``(E4M3 [N, K], scale)`` with the scale shaped as one
    expert's slice of :func:`expert_scale_shape` (``FP8_TENSOR``: one scale for this expert alone). Triton on
    CUDA, torch elsewhere (same bytes)."""
    if weight.dim() != 2:
        raise GemmInputError(
            f"quantize_expert: one expert's [N, K] weight expected, got {tuple(weight.shape)}"
        )
    n, k = weight.shape
    if fmt is ExpertWeightFormat.MXFP8:
        quantized = quantize_mxfp8(weight, mx_rule)
        return quantized.data, quantized.scale_e8m0.view(torch.uint8)
    quantized = quantize_fp8(weight, FP8_WEIGHT_GRANULARITY[fmt])
    return quantized.data, quantized.scale.reshape(expert_scale_shape(fmt, 1, n, k)[1:])


def dequantize_experts(weights: ExpertWeights) -> torch.Tensor:
    """fp32 ``[E, N, K]`` (or one expert's ``[N, K]`` when given 2-D slices) values of a quantized stack."""
    data, scale, fmt = weights
    if fmt is ExpertWeightFormat.MXFP8:
        return dequantize_mxfp8(data, scale)
    if fmt is ExpertWeightFormat.FP8_BLOCK:
        return dequantize_fp8(data, scale, Fp8Granularity.BLOCK_128X128)
    return data.float() * scale  # [.., N, 1] or [.., 1, 1] broadcast over K


# ----------------------------------------------------------------------------------------------------------
# torch reference (the CPU path)
# ----------------------------------------------------------------------------------------------------------


def quantize_dequantize_activation(
    a: torch.Tensor, activation: ExpertActivation, aligned: bool = False
) -> torch.Tensor:
    """fp32 values of ``a`` ``[rows, K]`` after the dynamic activation quantization of ``activation``, with
    the quantize references (bit-identical to the kernels that quantize for the Triton path). ``aligned``: MX
    activations take the MX rule over 1x128 groups, as the aligned path does."""
    if activation is ExpertActivation.NONE:
        return a.float()
    if activation.is_mx and aligned:
        grouped = quantize_mx_group128_reference(a, _MX_RULE[activation])
        return dequantize_fp8(grouped.data, grouped.scale, Fp8Granularity.GROUP_1X128)
    if activation.is_mx:
        quantized = quantize_mxfp8_reference(a, _MX_RULE[activation])
        return dequantize_mxfp8(quantized.data, quantized.scale_e8m0)
    granularity = FP8_ACTIVATION_GRANULARITY[activation]
    quantized = quantize_fp8_reference(a, granularity)
    return dequantize_fp8(quantized.data, quantized.scale, granularity)


def moe_aligned(
    num_pairs: int, gate_up: ExpertWeights, down: ExpertWeights, activation: ExpertActivation
) -> bool:
    """Whether the Triton forward takes the aligned path (:data:`MOE_ALIGNED_MIN_PAIRS_PER_EXPERT`)."""
    if not (activation.is_mx and gate_up.format is down.format is ExpertWeightFormat.MXFP8):
        return False
    experts = gate_up.data.shape[0]
    small_enough = gate_up.data.numel() + down.data.numel() <= MOE_ALIGNED_MAX_BYTES
    return small_enough and num_pairs >= MOE_ALIGNED_MIN_PAIRS_PER_EXPERT * experts


def regroup_experts(weights: ExpertWeights, backend: Backend | str = Backend.AUTO) -> ExpertWeights:
    """An MXFP8 stack as ``FP8_BLOCK`` weights with power-of-two tile scales (:mod:`mxrun.kernels.mx_regroup`)."""
    if weights.format is not ExpertWeightFormat.MXFP8:
        raise GemmInputError(f"regroup_experts: needs an MXFP8 stack, got {weights.format.value}")
    if resolve_backend(backend, weights.data) is Backend.TRITON:
        regrouped = regroup_mxfp8_triton(weights.data, weights.scale)
    else:
        regrouped = regroup_mxfp8_reference(weights.data, weights.scale)
    return ExpertWeights(regrouped.data, regrouped.scale, ExpertWeightFormat.FP8_BLOCK)


def moe_experts_reference(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    activation: ExpertActivation = ExpertActivation.NONE,
    *,
    aligned: bool = False,
) -> torch.Tensor:
    """The experts forward in plain torch: a loop over the experts that received tokens, weights dequantized
    to fp32 one expert at a time, fp32 matmuls, the intermediates rounded to x's dtype as in the module
    docstring. Per-tensor activation scales are taken over all the layer's rows (x, or every pair's h), as
    the Triton path does. Pairs routed to an expert outside ``[0, E)`` contribute nothing. ``aligned``: what
    the Triton path's aligned MXFP8 W8A8 computes (:func:`moe_aligned`), for tests."""
    _check_inputs(x, top_k_index, top_k_weights, gate_up, down)
    if aligned:
        if not (activation.is_mx and gate_up.format is down.format is ExpertWeightFormat.MXFP8):
            raise GemmInputError("moe_experts_reference: aligned needs MXFP8 stacks and MX activations")
        gate_up, down = regroup_experts(gate_up, Backend.TORCH), regroup_experts(down, Backend.TORCH)
    tokens, top_k = top_k_index.shape
    experts, two_i, _ = gate_up.data.shape
    inter = two_i // 2
    expert_ids = top_k_index.reshape(-1)
    routing = top_k_weights.reshape(-1).float()
    token_of_pair = torch.arange(tokens * top_k, device=x.device) // top_k
    per_tensor = activation is ExpertActivation.FP8_TENSOR
    a_all = quantize_dequantize_activation(x, activation, aligned)  # row-wise: the same as per expert rows
    h = torch.zeros((tokens * top_k, inter), dtype=x.dtype, device=x.device)
    pairs_of = {}
    for e in expert_ids.unique().tolist():
        if not 0 <= e < experts:
            continue
        pairs = (expert_ids == e).nonzero().squeeze(1)
        pairs_of[e] = pairs
        w13 = dequantize_experts(ExpertWeights(gate_up.data[e], gate_up.scale[e], gate_up.format))
        gate_and_up = a_all[token_of_pair[pairs]] @ w13.T
        h[pairs] = (F.silu(gate_and_up[:, :inter]) * gate_and_up[:, inter:]).to(x.dtype)
    h_all = quantize_dequantize_activation(h, activation) if per_tensor else None
    y = torch.zeros((tokens * top_k, down.data.shape[1]), dtype=x.dtype, device=x.device)
    for e, pairs in pairs_of.items():
        w2 = dequantize_experts(ExpertWeights(down.data[e], down.scale[e], down.format))
        a = h_all[pairs] if per_tensor else quantize_dequantize_activation(h[pairs], activation, aligned)
        y[pairs] = ((a @ w2.T) * routing[pairs, None]).to(x.dtype)
    return y.view(tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)


def _check_inputs(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertWeights,
    down: ExpertWeights,
) -> None:
    fn = "moe_experts"
    if x.dim() != 2 or x.dtype not in ACTIVATION_DTYPES:
        raise GemmInputError(
            f"{fn}: hidden states must be 2-D [T, H] bf16/fp16, got {x.dtype} {tuple(x.shape)}"
        )
    if (
        top_k_index.dim() != 2
        or top_k_index.shape[0] != x.shape[0]
        or top_k_weights.shape != top_k_index.shape
    ):
        raise GemmInputError(
            f"{fn}: top_k_index and top_k_weights must both be [T={x.shape[0]}, k], got "
            f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}"
        )
    experts, two_i, hidden = gate_up.data.shape
    if two_i % 2 or hidden != x.shape[1]:
        raise GemmInputError(
            f"{fn}: gate_up must be [E, 2I, H={x.shape[1]}], got {tuple(gate_up.data.shape)}"
        )
    if tuple(down.data.shape) != (experts, hidden, two_i // 2):
        raise GemmInputError(
            f"{fn}: down must be [E={experts}, H={hidden}, I={two_i // 2}], got {tuple(down.data.shape)}"
        )
    for name, w in (("gate_up", gate_up), ("down", down)):
        e, n, k = w.data.shape
        if w.data.dtype != torch.float8_e4m3fn:
            raise GemmInputError(f"{fn}: {name} must be float8_e4m3fn, got {w.data.dtype}")
        if tuple(w.scale.shape) != expert_scale_shape(w.format, e, n, k):
            raise GemmInputError(
                f"{fn}: {name} scale for {w.format.value} must be {expert_scale_shape(w.format, e, n, k)}, "
                f"got {tuple(w.scale.shape)}"
            )


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _weight_operand(
    w_ptrs,  # [BLOCK_K, BLOCK_N] pointers into the E4M3 weight
    ws_ptrs,  # W_MODE 2: [G, BLOCK_N] pointers into the E8M0 codes; else unused
    k_ok,  # [BLOCK_K] K-tail mask (all true when EVEN_K)
    g_ok,  # [G]
    W_MODE: tl.constexpr,
    EVEN_K: tl.constexpr,
    A_FP8: tl.constexpr,
    DOT_FP32: tl.constexpr,
    MMA_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FAST_WIDEN: tl.constexpr,
    MX_FOLD: tl.constexpr,
):
    """The weight tile as the MMA takes it: E4M3 as is (FP8 MMA), widened to the MMA dtype (exact; to bf16 with
    :func:`~mxrun.kernels.e4m3.e4m3_to_bf16`), or for MXFP8 decoded with its power-of-two scales (exact: with
    MX_FOLD the scale rides on the bf16 widening's multiply, :func:`~mxrun.kernels.e4m3.e4m3_to_bf16_times`);
    fp32 when the interpreter runs the dot. The E8M0 codes load in their step: loading them the step before,
    which the Linear's split-K kernel gains from (:data:`~mxrun.kernels.small_m_gemm.MX_CODES_AHEAD`), took
    x1.029 the time here, slower in all 18 MXFP8 cases at 1-128 tokens on three layers, up to 7% at one token
    (H100, ``results/moe-codes-ahead-h100.log``; a switch on top of commit a162c04, not kept)."""
    if EVEN_K:  # noqa: SIM108 - constexpr branches, spelled as in the other kernels
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
    # one return statement: Triton types a function by its returns, and these branches give different dtypes
    if W_MODE == 2:
        if EVEN_K:  # noqa: SIM108
            codes = tl.load(ws_ptrs)
        else:
            codes = tl.load(ws_ptrs, mask=g_ok[:, None], other=127)
        operand = mx_decode_weight(w, codes, MX_FOLD, False)
        if not DOT_FP32:
            operand = operand.to(MMA_DTYPE)
    elif DOT_FP32:
        operand = w.to(tl.float32)
    elif A_FP8:
        operand = w
    elif MMA_DTYPE == tl.bfloat16:  # noqa: SIM300 - a constexpr parameter, not a constant
        operand = e4m3_to_bf16(w, FAST_WIDEN)
    else:
        operand = w.to(MMA_DTYPE)
    return operand


@triton.jit
def _moe_grouped_gemm_kernel(
    a_ptr,  # A_GATHER: [T, K] (row of pair p is p // TOP_K), else [S, K] (row p); bf16/fp16, or float8e4nv
    #         for A_MODE 1, 2; (r, k) at r*stride_ar + k*stride_ak, K contiguous in practice
    a_scale_ptr,  # A_MODE 1: fp32 [rows] at r*stride_asr (stride 0: one per-tensor scale);
    #               A_MODE 2: fp32 [rows, cdiv(K, 128)] at r*stride_asr + g; else unused
    w_ptr,  # [E, N_W, K] float8e4nv; (e, n, k) at e*stride_we + n*stride_wn + k*stride_wk (K contiguous)
    w_scale_ptr,  # W_MODE 0: fp32 [E, N_W] at e*stride_wse + n*stride_wsn (stride_wsn 0: per-expert scalar);
    #               W_MODE 1: fp32 [E, cdiv(N_W, 128), cdiv(K, 128)] at e*stride_wse + i*stride_wsn + g;
    #               W_MODE 2: uint8 E8M0 [E, N_W, K/32] at e*stride_wse + n*stride_wsn + g
    routing_ptr,  # MUL_ROUTING: [S] fp32/bf16/fp16 routing weight of each pair, contiguous; else unused
    c_ptr,  # [S, N] bf16/fp16 output, row = pair id; (p, n) at p*stride_cm + n*stride_cn
    sorted_pairs_ptr,  # int32 [n_blocks * BLOCK_M]: pair id at each row of the layout, >= S on padding
    block_expert_ptr,  # int32 [n_blocks]: expert of each BLOCK_M rows, -1 for unused blocks
    num_pairs,  # S
    n_rows_layout,  # n_blocks * BLOCK_M
    N,  # output columns (I for the gated variant, whose weight has N_W = 2I rows)
    K,
    top_k,
    stride_ar,
    stride_ak,
    stride_asr,
    stride_we,
    stride_wn,
    stride_wk,
    stride_wse,
    stride_wsn,
    stride_cm,
    stride_cn,
    A_GATHER: tl.constexpr,
    A_MODE: tl.constexpr,  # 0 as is; 1 FP8 per-row/tensor scale; 2 FP8 1x128 groups; 3 MX qdq in registers
    A_ROUND_UP: tl.constexpr,
    W_MODE: tl.constexpr,  # 0 per-channel / per-expert (epilogue); 1 128x128 blocks (per K step); 2 MXFP8
    GATED: tl.constexpr,  # gate rows n and up rows N + n, SiLU(gate) * up in the epilogue
    MUL_ROUTING: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16/fp16/fp8 dots are wrong, run exact values in fp32
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128 when W_MODE == 1 or A_MODE == 2; a multiple of 32 for W_MODE 2 / A_MODE 3
    GROUP_M: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,
    FAST_WIDEN: tl.constexpr = False,  # bf16 MMA with E4M3 weights: e4m3_to_bf16's integer path (sm_90+)
    MX_FOLD: tl.constexpr = False,  # bf16 MMA with MXFP8 weights: the scales folded into that path
    ZERO_PADDING: tl.constexpr = False,  # padding rows read as zeros (else as pair 0's row)
):
    """One program: BLOCK_M layout rows (one expert) x BLOCK_N output columns, fp32 accumulation."""
    G: tl.constexpr = BLOCK_K // 32
    A_FP8: tl.constexpr = A_MODE == 1 or A_MODE == 2
    STEP_SCALED: tl.constexpr = W_MODE == 1 or A_MODE == 2
    MMA_DTYPE: tl.constexpr = c_ptr.dtype.element_ty
    pid_m, pid_n = tile_ids(n_rows_layout, N, BLOCK_M, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    expert = expert.to(tl.int64)

    pairs, row_ok, a_rows = layout_rows(sorted_pairs_ptr, pid_m, num_pairs, top_k, A_GATHER, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gate_rows = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, G)

    a_ptrs = a_ptr + a_rows[:, None] * stride_ar + offs_k[None, :] * stride_ak
    w_base = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk
    wg_ptrs = w_base + gate_rows[None, :] * stride_wn
    ws_base = w_scale_ptr + expert * stride_wse
    if W_MODE == 1:
        wsg_ptrs = ws_base + (gate_rows // 128) * stride_wsn  # [BLOCK_N], + K step
    else:
        wsg_ptrs = ws_base + gate_rows[None, :] * stride_wsn + offs_g[:, None]  # [G, BLOCK_N] (W_MODE 2)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        up_rows = gate_rows + N
        wu_ptrs = w_base + up_rows[None, :] * stride_wn
        if W_MODE == 1:
            wsu_ptrs = ws_base + (up_rows // 128) * stride_wsn
        else:
            wsu_ptrs = ws_base + up_rows[None, :] * stride_wsn + offs_g[:, None]
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kb * BLOCK_K + offs_k < K
        g_ok = kb * G + offs_g < K // 32
        if ZERO_PADDING and EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        elif ZERO_PADDING:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if A_MODE == 3:
            a = mx_round_rows(a, A_ROUND_UP, SOFT_CAST, BLOCK_M, BLOCK_K)
            if not DOT_FP32:
                a = a.to(MMA_DTYPE)
        elif DOT_FP32:
            a = a.to(tl.float32)
        if STEP_SCALED:
            step = tl.full([BLOCK_M, 1], 1.0, tl.float32)
            if A_MODE == 2:
                step = tl.load(a_scale_ptr + a_rows * stride_asr + kb)[:, None]
        w_g = _weight_operand(
            wg_ptrs, wsg_ptrs, k_ok, g_ok, W_MODE, EVEN_K, A_FP8, DOT_FP32, MMA_DTYPE, BLOCK_K, BLOCK_N,
            FAST_WIDEN, MX_FOLD,
        )  # fmt: skip
        if STEP_SCALED:
            part = tl.dot(a, w_g, max_num_imprecise_acc=MAX_IMPRECISE_ACC) * step
            if W_MODE == 1:
                part = part * tl.load(wsg_ptrs + kb)[None, :]
            acc_g += part
        else:
            acc_g = tl.dot(a, w_g, acc_g, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        if GATED:
            w_u = _weight_operand(
                wu_ptrs, wsu_ptrs, k_ok, g_ok, W_MODE, EVEN_K, A_FP8, DOT_FP32, MMA_DTYPE, BLOCK_K, BLOCK_N,
                FAST_WIDEN, MX_FOLD,
            )  # fmt: skip
            if STEP_SCALED:
                part = tl.dot(a, w_u, max_num_imprecise_acc=MAX_IMPRECISE_ACC) * step
                if W_MODE == 1:
                    part = part * tl.load(wsu_ptrs + kb)[None, :]
                acc_u += part
            else:
                acc_u = tl.dot(a, w_u, acc_u, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            wu_ptrs += BLOCK_K * stride_wk
            if W_MODE == 2:
                wsu_ptrs += G
        a_ptrs += BLOCK_K * stride_ak
        wg_ptrs += BLOCK_K * stride_wk
        if W_MODE == 2:
            wsg_ptrs += G

    if W_MODE == 0:
        acc_g = acc_g * tl.load(ws_base + gate_rows * stride_wsn)[None, :]
        if GATED:
            acc_u = acc_u * tl.load(ws_base + up_rows * stride_wsn)[None, :]
    if A_MODE == 1:
        a_scale = tl.load(a_scale_ptr + a_rows * stride_asr)[:, None]
        acc_g = acc_g * a_scale
        if GATED:
            acc_u = acc_u * a_scale
    if GATED:  # noqa: SIM108
        acc = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # SiLU(gate) * up, fp32
    else:
        acc = acc_g
    if MUL_ROUTING:
        acc = acc * tl.load(routing_ptr + pairs).to(tl.float32)[:, None]
    mask = row_ok[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------

_W_MODE = {
    ExpertWeightFormat.FP8_TENSOR: 0,
    ExpertWeightFormat.FP8_CHANNEL: 0,
    ExpertWeightFormat.FP8_BLOCK: 1,
    ExpertWeightFormat.MXFP8: 2,
}


def _a_mode(activation: ExpertActivation) -> int:
    if activation in (ExpertActivation.FP8_TENSOR, ExpertActivation.FP8_TOKEN):
        return 1
    if activation is ExpertActivation.FP8_GROUP:
        return 2
    return 3 if activation.is_mx else 0


def pairs_per_expert_bucket(num_pairs: int, num_experts: int) -> int:
    """The bucket configs are chosen for: next power of two of the mean pairs per expert, capped."""
    return m_bucket(-(-num_pairs // max(1, num_experts)))


def moe_block_m(
    num_pairs: int,
    num_experts: int,
    activation: ExpertActivation = ExpertActivation.NONE,
    decoded_wgmma: bool = False,
) -> int:
    """``BLOCK_M`` for a layer: 16 (the MMA minimum) up to 128, the mean pairs per expert rounded up to a power
    of two. Both GEMMs of a layer share it, since they share the token layout. ``activation`` is what the GEMMs
    read (FP8 for W8A8 FP8 MMAs; bf16 / NONE where the weight is decoded in registers). Measured on an H100
    (``benchmarks/sweep_moe_gemm.py``, Mixtral-8x7B at 128 tokens, 32 pairs per expert on average): with
    weights decoded for a bf16 MMA, 32-row blocks beat 64-row ones by 1.2-1.7x per GEMM although the busier
    experts spill into a second block (:func:`moe_gemm_config` orders the programs so that the second block
    reads the weight from L2); FP8 MMAs take 64 rows there instead (gate/up 333 against 391 us, down 184
    against 223 us; ``--columns fp8-channel fp8-block --block-m 16 32 64 --kernels default``,
    ``results/sweep-moe-gemm-h100-fp8-block-m.json``), and at 1 and 16 tokens (4 or fewer pairs per expert)
    the 16-row blocks stay fastest for both. Measured and left out for decoded weights: 64-row blocks whose
    program decodes each weight tile once for two 32-row MMAs, the second skipped where its half is padding
    (a temporary kernel variant; gate/up 489-520 against 450 us, down 253 against 229 us at best,
    ``results/sweep-moe-gemm-h100-split.json``): the spilled experts' second decode costs less than that.

    ``decoded_wgmma`` (the layer runs :mod:`mxrun.kernels.moe_wgmma_decoded`, :func:`moe_decoded_wgmma`):
    up to 32 pairs per expert twice the bucket, 16 to 64 rows, so that the busier experts do not spill (the
    tokens are that kernel's MMA N, and its MMAs are cheap beside the decode); 128 rows above that."""
    if decoded_wgmma:
        bucket = pairs_per_expert_bucket(num_pairs, num_experts)
        return min(64, max(16, 2 * bucket)) if bucket <= 32 else 128
    block_m = min(128, max(16, pairs_per_expert_bucket(num_pairs, num_experts)))
    return 64 if activation.is_fp8 and block_m == 32 else block_m


def moe_gemm_config(
    block_m: int,
    n: int,
    k: int,
    w_format: ExpertWeightFormat,
    activation: ExpertActivation,
    gated: bool,
    pairs_per_expert: float = 0.0,
) -> GemmConfig:
    """Tile for a grouped GEMM, measured on an H100 with ``benchmarks/sweep_moe_gemm.py`` (results in
    ``benchmarks/results/sweep-moe-gemm-h100-*.json``).

    Few rows per expert (``block_m <= 32``, weight-bound): 64-wide N tiles with 256-wide K steps (128 where
    scales come per 128 K), or 128 x 128 for a short K in the down GEMM and for 128x128-block weights with bf16
    activations in the down GEMM (since their widening got cheaper: Mixtral at 128 tokens 230 against 252 us,
    ``--shapes Mixtral-8x7B --tokens 128 --columns fp8-block-wo fp8-channel-wo mxfp8-wo --kernels both``,
    ``results/sweep-moe-gemm-h100-128-wo.json``). Many rows (``block_m`` 128): 128 x 128
    tiles, except the gated block-scaled GEMM (64 wide: it holds two accumulators and per-step partials).
    FP8 MMAs with per-row/tensor scales promote their accumulator every 128 K (cuBLASLt's accuracy, 0-15%
    slower than never promoting); block / 1x128 scaling adds each 128-K step's dot into fp32 itself, so it
    needs no promotion inside the dot.

    Program order (``group_m``): where ``pairs_per_expert`` (the mean) makes the busier experts spill into a
    second ``block_m`` block (mean + one standard deviation of a Poisson count above ``block_m``), the programs
    walk 16 row blocks per column (``group_m`` 16), so that an expert's blocks read each weight tile in turn
    and the second read comes from L2; else one row block per column sweep (``group_m`` 1), which reads
    neighbouring weight rows in turn. Mixtral-8x7B at 128 tokens (32 pairs per expert, 32-row blocks),
    decoded weights: gate/up 6-10% faster, down 3-7% (``--group-m 1 16 64 --kernels default``,
    ``results/sweep-moe-gemm-h100-group-m.json``; 8 row blocks split some experts' pairs of blocks and gain
    less, ``...-group-m-mixtral.json``); at 16 tokens and on Qwen3 / DeepSeek (no spills) 16 is 0-6% slower."""
    needs_128 = w_format is ExpertWeightFormat.FP8_BLOCK or activation is ExpertActivation.FP8_GROUP
    fp8_operands = activation.is_fp8
    promote = 128 if fp8_operands and not needs_128 else None
    if block_m <= 32:
        spills = pairs_per_expert + math.sqrt(pairs_per_expert) > block_m
        group_m = 16 if spills else 1
        wide_k = 128 if needs_128 else 256
        stages = 4 if needs_128 else 3
        if needs_128 and not fp8_operands and not gated:  # block weight-only down: 1.09x over 64 wide
            return GemmConfig(block_m, 128, 128, group_m, 4, 3, promote)
        if gated or k >= 4096:
            return GemmConfig(block_m, 64, wide_k, group_m, 4, stages, promote)
        return GemmConfig(block_m, 128, 128, group_m, 4, 3, promote)
    if block_m <= 64:
        block_k = 128 if (needs_128 or fp8_operands) else 64
        return GemmConfig(block_m, 64 if gated else 128, block_k, 8, 4, 4, promote)
    if gated:
        return GemmConfig(block_m, 64 if needs_128 else 128, 128, 8, 8, 3, promote)
    return GemmConfig(block_m, 128, 128, 8, 8 if needs_128 else 4, 3, promote)


def moe_swap_ab(
    block_m: int, activation: ExpertActivation, w_format: ExpertWeightFormat, gated: bool
) -> bool:
    """Whether the weight-rows (swapped-operand) kernel of ``moe_weight_rows_gemm.py`` runs a GEMM. It takes
    only bf16/fp16 activations (weight-only, or MX values rounded beforehand). Measured on an H100
    (``benchmarks/sweep_moe_gemm.py --kernels swapped``, ``benchmarks/results/sweep-moe-gemm-h100-swap.json``):
    with 128-row blocks it is 1.07-1.33x faster for FP8 per-channel weights (both GEMMs) and 1.01-1.10x for
    MXFP8 gate/up, slower for MXFP8 down; with 16-64-row blocks the regular kernel (32-row blocks) wins."""
    if _a_mode(activation) != 0 or block_m < 128:
        return False
    if w_format in (ExpertWeightFormat.FP8_CHANNEL, ExpertWeightFormat.FP8_TENSOR):
        return True
    return w_format is ExpertWeightFormat.MXFP8 and gated


def moe_decoded_wgmma(
    x: torch.Tensor,
    num_pairs: int,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    activation: ExpertActivation,
    mx_fold: bool,
) -> bool:
    """Whether both grouped GEMMs of a layer run the Gluon kernel for weights decoded in registers
    (:mod:`mxrun.kernels.moe_wgmma_decoded`): bf16 activations met by E4M3 weights (per tensor, per channel,
    or in 128x128 blocks with N of both GEMMs a multiple of 64) or MXFP8 weights with foldable scales, K of
    both GEMMs a multiple of 128, an sm_90 GPU with Gluon, and mean pairs per expert in the range of
    :data:`MOE_DECODED_WGMMA_BUCKETS` (unless :data:`MOE_DECODED_WGMMA` forces it)."""
    if MOE_DECODED_WGMMA is False or activation is not ExpertActivation.NONE:
        return False
    experts, two_i, hidden = gate_up.data.shape
    for stack, n in ((gate_up, two_i // 2), (down, hidden)):
        if stack.format is ExpertWeightFormat.MXFP8 and not mx_fold:
            return False
        if stack.format is ExpertWeightFormat.FP8_BLOCK and n % 64:
            return False
    if down.data.shape[2] % 128 or not decoded_wgmma_usable(x, hidden, 64):
        return False
    if MOE_DECODED_WGMMA:
        return True
    low, high = MOE_DECODED_WGMMA_BUCKETS
    return low <= pairs_per_expert_bucket(num_pairs, experts) <= high


def moe_zero_padding(block_m: int, pairs_per_expert: float, swap_ab: bool, fp8_activations: bool) -> bool:
    """Whether a grouped GEMM reads its layout blocks' padding rows as zeros (masked loads) rather than as pair
    0's row. The products of padding rows are discarded either way, but rows of zeros make the MMAs cheaper.
    H100, one MoE layer, same run each (``bench_moe.py --columns fp8-channel:read-pad fp8-channel:zero-pad
    ...``, ``benchmarks/results/moe-padding-h100.md``): with up to 64-row blocks every scheme gains or holds
    (Qwen3-30B-A3B at 1024 tokens 11-19% faster, Mixtral-8x7B fp8-channel 5% at 128 tokens); with 128-row
    blocks FP8 MMAs gain (fp8-channel 6% on Mixtral at 1024 tokens, 9% on Qwen3 at 8192) unless padding is a
    few percent of the rows (``pairs_per_expert`` of 8 blocks or more, Mixtral at 8192 tokens: the block-scaled
    GEMMs 2% slower), while bf16 MMAs on decoded weights lose 2-5%, and so does the weight-rows kernel."""
    if swap_ab:
        return False
    return block_m <= 64 or (fp8_activations and pairs_per_expert < 8 * block_m)


def moe_weight_rows_config(
    block_m: int, n: int, k: int, w_format: ExpertWeightFormat, gated: bool
) -> GemmConfig:
    """Tile of the swapped kernel (same sweep): ``block_n`` weight rows are the MMA's M, the ``block_m``
    tokens its N."""
    group_m = 8 if block_m >= 64 else 1
    if w_format is ExpertWeightFormat.MXFP8 and gated:
        return GemmConfig(block_m, 128, 128, group_m, 8, 3, None)
    if w_format in (ExpertWeightFormat.FP8_CHANNEL, ExpertWeightFormat.FP8_TENSOR):
        if gated:
            return GemmConfig(block_m, 64, 64, group_m, 4, 4, None)
        return GemmConfig(block_m, 128, 128, group_m, 8, 3, None)
    return GemmConfig(block_m, 64, 128, group_m, 4, 3, None)


def moe_grouped_gemm_triton(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    weights: ExpertWeights,
    groups: TokenGroups,
    out: torch.Tensor,
    *,
    gated: bool,
    gather_top_k: int | None,
    routing_weights: torch.Tensor | None = None,
    activation: ExpertActivation = ExpertActivation.NONE,
    config: GemmConfig | None = None,
    swap_ab: bool | None = None,
    mx_scale_fold: bool = False,
    zero_padding: bool | None = None,
    decoded_wgmma: bool = False,
) -> torch.Tensor:
    """One grouped GEMM over the layout ``groups``, written into ``out`` ``[S, N]`` (rows of pairs that no
    expert received are left as they are). ``swap_ab`` runs the weight-rows kernel (bf16/fp16 activations
    only; default: :func:`moe_swap_ab`). ``decoded_wgmma`` runs the Gluon kernel of
    :mod:`mxrun.kernels.moe_wgmma_decoded` instead (see :func:`moe_decoded_wgmma`; it reads padding rows as
    zeros and takes no ``config``). ``zero_padding``: padding rows read as zeros (default: forced by
    :data:`MOE_ZERO_PADDING`, else :func:`moe_zero_padding`); the outputs are the same bits either way.

    ``a`` is ``[T, K]`` read at row ``p // gather_top_k`` (the gate/up GEMM reads each token once per slot) or
    ``[S, K]`` read at row ``p`` (``gather_top_k=None``, the down GEMM). For FP8 activations ``a`` is E4M3
    with ``a_scale`` fp32 ``[rows, 1]`` (token), 0-dim (tensor) or ``[rows, K/128]`` (1x128 groups)."""
    fn = "moe_grouped_gemm_triton"
    _, n_w, k = weights.data.shape
    n = n_w // 2 if gated else n_w
    if a.shape[1] != k:
        raise GemmInputError(f"{fn}: A has K={a.shape[1]}, the weights K={k}")
    if weights.format is ExpertWeightFormat.MXFP8 and activation.is_fp8:
        raise GemmInputError(f"{fn}: MXFP8 weights take bf16/fp16 or MX activations, not {activation.value}")
    if groups.num_pairs == 0 or n == 0:
        return out
    block_m = groups.block_m
    a_mode = _a_mode(activation)
    w_mode = _W_MODE[weights.format]
    if decoded_wgmma:
        if a_mode != 0 or (w_mode == 1 and n % 64) or not decoded_wgmma_usable(a, k, block_m):
            raise GemmInputError(
                f"{fn}: the decoded-weight wgmma kernel needs bf16 activations, K a multiple of 128 (and N of "
                f"64 with 128x128 weight blocks), 16-128-row blocks and an sm_90 GPU with Gluon"
            )
        if w_mode == 2 and not mx_scale_fold:
            raise GemmInputError(f"{fn}: the decoded-weight wgmma kernel needs foldable MX scales")
        many = (
            MOE_DECODED_WGMMA_WIDE_EXPERTS is not None
            and weights.data.shape[0] > MOE_DECODED_WGMMA_WIDE_EXPERTS
        )
        wide = many and (w_mode != 1 or n % 128 == 0)
        return moe_decoded_wgmma_gemm(
            a, weights.data, weights.scale, w_mode, groups.sorted_pair_ids, groups.block_expert,
            groups.num_pairs, block_m, out, gated=gated, gather_top_k=gather_top_k,
            routing_weights=routing_weights, warps=8 if wide else 4,
        )  # fmt: skip
    if MOE_BLOCK_WGMMA and a_mode == 2 and w_mode == 1 and block_wgmma_usable(a, n, k, block_m):
        return moe_wgmma_block_gemm(
            a, a_scale, weights.data, weights.scale, groups.sorted_pair_ids, groups.block_expert,
            groups.num_pairs, out, gated=gated, gather_top_k=gather_top_k, routing_weights=routing_weights,
        )  # fmt: skip
    swap = moe_swap_ab(block_m, activation, weights.format, gated) if swap_ab is None else swap_ab
    if swap and a_mode != 0:
        raise GemmInputError(
            f"{fn}: the weight-rows kernel takes bf16/fp16 activations, not {activation.value}"
        )
    if config is not None:
        cfg = config
    elif swap:
        cfg = moe_weight_rows_config(block_m, n, k, weights.format, gated)
    else:
        experts = weights.data.shape[0]
        cfg = moe_gemm_config(
            block_m, n, k, weights.format, activation, gated, groups.num_pairs / max(1, experts)
        )
    if cfg.block_m != block_m:
        raise GemmInputError(f"{fn}: config block_m {cfg.block_m} differs from the layout's {block_m}")
    if (w_mode == 1 or a_mode == 2) and cfg.block_k != 128:
        raise GemmInputError(
            f"{fn}: 128x128 weight blocks and 1x128 activation groups need block_k 128, got {cfg}"
        )
    scale = weights.scale
    if w_mode == 0:
        stride_wse, stride_wsn = scale.stride(0), (scale.stride(1) if scale.shape[1] > 1 else 0)
    else:
        stride_wse, stride_wsn = scale.stride(0), scale.stride(1)
    if a_mode in (1, 2):
        if a_scale is None:
            raise GemmInputError(f"{fn}: FP8 activations need their scales")
        stride_asr = a_scale.stride(0) if a_scale.dim() > 0 and a_scale.numel() > 1 else 0
    else:
        a_scale = scale
        stride_asr = 0
    if zero_padding is None:
        zero_padding = MOE_ZERO_PADDING
    if zero_padding is None:
        experts = weights.data.shape[0]
        zero_padding = moe_zero_padding(block_m, groups.num_pairs / max(1, experts), swap, a_mode in (1, 2))
    n_rows_layout = groups.sorted_pair_ids.numel()
    grid = (triton.cdiv(n_rows_layout, block_m) * triton.cdiv(n, cfg.block_n),)
    # MXFP8 weights met by bf16 activations: their powers of two on the widening's multiply, where the caller
    # vouches that every code allows it (:func:`~mxrun.kernels.e4m3.mx_scales_foldable`)
    mx_fold = (
        mx_scale_fold and w_mode == 2 and a.dtype == torch.bfloat16 and a_mode in (0, 3)
        and fast_widen_usable(a.device)
    )  # fmt: skip
    if swap:
        launch = cfg.launch_kwargs()
        del launch["MAX_IMPRECISE_ACC"]
        moe_weight_rows_gemm_kernel[grid](
            a, weights.data, scale.view(torch.uint8) if w_mode == 2 else scale,
            routing_weights if routing_weights is not None else scale, out,
            groups.sorted_pair_ids, groups.block_expert, groups.num_pairs, n_rows_layout, n, k,
            gather_top_k or 1, a.stride(0), a.stride(1),
            weights.data.stride(0), weights.data.stride(1), weights.data.stride(2), stride_wse, stride_wsn,
            out.stride(0), out.stride(1),
            A_GATHER=gather_top_k is not None, W_MODE=w_mode, GATED=gated,
            MUL_ROUTING=routing_weights is not None, DOT_FP32=triton_interpreting(),
            EVEN_K=k % cfg.block_k == 0, FAST_WIDEN=fast_widen_usable(a.device), MX_FOLD=mx_fold,
            ZERO_PADDING=zero_padding, **launch,
        )  # fmt: skip
        return out
    _moe_grouped_gemm_kernel[grid](
        a,
        a_scale,
        weights.data,
        scale.view(torch.uint8) if w_mode == 2 else scale,
        routing_weights if routing_weights is not None else scale,
        out,
        groups.sorted_pair_ids,
        groups.block_expert,
        groups.num_pairs,
        n_rows_layout,
        n,
        k,
        gather_top_k or 1,
        a.stride(0),
        a.stride(1),
        stride_asr,
        weights.data.stride(0),
        weights.data.stride(1),
        weights.data.stride(2),
        stride_wse,
        stride_wsn,
        out.stride(0),
        out.stride(1),
        A_GATHER=gather_top_k is not None,
        A_MODE=a_mode,
        A_ROUND_UP=activation is not ExpertActivation.MX_FLOOR,
        W_MODE=w_mode,
        GATED=gated,
        MUL_ROUTING=routing_weights is not None,
        SOFT_CAST=resolve_cast("auto"),
        DOT_FP32=triton_interpreting(),
        EVEN_K=k % cfg.block_k == 0,
        FAST_WIDEN=fast_widen_usable(a.device),
        MX_FOLD=mx_fold,
        ZERO_PADDING=zero_padding,
        **cfg.launch_kwargs(),
    )
    return out


def _quantize_activation(
    a: torch.Tensor, activation: ExpertActivation, aligned: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the grouped GEMM reads for ``activation``: E4M3 and scales (FP8), or for MX the activations
    rounded to their MXFP8 values once, in ``a``'s dtype (exact: E4M3 times a power of two is a bf16 value, and
    an fp16 one in fp16's normal range). Rounding once here rather than per tile in the kernel (``A_MODE 3``)
    gives the same values without redoing it for every N tile (measured 1.3-2x slower on H200). ``aligned``:
    MX activations quantized over 1x128 groups instead, E4M3 with fp32 power-of-two scales."""
    if activation.is_mx and aligned:
        grouped = quantize_mx_group128_triton(a, _MX_RULE[activation])
        return grouped.data, grouped.scale
    if activation.is_mx:
        return mx_round_triton(a, _MX_RULE[activation]), None
    if not activation.is_fp8:
        return a, None
    quantized = quantize_fp8(a, FP8_ACTIVATION_GRANULARITY[activation], Backend.TRITON)
    return quantized.data, quantized.scale


def moe_experts_triton(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    activation: ExpertActivation = ExpertActivation.NONE,
    *,
    block_m: int | None = None,
    aligned: bool | None = None,
    tile_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    mx_scales_foldable: bool = False,
) -> torch.Tensor:
    """The experts forward on Triton: group, gate/up GEMM (SiLU fused), down GEMM (routing weight fused), sum
    over the top k. No host synchronisation (safe in CUDA-graph capture when ``x`` has a fixed shape).
    ``aligned`` forces the aligned MXFP8 W8A8 path on or off (default: :func:`moe_aligned`). ``tile_scales``:
    both MXFP8 stacks are tile-aligned (:func:`~mxrun.kernels.mx_regroup.align_mxfp8`) and these are their
    fp32 tile scales; W8A8 then runs the block-scaled path as stored, at every token count (no regrouping to
    pay for, and the FP8 block grouped GEMM measured faster than the decoded MXFP8 one at every size).
    ``mx_scales_foldable``: every E8M0 code of both MXFP8 stacks allows the folded decode
    (:func:`~mxrun.kernels.e4m3.mx_scales_foldable`, read once per loaded stack by the caller)."""
    _check_inputs(x, top_k_index, top_k_weights, gate_up, down)
    tokens, top_k = top_k_index.shape
    experts, two_i, hidden = gate_up.data.shape
    inter = two_i // 2
    num_pairs = tokens * top_k
    if tile_scales is not None and activation.is_mx:
        if not gate_up.format is down.format is ExpertWeightFormat.MXFP8:
            raise GemmInputError("moe_experts_triton: tile_scales go with MXFP8 stacks")
        gate_up = ExpertWeights(gate_up.data, tile_scales[0], ExpertWeightFormat.FP8_BLOCK)
        down = ExpertWeights(down.data, tile_scales[1], ExpertWeightFormat.FP8_BLOCK)
        aligned = True
    elif aligned is None:
        aligned = moe_aligned(num_pairs, gate_up, down, activation)
    if aligned and gate_up.format is ExpertWeightFormat.MXFP8:
        gate_up, down = regroup_experts(gate_up, Backend.TRITON), regroup_experts(down, Backend.TRITON)
    if aligned:
        gemm_activation = ExpertActivation.FP8_GROUP  # E4M3 with 1x128 scales, MX-rule powers of two
    else:
        gemm_activation = ExpertActivation.NONE if activation.is_mx else activation  # MX: rounded already
    fold = mx_scales_foldable and not aligned
    wgmma = moe_decoded_wgmma(x, num_pairs, gate_up, down, gemm_activation, fold)
    block_m = block_m or moe_block_m(num_pairs, experts, gemm_activation, wgmma)
    wgmma = wgmma and 16 <= block_m <= 128  # a caller-given block_m may be outside what it takes
    groups = group_tokens_fast(top_k_index, experts, block_m)
    per_tensor = activation is ExpertActivation.FP8_TENSOR
    # h rows of dropped pairs are never written; zero them only where a per-tensor amax reads every row
    h = (torch.zeros if per_tensor else torch.empty)((num_pairs, inter), dtype=x.dtype, device=x.device)
    a, a_scale = _quantize_activation(x, activation, aligned)
    moe_grouped_gemm_triton(
        a, a_scale, gate_up, groups, h, gated=True, gather_top_k=top_k, activation=gemm_activation,
        mx_scale_fold=fold, decoded_wgmma=wgmma,
    )  # fmt: skip
    a, a_scale = _quantize_activation(h, activation, aligned)
    y = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)  # dropped pairs' rows: never read
    moe_grouped_gemm_triton(
        a, a_scale, down, groups, y, gated=False, gather_top_k=None,
        routing_weights=top_k_weights.reshape(-1).contiguous(), activation=gemm_activation, mx_scale_fold=fold,
        decoded_wgmma=wgmma,
    )  # fmt: skip
    return topk_sum_triton(y, top_k_index, experts)


def moe_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    activation: ExpertActivation = ExpertActivation.NONE,
    backend: Backend | str = Backend.AUTO,
    *,
    tile_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    mx_scales_foldable: bool = False,
) -> torch.Tensor:
    """Quantized experts forward: Triton on CUDA, :func:`moe_experts_reference` elsewhere (``tile_scales``,
    ``mx_scales_foldable``: see :func:`moe_experts_triton`; the reference computes MXFP8 exactly on the stored
    values)."""
    if resolve_backend(backend, x) is Backend.TRITON:
        return moe_experts_triton(
            *(x, top_k_index, top_k_weights, gate_up, down, activation),
            tile_scales=tile_scales,
            mx_scales_foldable=mx_scales_foldable,
        )
    return moe_experts_reference(x, top_k_index, top_k_weights, gate_up, down, activation)


__all__ = [
    "FP8_ACTIVATION_GRANULARITY",
    "FP8_WEIGHT_GRANULARITY",
    "MOE_ALIGNED_MAX_BYTES",
    "MOE_ALIGNED_MIN_PAIRS_PER_EXPERT",
    "ExpertActivation",
    "ExpertWeightFormat",
    "ExpertWeights",
    "dequantize_experts",
    "expert_scale_dtype",
    "expert_scale_shape",
    "moe_aligned",
    "moe_block_m",
    "moe_decoded_wgmma",
    "moe_experts",
    "moe_experts_reference",
    "moe_experts_triton",
    "moe_gemm_config",
    "moe_grouped_gemm_triton",
    "moe_swap_ab",
    "moe_weight_rows_config",
    "moe_zero_padding",
    "quantize_dequantize_activation",
    "quantize_expert",
    "regroup_experts",
]
