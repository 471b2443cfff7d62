"""Split-K GEMM for small M (decode), where a quantized Linear does almost no math and must stream its FP8
weight at the memory's speed.

With M <= :data:`SMALL_M_MAX` rows, a tile-per-output-block GEMM launches only ``N / BLOCK_N`` programs, each
walking the whole K: too few loads in flight to saturate HBM (measured: the W8A16 kernels ran at bf16's speed,
half of what their bytes allow). Here the K range is split too, so ``N / BLOCK_N x SPLIT_K`` programs (about
four per SM) each stream one slab of the weight, widen it to the activation's dtype in registers and run a
bf16/fp16 MMA with fp32 accumulation. Each program writes its fp32 partial sums to ``[SPLIT_K, M, N]``; a second
small kernel adds the splits in a fixed order (deterministic, no atomics), applies the scales that factor out
of K (per-tensor / per-channel weight scales, per-token activation scales), adds the bias and casts.

Operands it takes (every product below is exact in fp32, so only the fp32 summation order differs from the
references in :mod:`mxrun.kernels.scaled_gemm` / :mod:`mxrun.kernels.mxfp8_gemm`):

* weights: E4M3 ``[N, K]`` with an fp32 per-tensor / per-channel scale (applied in the reduce kernel), or with
  MXFP8 E8M0 scales ``[N, K/32]`` (a power of two, applied to the decoded weight: exact);
* activations: bf16/fp16 as they are (weight-only), E4M3 codes with per-token / per-tensor fp32 scales
  (W8A8 FP8, quantized beforehand by the quantize kernel: the per-token amax needs the whole row; the launcher
  widens the codes to bf16, exactly), or bf16/fp16 quantize-dequantized to MXFP8 (W8A8 MXFP8: rounded once
  before the launch, in one pass, to values exact in bf16; rounding in the registers of every program, which a
  1x32 group allows, stays selectable and was measured slower, see :data:`MX_REGISTER_ROUNDING_MAX_M`).

128x128 block weights keep the tile kernels (their small-M speed is not a goal of issue 5).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mxrun.kernels.backend import tl, triton, triton_interpreting
from mxrun.kernels.e4m3 import widen_to_fp32
from mxrun.kernels.mxfp8_gemm import e8m0_to_fp32, mx_quantize_dequantize
from mxrun.kernels.mxfp8_quantize import MX_BLOCK_SIZE, MxScaleRule, mx_round_triton, resolve_cast
from mxrun.kernels.scaled_gemm import GemmInputError

SMALL_M_MAX = 64
MX_REGISTER_ROUNDING_MAX_M = 0
"""Up to this many rows MX activations would be rounded in the registers of every program; beyond (i.e. at
every M now), once before the launch (one pass, :func:`~mxrun.kernels.mxfp8_quantize.mx_round_triton`) to the
same exact values, and the kernel runs as weight-only. H100 (``bench_linear.py --ms 1 16 64 --columns
mxfp8:registers mxfp8:round-first mxfp8-wo``, ``benchmarks/results/mx-small-m-h100.md``): rounding first is
1.04-1.27x faster at M = 1 and 16 and 1.6-2.4x at M = 64, within 1-16% of the weight-only kernel."""
"""Up to this many rows the Linear dispatchers use the split-K kernel; one program holds all rows (16, 32 or 64:
the MMA needs at least 16), so a new M compiles at most three variants."""


def block_m_for(m: int) -> int:
    """Rows one program holds: the next power of two of ``m``, at least 16."""
    return max(16, 1 << max(0, (m - 1).bit_length()))


class SplitKConfig(NamedTuple):
    """Tile and split policy: ``target_programs`` is how many (column block x K split) programs to aim for."""

    # Defaults: the best tile over all four operand kinds of benchmarks/sweep_small_m.py on H200
    # (results/sweep-small-m-h200.json, geometric mean over decode shapes at M = 1 and 16).
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 4 * 132  # about four programs per SM of an H100/H200


DEFAULT_CONFIG = SplitKConfig()


@triton.jit(do_not_specialize=["M"])
def _split_k_partial_kernel(
    a_ptr,  # [M, K] bf16/fp16 (E4M3 codes are widened to bf16 by the launcher); (m, k) at m*stride_am + k
    b_ptr,  # [N, K] float8e4nv weight, K contiguous, (n, k) at n*stride_bn + k
    bs_ptr,  # B_MX: uint8 E8M0 [N, K/32], (n, g) at n*stride_bsn + g; else unused
    p_ptr,  # fp32 partials [SPLIT_K, M, N], contiguous
    M,
    N,
    K,
    K_PER_SPLIT,  # multiple of BLOCK_K
    stride_am,
    stride_bn,
    stride_bsn,
    A_MODE: tl.constexpr,  # 0: A as is; 1: A quantize-dequantized to MXFP8 here (A_ROUND_UP rule)
    A_ROUND_UP: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    B_MX: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16/fp16 dot is wrong, so run the exact values in fp32
    DOT_BF16: tl.constexpr,  # else bf16 (bf16 activations, E4M3 codes) or fp16 (fp16 activations) MMA
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 32
):
    """One program: BLOCK_N output columns x all (<= BLOCK_M) rows over one K slab, fp32 partial sums out."""
    G: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, G)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn  # B read as [BLOCK_K, BLOCK_N], K contiguous
    bs_cols = bs_ptr + offs_n.to(tl.int64)[None, :] * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = k0 + offs_k < k_end
        a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + (k0 + offs_k)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if B_MX:
            g_ok = k0 + offs_g * 32 < k_end
            codes = tl.load(
                bs_cols + (k0 // 32 + offs_g)[:, None], mask=g_ok[:, None] & n_ok[None, :], other=127
            )
            w = tl.reshape(
                tl.reshape(b.to(tl.float32), [G, 32, BLOCK_N]) * e8m0_to_fp32(codes)[:, None, :],
                [BLOCK_K, BLOCK_N],
            )
        else:
            w = b
        if A_MODE == 1:
            x = mx_quantize_dequantize(widen_to_fp32(a), A_ROUND_UP, SOFT_CAST, BLOCK_M, BLOCK_K)
        else:
            x = a
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif DOT_BF16:
            acc = tl.dot(x.to(tl.bfloat16), w.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(x.to(tl.float16), w.to(tl.float16), acc)
    out = p_ptr + (pid_k * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _split_k_reduce_kernel(
    p_ptr,  # fp32 partials [SPLIT_K, M, N]
    a_scale_ptr,  # A_SCALE 1: fp32 [1]; 2: fp32 [M]; else unused
    b_scale_ptr,  # B_SCALE 1: fp32 [1]; 2: fp32 [N]; else unused
    bias_ptr,
    c_ptr,  # [M, N] output, contiguous
    M,
    N,
    SPLIT_K: tl.constexpr,
    A_SCALE: tl.constexpr,  # 0 none, 1 per tensor, 2 per row
    B_SCALE: tl.constexpr,  # 0 none, 1 per tensor, 2 per column
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Sum the splits in order, apply the scales that factor out of K, add bias, cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(p_ptr + s * M * N + offs, mask=ok, other=0.0)
    row = offs // N
    col = offs % N
    if A_SCALE == 1:
        total = total * tl.load(a_scale_ptr)
    elif A_SCALE == 2:
        total = total * tl.load(a_scale_ptr + row, mask=ok, other=1.0)
    if B_SCALE == 1:
        total = total * tl.load(b_scale_ptr)
    elif B_SCALE == 2:
        total = total * tl.load(b_scale_ptr + col, mask=ok, other=1.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, total.to(c_ptr.dtype.element_ty), mask=ok)


def split_k_for(n: int, k: int, config: SplitKConfig = DEFAULT_CONFIG) -> int:
    """Splits of K so that ``cdiv(N, block_n) x splits`` is about ``config.target_programs``, each split at
    least two K steps long; at most 32 (the reduce kernel's unrolled loop)."""
    column_blocks = triton.cdiv(n, config.block_n)
    steps = triton.cdiv(k, config.block_k)
    want = max(1, config.target_programs // column_blocks)
    return max(1, min(want, steps // 2, 32))


def _scale_mode(scale: torch.Tensor | None, rows: int, what: str, fn: str) -> int:
    if scale is None:
        return 0
    if scale.dtype != torch.float32:
        raise GemmInputError(f"{fn}: the {what} scale must be float32, got {scale.dtype}")
    if scale.numel() == 1:
        return 1
    if scale.numel() == rows:
        return 2
    raise GemmInputError(f"{fn}: the {what} scale must have 1 or {rows} elements, got {tuple(scale.shape)}")


def small_m_gemm_triton(
    a: torch.Tensor,
    weight: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    weight_scale_e8m0: torch.Tensor | None = None,
    activation_mx_rule: MxScaleRule | str | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    split_k: int | None = None,
    config: SplitKConfig = DEFAULT_CONFIG,
    mx_rounding: str = "auto",
) -> torch.Tensor:
    """``y = (a s_a) (W s_w)^T + bias`` for ``M <= SMALL_M_MAX`` (64) rows, split along K (see the module docstring).

    ``a``: bf16/fp16 ``[M, K]`` (optionally MX-quantized here with ``activation_mx_rule``), or E4M3 codes with
    ``a_scale`` (0-dim/``[1]`` or ``[M, 1]``; give ``out_dtype``). ``weight``: E4M3 ``[N, K]`` with exactly one of
    ``weight_scale`` (fp32, per tensor or ``[N, 1]``) and ``weight_scale_e8m0`` (``[N, K/32]``).
    ``mx_rounding``, for MX activations: ``"registers"`` (in every program), ``"first"`` (one launch before,
    then as weight-only: the same values) or ``"auto"`` (up to :data:`MX_REGISTER_ROUNDING_MAX_M` rows in
    registers)."""
    fn = "small_m_gemm_triton"
    if mx_rounding not in ("auto", "registers", "first"):
        raise GemmInputError(f"{fn}: mx_rounding must be 'auto', 'registers' or 'first', got {mx_rounding!r}")
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn or weight.stride(1) != 1:
        raise GemmInputError(f"{fn}: the weight must be a K-contiguous float8_e4m3fn [N, K] tensor")
    n, k = weight.shape
    if a.dim() != 2 or a.shape[1] != k or a.stride(1) != 1:
        raise GemmInputError(f"{fn}: A must be a K-contiguous [M, K={k}] tensor, got {tuple(a.shape)}")
    m = a.shape[0]
    if m > SMALL_M_MAX:
        raise GemmInputError(f"{fn}: at most {SMALL_M_MAX} rows, got {m}")
    if (weight_scale is None) == (weight_scale_e8m0 is None):
        raise GemmInputError(f"{fn}: give exactly one of weight_scale and weight_scale_e8m0")
    if weight_scale_e8m0 is not None and (
        k % MX_BLOCK_SIZE or weight_scale_e8m0.shape != (n, k // MX_BLOCK_SIZE)
    ):
        raise GemmInputError(f"{fn}: MXFP8 weights need K % 32 == 0 and E8M0 scales [N, K/32]")
    if bias is not None and bias.shape != (n,):
        raise GemmInputError(f"{fn}: bias must be [N={n}], got {tuple(bias.shape)}")
    if a.dtype == torch.float8_e4m3fn:
        if a_scale is None or activation_mx_rule is not None:
            raise GemmInputError(f"{fn}: E4M3 activations need a_scale (and no activation_mx_rule)")
        # Widened here (exact: every E4M3 value is a bf16), the tiny [M, K] copy is cheaper than converting
        # in the kernel: measured 0.74-0.82x of bf16 with in-kernel conversion, against 1.2-1.4x without.
        a, a_mode, out_dtype = a.to(torch.bfloat16), 0, out_dtype or torch.bfloat16
    elif a.dtype in (torch.bfloat16, torch.float16):
        a_mode, out_dtype = (0 if activation_mx_rule is None else 1), a.dtype
        if a_mode == 1 and k % MX_BLOCK_SIZE:
            raise GemmInputError(f"{fn}: MXFP8 activations need K % 32 == 0, got K={k}")
        in_registers = mx_rounding == "registers" or (
            mx_rounding == "auto" and m <= MX_REGISTER_ROUNDING_MAX_M
        )
        if a_mode == 1 and not in_registers:
            a, a_mode = mx_round_triton(a, activation_mx_rule), 0
    else:
        raise GemmInputError(f"{fn}: activations must be bfloat16, float16 or float8_e4m3fn, got {a.dtype}")
    a_scale_mode = _scale_mode(a_scale, m, "activation", fn)
    b_scale_mode = _scale_mode(weight_scale, n, "weight", fn)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    splits = split_k or split_k_for(n, k, config)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)  # no empty splits
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
    b_mx = weight_scale_e8m0 is not None
    bs = weight_scale_e8m0.view(torch.uint8) if b_mx else weight
    dot_bf16 = a.dtype == torch.bfloat16  # bf16/fp16 activations keep their own dtype
    round_up = activation_mx_rule is None or MxScaleRule(activation_mx_rule) is MxScaleRule.ROUND_UP
    _split_k_partial_kernel[(triton.cdiv(n, config.block_n), splits)](
        a,
        weight,
        bs,
        partials,
        m,
        n,
        k,
        k_per_split,
        a.stride(0),
        weight.stride(0),
        bs.stride(0),
        A_MODE=a_mode,
        A_ROUND_UP=round_up,
        SOFT_CAST=resolve_cast("auto"),
        B_MX=b_mx,
        DOT_FP32=triton_interpreting(),
        DOT_BF16=dot_bf16,
        BLOCK_M=block_m_for(m),
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    block = 1024
    _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
        partials,
        a_scale.reshape(-1) if a_scale is not None else partials,
        weight_scale.reshape(-1) if weight_scale is not None else partials,
        bias if bias is not None else partials,
        c,
        m,
        n,
        SPLIT_K=splits,
        A_SCALE=a_scale_mode,
        B_SCALE=b_scale_mode,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        num_warps=4,
    )
    return c


__all__ = [
    "DEFAULT_CONFIG",
    "MX_REGISTER_ROUNDING_MAX_M",
    "SMALL_M_MAX",
    "SplitKConfig",
    "small_m_gemm_triton",
    "split_k_for",
]
