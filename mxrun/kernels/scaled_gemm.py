"""FP8 (E4M3) scaled GEMMs for quantized Linear layers: torch references, Triton kernels, launchers.

Every function computes ``y = x @ W^T (+ bias)`` for a weight ``W`` ``[N, K]`` stored as E4M3 codes with fp32
scales (see :mod:`mxrun.kernels.fp8_quantize` for the scale layouts), and returns ``y`` ``[M, N]`` in the
activation's dtype. Three families, each a Triton kernel beside the plain-torch reference it is tested against:

* **W8A8 per-tensor / per-channel** (:func:`fp8_linear`, :func:`fp8_gemm`): activations are quantized on the
  fly with one scale per tensor or per token; the GEMM runs on the FP8 tensor cores and the scales, bias and
  output cast are applied in the epilogue (both scales factor out of the K sum, so the MMAs stay chained).
  For small M (``M <= FUSED_QUANT_MAX_M``) the activation quantization is fused into the GEMM: each program
  computes the amax of its rows, then quantizes the bf16/fp16 tile it loads in registers, bit-identical to
  :func:`~mxrun.kernels.fp8_quantize.quantize_fp8_per_token`. One launch instead of two, which is what small
  M is made of. For larger M the activation is quantized once by the quantize kernel and read as FP8; from
  ``WGMMA_MIN_M`` = 129 rows the GEMM is the warp-specialized Gluon kernel of
  :mod:`mxrun.kernels.fp8_wgmma_gemm` on sm_90, from ``TMA_MIN_M`` = 512 the TMA-fed persistent kernel of
  :mod:`mxrun.kernels.fp8_tma_gemm` on other sm_90+ devices (same numerics), the kernels here elsewhere; block
  scaling takes the same route.
* **W8A8 block** (:func:`fp8_block_linear`, :func:`fp8_block_gemm`): 128x128 weight tiles and 1x128
  activation groups; ``BLOCK_K = 128`` so each K step has one activation scale per row and one weight scale
  per 128 output columns, applied to that step's partial product (``acc += dot * s_a s_w``).
* **W8A16 weight-only** (:func:`fp8_weight_only_linear`): the E4M3 weight is widened in registers to the
  activation's dtype (exact: every E4M3 value is a bf16 and an fp16 value) and fed to a bf16/fp16 MMA with
  fp32 accumulation; per-tensor / per-channel scales are applied in the epilogue, 128x128 block scales per
  K step. On CUDA, per-tensor / per-channel weights instead take the split-K kernel up to 32 rows, the mid-M
  kernel (:mod:`mxrun.kernels.mid_m_gemm`: the weight as the MMA's register operand) up to 512 where TMA can
  read the operands, and above :func:`fp8_decode_matmul` (widen once per call, cuBLAS with an fp32 result,
  one-pass scale + bias + cast).

Launch rules shared by every kernel here (and by :mod:`mxrun.kernels.mxfp8_gemm`):

* M is a run-time argument, never a ``constexpr``: a new batch size does not compile a new kernel (Triton
  only specialises on ``M == 1`` and ``M % 16 == 0``). Configs are chosen per *M bucket*
  (:func:`m_bucket`: the next power of two, capped), and, with ``MXRUN_GEMM_AUTOTUNE=1``, timed once per
  ``(kernel, M bucket, N, K, dtype)`` and cached for the process.
* No host synchronisation on the hot path: scales stay on the device, no ``.item()``.
* Ragged tails: M and N tails read clamped (modulo) rows and are masked at the store, K tails are masked
  at the load (zeros add nothing), ``M = 1`` works.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mxrun.kernels.backend import Backend, resolve_backend, tl, triton, triton_interpreting
from mxrun.kernels.e4m3 import e4m3_code, widen_to_fp32
from mxrun.kernels.fp8_quantize import (
    FP8_BLOCK,
    Fp8Granularity,
    dequantize_fp8,
    fp8_scale_of,
    quantize_fp8,
    quantize_fp8_reference,
    quantize_fp8_triton,
)
from mxrun.kernels.mxfp8_quantize import resolve_cast
from mxrun.kernels.scale_division import divide_by_scale, scale_division_setup

FUSED_QUANT_MAX_M = 64
"""Up to this many rows, W8A8 per-token / per-tensor activation quantization runs inside the GEMM (for inputs
whose rows are not K-contiguous; contiguous ones quantize first, see :data:`W8A8_SPLIT_K_MAX_M`)."""
W8A8_SPLIT_K_MAX_M = 32
"""Up to this many rows the FP8 W8A8 Linear (per-token / per-tensor activations) runs the split-K kernel of
:mod:`mxrun.kernels.small_m_gemm` (32-row tiles at most); from one more, quantize once and the tile kernel, as
above 64 rows. H100, per-token, CUDA-graph replays, the seven Llama shapes (``bench_linear.py --graph --ms 16 32
64 128 256 512``, ``results/linear-h100-mid-m.md``, where ``fp8-channel:tile`` is the tile kernel forced): at
M = 64 the tile kernel took the split-K kernel's 0.49-1.41x of bf16 to 0.59-1.89x on 6 of 7 shapes (8B
``down`` 1.02 -> 0.97); at M = 32 the split-K kernel won on 4 (8B ``qkv`` 1.74 against 1.48), tied on 2 and
lost on 70B ``gate_up`` (1.75 against 1.88). Rows 33-64 take the split-K kernel's 64-row tile and the tile
kernel's 64-row bucket, as at M = 64."""
BLOCK_SPLIT_K_MAX_M = 32
"""Up to this many rows 128x128 block weights (W8A8 with 1x128 activation groups, and weight-only) run the
split-K kernel of :mod:`mxrun.kernels.small_m_gemm`, each K step's product times its block's scales (they took
the tile kernels before; 0 restores that); from :data:`~mxrun.kernels.mid_m_gemm.MID_M_MIN` rows the mid-M
kernel where it can run, as for the other weights."""
M_BUCKET_CAP = 4096
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


class GemmInputError(ValueError):
    """Shapes, dtypes or devices that the GEMM does not define; the message names what to change."""


@dataclass(frozen=True)
class GemmConfig:
    """One program's tile and how it is compiled. ``block_k`` must be 128 for the block-scaled kernels."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    max_imprecise_acc: int | None = 128
    """FP8 MMAs on Hopper (wgmma) accumulate in a reduced-precision accumulator; Triton promotes it to fp32
    every this many K elements. 128 is what cuBLASLt's ``_scaled_mm`` (fast accumulation off) and DeepSeek-V3
    do, and measured the same accuracy as ``_scaled_mm`` (benchmarks/sweep_fp8_gemm.py: 1.4-1.5% of outputs
    more than one bf16 ulp from the fp32 reference with outlier channels, for both) at 0.76-0.87 of its
    speed; 32 (after every wgmma) halves that error but also the speed; ``None`` never promotes: as fast as
    ``_scaled_mm`` but 6-9x the error. The block-scaled kernel adds each 128-wide K step's dot into its fp32
    accumulator itself, so it needs no promotion inside the dot (``None``)."""
    programs_per_sm: int = 1
    """Persistent (TMA) kernels only: programs launched per SM. Each promotion (and each block-scaled step's
    add) waits for that program's MMAs to finish, so with one program per SM the tensor cores idle while it
    adds; a second or third resident program issues its MMAs meanwhile (needs tiles small enough for several
    to share an SM's registers and shared memory)."""

    def launch_kwargs(self) -> dict[str, int]:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "GROUP_M": self.group_m,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            # A dot cannot promote less often than once per dot: cap at the K step.
            "MAX_IMPRECISE_ACC": None
            if self.max_imprecise_acc is None
            else min(self.max_imprecise_acc, self.block_k),
        }


def m_bucket(m: int) -> int:
    """The M bucket configs are chosen and tuned for: next power of two of ``m``, capped at 4096."""
    return min(1 << max(0, (m - 1).bit_length()), M_BUCKET_CAP)


def small_m_block(m: int) -> int:
    """Rows of one program when M is small: the MMA needs at least 16."""
    return max(16, m_bucket(m))


# ----------------------------------------------------------------------------------------------------------
# config choice and (optional) autotuning, shared with mxfp8_gemm
# ----------------------------------------------------------------------------------------------------------

_TUNED: dict[tuple, GemmConfig] = {}


def autotune_enabled() -> bool:
    return os.environ.get("MXRUN_GEMM_AUTOTUNE", "0") not in ("", "0")


def pick_config(
    key: tuple,
    candidates: Sequence[GemmConfig],
    launch: Callable[[GemmConfig], object],
    on_cuda: bool,
) -> GemmConfig:
    """The first candidate (the heuristic's choice), or with ``MXRUN_GEMM_AUTOTUNE=1`` the fastest candidate
    timed once for ``key`` (which holds the M bucket, not M) and cached. Timing syncs the host, once per key;
    don't enable it inside CUDA-graph capture."""
    if key in _TUNED:
        return _TUNED[key]
    if not (on_cuda and autotune_enabled() and len(candidates) > 1):
        return candidates[0]
    best, best_ms = candidates[0], float("inf")
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda config=config: launch(config), warmup=5, rep=20)
        except Exception:  # a config that does not fit (shared memory, registers) is skipped
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    _TUNED[key] = best
    return best


def _w8a8_candidates(m: int, n: int, k: int, fused: bool) -> list[GemmConfig]:
    """Heuristic tiles for the FP8 tensor cores of an H100 (sm_90), best guess first."""
    if fused:
        # Small M: the FP8 dot runs as mma.sync (fp32-exact accumulation), and Triton 3.6's pipeliner failed
        # on max_num_imprecise_acc with BLOCK_M = 64 (H100), so no promotion is asked for here.
        bm = small_m_block(m)
        return [
            GemmConfig(bm, 32 if n <= 8192 else 64, 256, 1, 4, 4, None),
            GemmConfig(bm, 64, 256, 1, 4, 4, None),
            GemmConfig(bm, 32, 512, 1, 4, 3, None),
            GemmConfig(bm, 128, 128, 1, 4, 4, None),
        ]
    if m <= 256:
        return [
            GemmConfig(64, 128, 128, 8, 4, 4),
            GemmConfig(64, 64, 256, 8, 4, 4),
            GemmConfig(128, 128, 128, 8, 8, 4),
        ]
    # Measured on H200 with promotion every 128 K (benchmarks/sweep_fp8_gemm.py): 256x128 tiles with 8 warps
    # 0.76-0.87 of _scaled_mm, 128x128 0.70-0.73, 128x256 0.35-0.38 (register spills).
    return [
        GemmConfig(256, 128, 128, 8, 8, 3),
        GemmConfig(128, 128, 128, 8, 8, 4),
        GemmConfig(128, 256, 128, 8, 8, 3),
    ]


def _block_candidates(m: int, n: int, fused: bool) -> list[GemmConfig]:
    if fused:
        bm = small_m_block(m)
        return [
            GemmConfig(bm, 32 if n <= 8192 else 64, 128, 1, 4, 5, None),
            GemmConfig(bm, 64, 128, 1, 4, 4, None),
        ]
    # No promotion inside the dot (None): each 128-wide step's dot is added to the fp32 accumulator with its
    # scales, which is the promotion. Promoting every 32 as well cost 3.8x (sweep_fp8_gemm.py on H200).
    if m <= 256:
        return [GemmConfig(64, 128, 128, 8, 4, 4, None), GemmConfig(64, 64, 128, 8, 4, 4, None)]
    return [
        GemmConfig(128, 128, 128, 8, 8, 4, None),
        GemmConfig(128, 256, 128, 8, 8, 3, None),
        GemmConfig(64, 256, 128, 8, 8, 3, None),
    ]


def _weight_only_candidates(m: int, n: int, block_k: int | None) -> list[GemmConfig]:
    bk = block_k or 128
    if m <= 64:
        bm = small_m_block(m)
        return [
            GemmConfig(bm, 32 if n <= 8192 else 64, block_k or 256, 1, 4, 4),
            GemmConfig(bm, 64, bk, 1, 4, 4),
        ]
    if m <= 256:
        return [GemmConfig(64, 128, bk, 8, 4, 4), GemmConfig(128, 128, bk, 8, 8, 3)]
    return [
        GemmConfig(128, 256, 64, 8, 8, 3) if block_k is None else GemmConfig(128, 128, 128, 8, 8, 3),
        GemmConfig(128, 128, 64, 8, 8, 4) if block_k is None else GemmConfig(128, 256, 128, 8, 8, 3),
    ]


# ----------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------


def _check_activation(x: torch.Tensor, k: int, fn: str) -> None:
    if x.dim() != 2:
        raise GemmInputError(f"{fn}: activations must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise GemmInputError(f"{fn}: activations must be bfloat16 or float16, got {x.dtype}")
    if x.shape[1] != k:
        raise GemmInputError(f"{fn}: activations have K={x.shape[1]} but the weight has K={k}")


def _check_weight(weight: torch.Tensor, fn: str) -> None:
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise GemmInputError(
            f"{fn}: the weight must be a 2-D [N, K] torch.float8_e4m3fn tensor, got {weight.dtype} "
            f"{tuple(weight.shape)}"
        )


def _check_bias(bias: torch.Tensor | None, n: int, fn: str) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise GemmInputError(f"{fn}: bias must be [N={n}], got {tuple(bias.shape)}")


def _scale_is_per_row(scale: torch.Tensor, rows: int, what: str, fn: str) -> bool:
    """True for a ``[rows, 1]`` / ``[rows]`` scale, False for a single (0-dim or 1-element) scale."""
    if scale.dtype != torch.float32:
        raise GemmInputError(f"{fn}: {what} scale must be float32, got {scale.dtype}")
    if (scale.numel() == 1 and rows != 1) or scale.dim() == 0:
        return False
    if scale.numel() == rows:
        return True
    raise GemmInputError(
        f"{fn}: {what} scale has shape {tuple(scale.shape)}; expected one value or [{rows}, 1]"
    )


def _out(x_dtype: torch.dtype, m: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.empty((m, n), dtype=x_dtype, device=device)


# ----------------------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------------------


def _finish_reference(acc: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def fp8_gemm_reference(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(a * s_a) @ (b * s_b)^T + bias`` in fp32 from E4M3 ``a`` ``[M, K]`` and ``b`` ``[N, K]`` with
    per-tensor (0-dim) or per-row (``[rows, 1]``) scales, cast to ``out_dtype``. Every E4M3 value and its product
    with a power-of-two-free fp32 scale is computed in fp32, so only the fp32 summation order differs from the
    kernel."""
    a = a_data.float() * a_scale.float().reshape(-1, 1) if a_scale.numel() > 1 else a_data.float() * a_scale
    b = b_data.float() * b_scale.float().reshape(-1, 1) if b_scale.numel() > 1 else b_data.float() * b_scale
    return _finish_reference(a @ b.T, bias, out_dtype)


def fp8_block_gemm_reference(
    a_data: torch.Tensor,
    a_scale: torch.Tensor,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Block-scaled GEMM: ``a`` with 1x128 group scales ``[M, ceil(K/128)]``, ``b`` with 128x128 tile scales
    ``[ceil(N/128), ceil(K/128)]``; dequantize both in fp32, multiply, add bias, cast."""
    a = dequantize_fp8(a_data, a_scale, Fp8Granularity.GROUP_1X128)
    b = dequantize_fp8(b_data, b_scale, Fp8Granularity.BLOCK_128X128)
    return _finish_reference(a @ b.T, bias, out_dtype)


_ACT_GRANULARITY = {"tensor": Fp8Granularity.PER_TENSOR, "token": Fp8Granularity.PER_ROW}


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """W8A8 per-tensor/per-channel Linear on plain torch: quantize ``x`` (``activation`` = ``"tensor"`` or
    ``"token"``) exactly as the quantize kernels do, then :func:`fp8_gemm_reference`."""
    quantized = quantize_fp8_reference(x, _ACT_GRANULARITY[activation])
    return fp8_gemm_reference(quantized.data, quantized.scale, weight, weight_scale, bias, x.dtype)


def fp8_block_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8 block Linear on plain torch: 1x128 activation groups, then :func:`fp8_block_gemm_reference`."""
    quantized = quantize_fp8_reference(x, Fp8Granularity.GROUP_1X128)
    return fp8_block_gemm_reference(quantized.data, quantized.scale, weight, weight_scale, bias, x.dtype)


def fp8_weight_only_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    granularity: Fp8Granularity | str,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """W8A16: dequantize the weight in fp32, multiply by the unquantized activations in fp32, cast."""
    w = dequantize_fp8(weight, weight_scale, granularity)
    return _finish_reference(x.float() @ w.T, bias, x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, walking GROUP_M row-tiles per column sweep so that a wave of programs
    shares A rows and B columns in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS: tl.constexpr):
    """Epilogue tail shared by every GEMM: add the bias (fp32), cast to C's dtype, masked store."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    c = acc.to(c_ptr.dtype.element_ty)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn, c, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(
    a_ptr,  # [M, K]: E4M3 codes as float8e4nv (FUSED_QUANT == 0) or bf16/fp16 activations; (m, k) at
    #         m*stride_am + k*stride_ak (K contiguous in practice)
    a_scale_ptr,  # FUSED_QUANT == 0: fp32 [M] (A_PER_ROW) or [1]; else unused
    b_ptr,  # [N, K] float8e4nv weight, (n, k) at n*stride_bn + k*stride_bk; K contiguous (stride_bk == 1)
    b_scale_ptr,  # fp32 [N] (B_PER_ROW) or [1]
    bias_ptr,  # [N] bf16/fp16/fp32, or a dummy when HAS_BIAS is False
    c_ptr,  # [M, N] bf16/fp16 output, (m, n) at m*stride_cm + n*stride_cn
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    FUSED_QUANT: tl.constexpr,  # 0: A is FP8 already; 1: per-token scales here; 2: per-tensor scale here
    A_PER_ROW: tl.constexpr,
    B_PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,  # FP8 dots: promote the MMA accumulator to fp32 every this many K
):
    """C = (A s_a) (B s_b)^T + bias. Both scales factor out of the K sum, so the FP8 MMAs accumulate into one
    fp32 accumulator and the scales, bias and cast cost one epilogue. With FUSED_QUANT the program first
    takes the amax of its rows (per tensor: of all M rows, so the grid has one row-tile), then quantizes each
    A tile in registers exactly as the quantize kernel would (same division, saturating RNE)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Clamp (wrap) tail rows and columns instead of masking every load; the store masks them.
    offs_am = offs_m % M
    offs_bn = offs_n % N
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_bn.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk

    if FUSED_QUANT != 0:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(a_ptrs + k0 * stride_ak, mask=(k0 + offs_k < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(widen_to_fp32(x)), axis=1))
        if FUSED_QUANT == 2:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.max(amax, axis=0)
        a_scale = fp8_scale_of(amax)
        a_pre, a_divisor, a_reciprocal = scale_division_setup(a_scale)
        a_pre, a_divisor, a_reciprocal = a_pre[:, None], a_divisor[:, None], a_reciprocal[:, None]
    elif A_PER_ROW:
        a_scale = tl.load(a_scale_ptr + offs_am)
    else:
        a_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(a_scale_ptr)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + offs_k < K)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + offs_k < K)[:, None], other=0.0)
        if FUSED_QUANT != 0:
            a = divide_by_scale(widen_to_fp32(a), a_pre, a_divisor, a_reciprocal)
            a = e4m3_code(a, SOFT_CAST).to(tl.float8e4nv, bitcast=True)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if B_PER_ROW:
        b_scale = tl.load(b_scale_ptr + offs_bn)
    else:
        b_scale = tl.zeros([BLOCK_N], dtype=tl.float32) + tl.load(b_scale_ptr)
    acc = acc * a_scale[:, None] * b_scale[None, :]
    store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _fp8_block_gemm_kernel(
    a_ptr,  # [M, K]: float8e4nv (FUSED_QUANT False) or bf16/fp16; (m, k) at m*stride_am + k*stride_ak
    a_scale_ptr,  # fp32 [M, cdiv(K, 128)], (m, g) at m*stride_asm + g; unused when FUSED_QUANT
    b_ptr,  # [N, K] float8e4nv weight, (n, k) at n*stride_bn + k*stride_bk; K contiguous
    b_scale_ptr,  # fp32 [cdiv(N, 128), cdiv(K, 128)], (i, g) at i*stride_bsn + g
    bias_ptr,  # [N] or dummy
    c_ptr,  # [M, N] output
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_asm,
    stride_bn,
    stride_bk,
    stride_bsn,
    stride_cm,
    stride_cn,
    FUSED_QUANT: tl.constexpr,  # quantize bf16/fp16 A to 1x128 groups in registers
    HAS_BIAS: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # must be 128: one activation group and one weight block per K step
    GROUP_M: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,  # FP8 dots: promote the MMA accumulator to fp32 every this many K
):
    """Block-scaled FP8 GEMM: per K step, one fp32 scale per A row (its 1x128 group) and one per 128 output
    columns (the weight tile), applied to that step's partial product. With FUSED_QUANT the 1x128 groups are
    exactly the A tiles loaded, so the quantization needs no extra pass."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_am = offs_m % M
    offs_bn = offs_n % N
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_bn.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    a_scale_ptrs = a_scale_ptr + offs_am.to(tl.int64) * stride_asm
    b_scale_ptrs = b_scale_ptr + (offs_bn // BLOCK_K) * stride_bsn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(kb * BLOCK_K + offs_k < K)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(kb * BLOCK_K + offs_k < K)[:, None], other=0.0)
        if FUSED_QUANT:
            x = widen_to_fp32(a)
            a_scale = fp8_scale_of(tl.max(tl.abs(x), axis=1))
            pre, divisor, reciprocal = scale_division_setup(a_scale)
            x = divide_by_scale(x, pre[:, None], divisor[:, None], reciprocal[:, None])
            a = e4m3_code(x, SOFT_CAST).to(tl.float8e4nv, bitcast=True)
        else:
            a_scale = tl.load(a_scale_ptrs + kb)
        b_scale = tl.load(b_scale_ptrs + kb)
        acc += tl.dot(a, b, max_num_imprecise_acc=MAX_IMPRECISE_ACC) * (a_scale[:, None] * b_scale[None, :])
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _fp8_weight_only_kernel(
    a_ptr,  # [M, K] bf16/fp16 activations, (m, k) at m*stride_am + k*stride_ak
    b_ptr,  # [N, K] float8e4nv weight, (n, k) at n*stride_bn + k*stride_bk; K contiguous
    b_scale_ptr,  # SCALE_MODE 0: fp32 [1]; 1: fp32 [N]; 2: fp32 [cdiv(N,128), cdiv(K,128)] at i*stride_bsn + g
    bias_ptr,
    c_ptr,  # [M, N] output (A's dtype)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_bsn,
    stride_cm,
    stride_cn,
    SCALE_MODE: tl.constexpr,  # 0 per-tensor, 1 per-channel (epilogue), 2 128x128 blocks (per K step)
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128 when SCALE_MODE == 2
    GROUP_M: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,  # FP8 dots: promote the MMA accumulator to fp32 every this many K
):
    """W8A16: E4M3 weights widened to A's dtype in registers (exact), bf16/fp16 MMA, fp32 accumulation."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_am = offs_m % M
    offs_bn = offs_n % N
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_bn.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(kb * BLOCK_K + offs_k < K)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(kb * BLOCK_K + offs_k < K)[:, None], other=0.0)
        if DOT_FP32:  # the interpreter's bf16/fp16 dot is wrong: run the (exact) operands through an fp32 dot
            a = widen_to_fp32(a)
            b = b.to(tl.float32)
        else:
            b = b.to(a.dtype)
        if SCALE_MODE == 2:
            b_scale = tl.load(b_scale_ptr + (offs_bn // BLOCK_K) * stride_bsn + kb)
            acc += tl.dot(a, b) * b_scale[None, :]
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SCALE_MODE == 1:
        acc = acc * tl.load(b_scale_ptr + offs_bn)[None, :]
    elif SCALE_MODE == 0:
        acc = acc * tl.load(b_scale_ptr)
    store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------


def _grid(m: int, n: int, config: GemmConfig) -> tuple[int]:
    return (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)


def unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` laid out densely (a no-op when it already is): the kernels index scales and bias at unit stride
    along their last dimension, so a strided view passed by a caller must not be read as if it were dense."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def output_for(
    fn: str, out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A new ``[m, n]`` output, or ``out`` once checked: the GEMMs write ``out`` at unit column stride (a column
    slice of a wider output is fine), anything else is a named error rather than a wrong or partial write."""
    if out is None:
        return torch.empty((m, n), dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or out.device != device or out.stride(1) != 1:
        raise GemmInputError(
            f"{fn}: out must be a [{m}, {n}] {dtype} tensor on {device} with unit column stride, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device} with strides {out.stride()}"
        )
    return out


def _bias_arg(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else like


def fp8_gemm_triton(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    fused_activation: str | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Launch the W8A8 kernel. ``a`` is E4M3 with ``a_scale`` (0-dim or ``[M, 1]``), or, with
    ``fused_activation`` = ``"token"`` / ``"tensor"``, bf16/fp16 activations quantized inside the kernel
    (per-tensor needs ``M <= FUSED_QUANT_MAX_M``: the kernel then runs one row-tile)."""
    fn = "fp8_gemm_triton"
    a_scale, b_scale, bias = unit_stride(a_scale), unit_stride(b_scale), unit_stride(bias)
    _check_weight(b_data, fn)
    n, k = b_data.shape
    m = a.shape[0]
    if a.dim() != 2 or a.shape[1] != k:
        raise GemmInputError(f"{fn}: A must be [M, K={k}], got {tuple(a.shape)}")
    _check_bias(bias, n, fn)
    b_per_row = _scale_is_per_row(b_scale, n, "weight", fn)
    fused = {"token": 1, "tensor": 2, None: 0}[fused_activation]
    if fused:
        _check_activation(a, k, fn)
        out_dtype = a.dtype
        a_per_row = False
        a_scale_arg = b_scale
        if fused == 2 and m > FUSED_QUANT_MAX_M:
            raise GemmInputError(
                f"{fn}: fused per-tensor quantization needs M <= {FUSED_QUANT_MAX_M}, got {m}"
            )
    else:
        if a.dtype != torch.float8_e4m3fn or a_scale is None:
            raise GemmInputError(f"{fn}: A must be float8_e4m3fn with a scale unless fused_activation is set")
        a_per_row = _scale_is_per_row(a_scale, m, "activation", fn)
        a_scale_arg = a_scale
        out_dtype = out_dtype or torch.bfloat16
    c = _out(out_dtype, m, n, a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_() if bias is None else c.copy_(bias.to(out_dtype).expand(m, n))
    soft_cast = resolve_cast("auto")

    def launch(cfg: GemmConfig) -> None:
        _fp8_gemm_kernel[_grid(m, n, cfg)](
            a,
            a_scale_arg,
            b_data,
            b_scale,
            _bias_arg(bias, b_scale),
            c,
            m,
            n,
            k,
            a.stride(0),
            a.stride(1),
            b_data.stride(0),
            b_data.stride(1),
            c.stride(0),
            c.stride(1),
            FUSED_QUANT=fused,
            A_PER_ROW=a_per_row,
            B_PER_ROW=b_per_row,
            HAS_BIAS=bias is not None,
            SOFT_CAST=soft_cast,
            EVEN_K=k % cfg.block_k == 0,
            **cfg.launch_kwargs(),
        )

    if config is None:
        candidates = _w8a8_candidates(m, n, k, bool(fused))
        key = ("fp8_gemm", fused, m_bucket(m), n, k, a.dtype, out_dtype)
        config = pick_config(key, candidates, launch, a.is_cuda)
    launch(config)
    return c


def fp8_block_gemm_triton(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b_data: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    fused_activation: bool = False,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Launch the block-scaled kernel: ``a`` E4M3 with 1x128 group scales ``[M, ceil(K/128)]`` or, with
    ``fused_activation``, bf16/fp16 quantized to 1x128 groups inside the kernel."""
    fn = "fp8_block_gemm_triton"
    a_scale, b_scale, bias = unit_stride(a_scale), unit_stride(b_scale), unit_stride(bias)
    _check_weight(b_data, fn)
    n, k = b_data.shape
    m = a.shape[0]
    if a.dim() != 2 or a.shape[1] != k:
        raise GemmInputError(f"{fn}: A must be [M, K={k}], got {tuple(a.shape)}")
    _check_bias(bias, n, fn)
    kb = triton.cdiv(k, FP8_BLOCK)
    if b_scale.shape != (triton.cdiv(n, FP8_BLOCK), kb) or b_scale.dtype != torch.float32:
        raise GemmInputError(
            f"{fn}: weight scale must be fp32 [{triton.cdiv(n, FP8_BLOCK)}, {kb}], got "
            f"{b_scale.dtype} {tuple(b_scale.shape)}"
        )
    if fused_activation:
        _check_activation(a, k, fn)
        out_dtype = a.dtype
        a_scale_arg, stride_asm = b_scale, 0
    else:
        if a.dtype != torch.float8_e4m3fn or a_scale is None or a_scale.shape != (m, kb):
            raise GemmInputError(f"{fn}: A must be float8_e4m3fn with fp32 scales [M, {kb}]")
        a_scale_arg, stride_asm = a_scale, a_scale.stride(0)
        out_dtype = out_dtype or torch.bfloat16
    c = _out(out_dtype, m, n, a.device)
    if m == 0 or n == 0:
        return c
    soft_cast = resolve_cast("auto")

    def launch(cfg: GemmConfig) -> None:
        if cfg.block_k != FP8_BLOCK:
            raise GemmInputError(f"{fn}: block_k must be {FP8_BLOCK}, got {cfg}")
        _fp8_block_gemm_kernel[_grid(m, n, cfg)](
            a,
            a_scale_arg,
            b_data,
            b_scale,
            _bias_arg(bias, b_scale),
            c,
            m,
            n,
            k,
            a.stride(0),
            a.stride(1),
            stride_asm,
            b_data.stride(0),
            b_data.stride(1),
            b_scale.stride(0),
            c.stride(0),
            c.stride(1),
            FUSED_QUANT=fused_activation,
            HAS_BIAS=bias is not None,
            SOFT_CAST=soft_cast,
            EVEN_K=k % FP8_BLOCK == 0,
            **cfg.launch_kwargs(),
        )

    if config is None:
        key = ("fp8_block_gemm", fused_activation, m_bucket(m), n, k, a.dtype, out_dtype)
        config = pick_config(key, _block_candidates(m, n, fused_activation), launch, a.is_cuda)
    launch(config)
    return c


_WEIGHT_ONLY_MODE = {Fp8Granularity.PER_TENSOR: 0, Fp8Granularity.PER_ROW: 1, Fp8Granularity.BLOCK_128X128: 2}


def fp8_weight_only_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    granularity: Fp8Granularity | str,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Launch the W8A16 kernel for a per-tensor, per-channel or 128x128-block FP8 weight."""
    fn = "fp8_weight_only_triton"
    weight_scale, bias = unit_stride(weight_scale), unit_stride(bias)
    granularity = Fp8Granularity(granularity)
    if granularity not in _WEIGHT_ONLY_MODE:
        raise GemmInputError(
            f"{fn}: weights are per_tensor, per_row or block_128x128, not {granularity.value}"
        )
    _check_weight(weight, fn)
    n, k = weight.shape
    _check_activation(x, k, fn)
    _check_bias(bias, n, fn)
    m = x.shape[0]
    mode = _WEIGHT_ONLY_MODE[granularity]
    if mode == 1:
        _scale_is_per_row(weight_scale, n, "weight", fn)
    c = _out(x.dtype, m, n, x.device)
    if m == 0 or n == 0:
        return c
    block_k = FP8_BLOCK if mode == 2 else None
    stride_bsn = weight_scale.stride(0) if mode == 2 else 0

    def launch(cfg: GemmConfig) -> None:
        _fp8_weight_only_kernel[_grid(m, n, cfg)](
            x,
            weight,
            weight_scale,
            _bias_arg(bias, weight_scale),
            c,
            m,
            n,
            k,
            x.stride(0),
            x.stride(1),
            weight.stride(0),
            weight.stride(1),
            stride_bsn,
            c.stride(0),
            c.stride(1),
            SCALE_MODE=mode,
            HAS_BIAS=bias is not None,
            DOT_FP32=triton_interpreting(),
            EVEN_K=k % cfg.block_k == 0,
            **cfg.launch_kwargs(),
        )

    if config is None:
        key = ("fp8_weight_only", mode, m_bucket(m), n, k, x.dtype)
        config = pick_config(key, _weight_only_candidates(m, n, block_k), launch, x.is_cuda)
    launch(config)
    return c


@triton.jit(do_not_specialize=["M"])
def _scale_bias_cast_kernel(
    y_ptr,  # [M, N] fp32, contiguous
    scale_ptr,  # fp32 [N] (PER_COLUMN) or [1]
    bias_ptr,  # [N] or dummy
    out_ptr,  # [M, N] bf16/fp16, (m, n) at m*stride_om + n
    M,
    N,
    stride_om,
    PER_COLUMN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out = cast(y * s + bias): the epilogue of the decode + cuBLAS path, one pass over the fp32 product."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    if PER_COLUMN:
        y = y * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        y = y * tl.load(scale_ptr)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _widen_e4m3_kernel(
    q_ptr,  # [R, K] float8e4nv, (r, k) at r*stride_qr + k
    out_ptr,  # [R, K] bf16/fp16, contiguous
    R,
    K,
    stride_qr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = E4M3 code widened to bf16/fp16 (exact). torch's ``.to()`` from float8 ran at ~1 TB/s on H200."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    codes = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qr + cols[None, :], mask=mask, other=0.0)
    out = out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    # E4M3 has no Inf; 0x7F / 0xFF are NaN (Triton's interpreter widens them to 480: say it explicitly)
    is_nan = (codes.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F
    values = tl.where(is_nan, float("nan"), codes.to(tl.float32))
    tl.store(out, values.to(out_ptr.dtype.element_ty), mask=mask)


def widen_e4m3(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A K-contiguous ``[R, K]`` E4M3 tensor as bf16/fp16 values (exact), contiguous."""
    if q.dim() != 2 or q.dtype != torch.float8_e4m3fn or (q.numel() and q.stride(1) != 1):
        raise GemmInputError(
            f"widen_e4m3: needs a K-contiguous 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)} with "
            f"strides {q.stride()}"
        )
    if dtype not in ACTIVATION_DTYPES:
        raise GemmInputError(f"widen_e4m3: widens to bfloat16 or float16, not {dtype}")
    rows, k = q.shape
    out = torch.empty((rows, k), dtype=dtype, device=q.device)
    if rows and k:
        block_r, block_k = 16, 512
        _widen_e4m3_kernel[(triton.cdiv(rows, block_r), triton.cdiv(k, block_k))](
            q, out, rows, k, q.stride(0), BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4
        )
    return out


MAX_DECODE_CHUNK_BYTES = 256 << 20
""":func:`fp8_decode_matmul` works in slices of output columns whose widened weight and fp32 product each
stay under this many bytes."""


def fp8_decode_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """W8A16 for per-tensor / per-channel FP8 weights at larger M: widen the E4M3 codes to x's dtype (exact),
    let cuBLAS multiply with an fp32 result (``torch.mm(..., out_dtype=torch.float32)``), then scale, add the
    bias and round once in :func:`_scale_bias_cast_kernel`. The same sums as the reference up to fp32
    summation order, one rounding at the end (rounding cuBLAS's output to bf16 before the scale and bias
    would round twice, and lose everything when the bias cancels the product). The in-register W8A16 kernel
    re-decodes every weight tile once per row-tile program; this decodes once per call. The Linear takes it
    on CUDA; under ``TRITON_INTERPRET=1`` it runs on CPU tensors (with an fp32 torch matmul) for the tests."""
    fn = "fp8_decode_matmul"
    _check_weight(weight, fn)
    n, k = weight.shape
    _check_activation(x, k, fn)
    _check_bias(bias, n, fn)
    per_column = _scale_is_per_row(weight_scale, n, "weight", fn)
    weight_scale, bias = unit_stride(weight_scale), unit_stride(bias)
    m = x.shape[0]
    out = _out(x.dtype, m, n, x.device)
    if m == 0 or n == 0:
        return out
    columns = max(128, MAX_DECODE_CHUNK_BYTES // (4 * max(k, m, 1)) // 128 * 128)
    block_m, block_n = 32, 128
    for n0 in range(0, n, columns):
        n1 = min(n, n0 + columns)
        widened = widen_e4m3(weight[n0:n1], x.dtype)
        if x.is_cuda:
            y = torch.mm(x, widened.t(), out_dtype=torch.float32)
        else:  # the interpreter (tests): no CPU kernel takes out_dtype; fp32 operands give the same sums
            y = x.float() @ widened.float().t()
        _scale_bias_cast_kernel[(triton.cdiv(m, block_m), triton.cdiv(n1 - n0, block_n))](
            y,
            weight_scale[n0:n1] if per_column else weight_scale,
            bias[n0:n1] if bias is not None else weight_scale,
            out[:, n0:],
            m,
            n1 - n0,
            out.stride(0),
            PER_COLUMN=per_column,
            HAS_BIAS=bias is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# dispatchers (what a quantized Linear calls)
# ----------------------------------------------------------------------------------------------------------


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """W8A8 Linear with a per-tensor (0-dim scale) or per-channel (``[N, 1]``) FP8 weight and dynamic
    ``activation`` quantization (``"tensor"`` or ``"token"``). ``x`` is ``[M, K]`` bf16/fp16; the result has
    its dtype. Triton on CUDA, the torch reference elsewhere. Up to :data:`W8A8_SPLIT_K_MAX_M` rows: activation
    quantization, then the split-K kernel of :mod:`mxrun.kernels.small_m_gemm` (one row is quantized inside it
    where :func:`~mxrun.kernels.small_m_gemm.quantizes_row_in_loop` says so); beyond, the tile kernel (from
    129 rows the Gluon kernel of :mod:`mxrun.kernels.fp8_wgmma_gemm` on Hopper, from 512 the TMA kernel of
    :mod:`mxrun.kernels.fp8_tma_gemm` on other sm_90+), except where its tiles would leave SMs idle and the mid-M
    kernel splits K instead (:func:`~mxrun.kernels.mid_m_gemm.w8a8_takes_mid_m`, up to
    :data:`~mxrun.kernels.mid_m_gemm.W8A8_MID_M_MAX` rows). (The tile kernel with the quantization fused in,
    measured 0.06-0.5x of bf16 at M <= 64, only serves strided inputs now.)"""
    if activation not in _ACT_GRANULARITY:
        raise GemmInputError(f"fp8_linear: activation must be 'tensor' or 'token', got {activation!r}")
    if resolve_backend(backend, x) is not Backend.TRITON:
        return fp8_linear_reference(x, weight, weight_scale, bias, activation)
    from mxrun.kernels.fp8_tma_gemm import TMA_MIN_M, fp8_tma_gemm, tma_usable  # imports this module
    from mxrun.kernels.fp8_wgmma_gemm import WGMMA_MIN_M, fp8_wgmma_gemm, wgmma_gemm_usable
    from mxrun.kernels.mid_m_gemm import W8A8_MID_M_MAX, w8a8_on_mid_m
    from mxrun.kernels.small_m_gemm import SMALL_M_MAX, small_m_gemm_triton  # imports this module

    unit_k = weight.stride(1) == 1 and x.stride(1) == 1
    if x.shape[0] <= min(W8A8_SPLIT_K_MAX_M, SMALL_M_MAX) and unit_k:
        if activation == "token" or x.shape[0] == 1:  # one row's per-tensor scale is its per-row one
            return small_m_gemm_triton(x, weight, weight_scale=weight_scale, bias=bias, quantize_rows=True)
        quantized = quantize_fp8(x, _ACT_GRANULARITY[activation], Backend.TRITON)
        return small_m_gemm_triton(
            quantized.data,
            weight,
            a_scale=quantized.scale,
            weight_scale=weight_scale,
            bias=bias,
            out_dtype=x.dtype,
        )
    if x.shape[0] <= FUSED_QUANT_MAX_M and not unit_k:
        return fp8_gemm_triton(x, None, weight, weight_scale, bias, fused_activation=activation)
    quantized = quantize_fp8(x, _ACT_GRANULARITY[activation], Backend.TRITON)
    mid = w8a8_on_mid_m(
        quantized.data, quantized.scale, weight, bias, x.dtype, W8A8_MID_M_MAX, weight_scale=weight_scale
    )
    if mid is not None:
        return mid
    if x.shape[0] >= WGMMA_MIN_M and wgmma_gemm_usable(quantized.data, weight):
        return fp8_wgmma_gemm(quantized.data, quantized.scale, weight, weight_scale, bias, x.dtype)
    if x.shape[0] >= TMA_MIN_M and tma_usable(quantized.data, weight):
        return fp8_tma_gemm(
            quantized.data, quantized.scale, weight, weight_scale, bias, x.dtype, block_scaled=False
        )
    return fp8_gemm_triton(quantized.data, quantized.scale, weight, weight_scale, bias, x.dtype)


def fp8_block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """W8A8 Linear with 128x128 FP8 weight blocks and dynamic 1x128 activation groups: quantize, then up to
    :data:`BLOCK_SPLIT_K_MAX_M` rows the split-K kernel (:mod:`mxrun.kernels.small_m_gemm`), else
    :func:`fp8_block_gemm` (from 129 rows on Hopper the Gluon kernel: 0.90-1.11x of ``torch._scaled_mm``
    rowwise at M >= 1024 on an H100, ``benchmarks/results/block-scales-tma-h100.log``), or the mid-M kernel where the
    block tile kernel would leave SMs idle (:func:`~mxrun.kernels.mid_m_gemm.w8a8_takes_mid_m`, up to
    :data:`~mxrun.kernels.mid_m_gemm.BLOCK_W8A8_MID_M_MAX` rows). Where the Gluon kernel takes the rows, the
    activation scales are written K-major for its loader to bring in by TMA
    (:data:`~mxrun.kernels.fp8_wgmma_gemm.BLOCK_SCALES_BY_TMA`)."""
    if resolve_backend(backend, x) is not Backend.TRITON:
        return fp8_block_linear_reference(x, weight, weight_scale, bias)
    from mxrun.kernels.fp8_wgmma_gemm import block_scales_k_major
    from mxrun.kernels.mid_m_gemm import BLOCK_W8A8_MID_M_MAX, w8a8_on_mid_m
    from mxrun.kernels.small_m_gemm import small_m_gemm_triton  # imports this module

    # Quantize first at every M: the fused small-M kernel measured 0.07-0.2x of bf16 at M = 64 (H200).
    # The Gluon kernel reads K-major activation scales by TMA (fp8_wgmma_gemm.BLOCK_SCALES_BY_TMA)
    if block_scales_k_major(x):
        quantized = quantize_fp8_triton(x, Fp8Granularity.GROUP_1X128, scale_k_major=True)
    else:
        quantized = quantize_fp8(x, Fp8Granularity.GROUP_1X128, Backend.TRITON)
    if x.shape[0] <= BLOCK_SPLIT_K_MAX_M and weight.stride(1) == 1:
        return small_m_gemm_triton(
            quantized.data,
            weight,
            a_scale=quantized.scale,
            weight_block_scale=weight_scale,
            bias=bias,
            out_dtype=x.dtype,
        )
    mid = w8a8_on_mid_m(
        quantized.data,
        quantized.scale,
        weight,
        bias,
        x.dtype,
        BLOCK_W8A8_MID_M_MAX,
        weight_block_scale=weight_scale,
    )
    if mid is not None:
        return mid
    return fp8_block_gemm(quantized.data, quantized.scale, weight, weight_scale, bias, x.dtype)


def fp8_block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-scaled GEMM of quantized operands (E4M3 ``a`` with 1x128 group scales, E4M3 ``weight`` with
    128x128 block scales) on CUDA: from ``WGMMA_MIN_M`` rows the Gluon kernel on Hopper, from ``TMA_MIN_M`` the
    TMA kernel on other sm_90+ devices; the pointer kernel otherwise. ``out`` (``[M, N]``, unit column stride,
    e.g. a column slice of a wider output) receives the result: written in place by the Gluon kernel, copied
    otherwise."""
    from mxrun.kernels.fp8_tma_gemm import TMA_MIN_M, fp8_tma_gemm, tma_usable  # imports this module
    from mxrun.kernels.fp8_wgmma_gemm import WGMMA_MIN_M, fp8_wgmma_gemm, wgmma_gemm_usable

    if out is not None:
        output_for("fp8_block_gemm", out, a.shape[0], weight.shape[0], out_dtype, a.device)
    if a.shape[0] >= WGMMA_MIN_M and wgmma_gemm_usable(a, weight):
        return fp8_wgmma_gemm(a, a_scale, weight, weight_scale, bias, out_dtype, block_scaled=True, out=out)
    if a.shape[0] >= TMA_MIN_M and tma_usable(a, weight):
        result = fp8_tma_gemm(a, a_scale, weight, weight_scale, bias, out_dtype, block_scaled=True)
    else:
        result = fp8_block_gemm_triton(a, a_scale, weight, weight_scale, bias, out_dtype)
    return result if out is None else out.copy_(result)


def fp8_weight_only_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    granularity: Fp8Granularity | str,
    bias: torch.Tensor | None,
    backend: Backend | str = Backend.AUTO,
) -> torch.Tensor:
    """W8A16 Linear: FP8 weight (per-tensor, per-channel or 128x128 blocks), bf16/fp16 activations. Per-tensor /
    per-channel weights: from :data:`~mxrun.kernels.mid_m_gemm.MID_M_MIN` to
    :data:`~mxrun.kernels.mid_m_gemm.MID_M_MAX` rows the mid-M kernel (:mod:`mxrun.kernels.mid_m_gemm`, where
    TMA can read the operands), fewer rows the split-K kernel (:mod:`mxrun.kernels.small_m_gemm`), more
    :func:`fp8_decode_matmul` on CUDA (1.4-2.0x the in-register kernel at M >= 1024 on an H100,
    benchmarks/bench_linear.py); 128x128 blocks (scales that change along K) take the mid-M kernel for the same
    rows (each K step's product times its block's scale), the split-K kernel up to :data:`BLOCK_SPLIT_K_MAX_M`
    rows (the same per-step scaling), the in-register tile kernel for the others: H100,
    ``bench_linear.py --graph --rep-ms 10 --ms 1 16 48 128 512 1024 --columns fp8-block-wo fp8-block-wo:tile``
    (``results/linear-h100-block-wo-mid-m.md``), the mid-M kernel faster on all 21 cases at M = 48-512 (0.25-1.01x
    -> 0.57-1.70x of bf16), slower on 6 of 7 at M = 16."""
    if resolve_backend(backend, x) is not Backend.TRITON:
        return fp8_weight_only_reference(x, weight, weight_scale, granularity, bias)
    from mxrun.kernels.mid_m_gemm import MID_M_MAX, MID_M_MIN, mid_m_gemm_triton, mid_m_usable
    from mxrun.kernels.small_m_gemm import SMALL_M_MAX, small_m_gemm_triton  # both import this module

    per_block = Fp8Granularity(granularity) is Fp8Granularity.BLOCK_128X128
    if per_block and MID_M_MIN <= x.shape[0] <= MID_M_MAX and mid_m_usable(x, weight):
        return mid_m_gemm_triton(x, weight, weight_block_scale=weight_scale, bias=bias)
    unit_k = weight.stride(1) == 1 and x.stride(1) == 1
    if per_block and x.shape[0] <= min(BLOCK_SPLIT_K_MAX_M, SMALL_M_MAX) and unit_k:
        return small_m_gemm_triton(x, weight, weight_block_scale=weight_scale, bias=bias)
    if not per_block and weight.stride(1) == 1 and x.stride(1) == 1:
        if MID_M_MIN <= x.shape[0] <= MID_M_MAX and mid_m_usable(x, weight):
            return mid_m_gemm_triton(x, weight, weight_scale=weight_scale, bias=bias)
        if x.shape[0] <= SMALL_M_MAX:
            return small_m_gemm_triton(x, weight, weight_scale=weight_scale, bias=bias)
        if x.is_cuda and weight_scale.is_contiguous():
            return fp8_decode_matmul(x, weight, weight_scale, bias)
    return fp8_weight_only_triton(x, weight, weight_scale, granularity, bias)


__all__ = [
    "BLOCK_SPLIT_K_MAX_M",
    "FUSED_QUANT_MAX_M",
    "MAX_DECODE_CHUNK_BYTES",
    "W8A8_SPLIT_K_MAX_M",
    "GemmConfig",
    "GemmInputError",
    "fp8_block_gemm",
    "fp8_block_gemm_reference",
    "fp8_block_gemm_triton",
    "fp8_block_linear",
    "fp8_block_linear_reference",
    "fp8_decode_matmul",
    "fp8_gemm_reference",
    "fp8_gemm_triton",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_weight_only_linear",
    "fp8_weight_only_reference",
    "fp8_weight_only_triton",
    "m_bucket",
    "pick_config",
    "unit_stride",
    "widen_e4m3",
]
