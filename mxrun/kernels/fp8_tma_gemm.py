"""Persistent FP8 GEMMs fed by the Hopper Tensor Memory Accelerator (TMA), for large M.

Same contracts as the tile kernels of :mod:`mxrun.kernels.scaled_gemm` (W8A8 per-tensor / per-channel and
128x128 block-scaled, A already E4M3), different machinery: the operand tiles are fetched by TMA through
tensor descriptors instead of per-thread pointer loads, which frees the registers and issue slots that
address arithmetic took from the MMAs, and bounds-checks in hardware (out-of-range rows, columns and K tails
read as zeros, so there is no masking and no modulo clamping). One program per SM walks the output tiles in
grouped order, so the prologue of the next tile overlaps the epilogue of the last.

Block scaling: the 1x128 activation and 128x128 weight scales change every 128-wide K step, so each step's
MMA starts from zero and its fp32 result is scaled into the accumulator (``acc += dot * s_a s_w``), the
reference's own formulation. (Keeping one accumulator in units of the current step's scale and rescaling it
before each MMA, ``acc = dot(a, b, acc * s_prev / s)``, saves that second register tile but measured 6-10%
slower on an H100 at 3 of 4 shapes of ``benchmarks/sweep_fp8_tma.py`` (2% faster at the fourth) and needs a
floor under tiny scales to keep its ratios finite; it was dropped.)

Promotion is what separates these kernels from ``torch._scaled_mm`` (H100, ``benchmarks/sweep_fp8_tma.py``,
``results/sweep-fp8-tma-pps-h100.json``): the same 256x128 kernel without it runs at 0.77-1.16x of
``_scaled_mm``, with it at 0.74-0.81x. Triton adds each 128-K step's partial product into the accumulator right
after the step's wgmmas, so ptxas makes the warp group wait for them (its C7517 note) and the tensor cores idle
through every add. Several programs per SM (``GemmConfig.programs_per_sm``) let one program's MMAs run through
another's adds: 64x128 tiles with three per SM reach 0.79-0.83x at M = 1024 (0.74-0.81x default), 128x128
tiles of four warps with two per SM 0.83-0.88x on four of seven shapes, but both lose at the largest shapes.
The dispatchers therefore prefer the warp-specialized Gluon kernel of
:mod:`mxrun.kernels.fp8_wgmma_gemm` on sm_90 (both scalings): its consumers' adds overlap each other's MMAs.
These kernels remain for other sm_90+ devices and as the reference point of the sweep.

Only for CUDA devices of compute capability 9.0 or newer with 16-byte aligned operands (K % 16 == 0); the
dispatchers fall back to the pointer kernels otherwise, and the CPU (interpreter) path uses those too.
"""

from __future__ import annotations

from functools import cache

import torch

from mxrun.kernels.backend import HAS_TRITON, cuda_major, tl, triton, triton_interpreting
from mxrun.kernels.scaled_gemm import (
    GemmConfig,
    GemmInputError,
    m_bucket,
    pick_config,
    store_tile,
    unit_stride,
)

TMA_MIN_M = 512
"""From this many rows the W8A8 dispatchers use this kernel where the Gluon kernel cannot run (sm_90+ devices
other than sm_90; on sm_90 :data:`~mxrun.kernels.fp8_wgmma_gemm.WGMMA_MIN_M` rows take the Gluon kernel)."""


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tma_usable(*tensors: torch.Tensor) -> bool:
    """TMA needs sm_90+, a real GPU launch (not the interpreter), K-contiguous rows and 16-byte alignment."""
    if not HAS_TRITON or triton_interpreting():
        return False
    first = tensors[0]
    if not first.is_cuda:
        return False
    if cuda_major(first.device) < 9:
        return False
    for t in tensors:
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


@triton.jit
def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a linear tile id, GROUP_M row tiles per column sweep (L2 reuse)."""
    group = GROUP_M * num_pid_n
    first_m = (tile_id // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group) % size_m
    pid_n = (tile_id % group) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M", "NUM_PROGRAMS"])
def _fp8_tma_gemm_kernel(
    a_desc,  # [M, K] float8e4nv, tiles [BLOCK_M, BLOCK_K]
    b_desc,  # [N, K] float8e4nv weight, tiles [BLOCK_N, BLOCK_K]
    a_scale_ptr,  # BLOCK_SCALED: fp32 [M, cdiv(K,128)] at m*stride_asm + g; else fp32 [M] (A_PER_ROW) or [1]
    b_scale_ptr,  # BLOCK_SCALED: fp32 [cdiv(N,128), cdiv(K,128)] at i*stride_bsn + g; else [N] or [1]
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_asm,
    stride_bsn,
    stride_cm,
    stride_cn,
    NUM_PROGRAMS,
    BLOCK_SCALED: tl.constexpr,
    A_PER_ROW: tl.constexpr,
    B_PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,
):
    """C = A B^T with per-tensor/per-row scales in the epilogue, or block scales applied to each K step's
    product (see the module docstring); bias and output cast in the epilogue."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if BLOCK_SCALED:
            # One weight block per tile (BLOCK_N == 128): a scalar per K step; one activation scale per row.
            a_scale_ptrs = a_scale_ptr + (offs_m % M).to(tl.int64) * stride_asm
            b_scale_row = b_scale_ptr + pid_n * stride_bsn
            for kb in range(k_steps):
                a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
                s = tl.load(a_scale_ptrs + kb) * tl.load(b_scale_row + kb)
                acc += tl.dot(a, b.T, max_num_imprecise_acc=MAX_IMPRECISE_ACC) * s[:, None]
        else:
            for kb in range(k_steps):
                a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            if A_PER_ROW:
                a_scale = tl.load(a_scale_ptr + offs_m % M)
            else:
                a_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(a_scale_ptr)
            if B_PER_ROW:
                b_scale = tl.load(b_scale_ptr + offs_n % N)
            else:
                b_scale = tl.zeros([BLOCK_N], dtype=tl.float32) + tl.load(b_scale_ptr)
            acc = acc * a_scale[:, None] * b_scale[None, :]
        store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


def fp8_operand_shapes(fn: str, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    """(M, N, K) of E4M3 operands A ``[M, K]`` and B ``[N, K]``; else an error naming ``fn`` and the problem."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise GemmInputError(f"{fn}: need A [M, K] and B [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise GemmInputError(f"{fn}: A and B must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    return a.shape[0], b.shape[0], a.shape[1]


def check_block_scales(fn: str, a_scale: torch.Tensor, b_scale: torch.Tensor, m: int, n: int, k: int) -> None:
    """1x128 activation scales ``[M, ceil(K/128)]`` and 128x128 weight scales ``[ceil(N/128), ceil(K/128)]``;
    else an error naming ``fn`` and the shapes it got."""
    groups = triton.cdiv(k, 128)
    if a_scale.shape != (m, groups) or b_scale.shape != (triton.cdiv(n, 128), groups):
        raise GemmInputError(
            f"{fn}: block scales must be [M, ceil(K/128)] and [ceil(N/128), ceil(K/128)], got "
            f"{tuple(a_scale.shape)} and {tuple(b_scale.shape)}"
        )


def _descriptor(t: torch.Tensor, rows: int, cols: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [rows, cols])


def _wave_cost(m: int, n: int, cfg: GemmConfig, sms: int, efficiency: float) -> float:
    """Time model of a tile choice: full waves of tiles over the SMs, times a tile's area over its speed."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    return triton.cdiv(tiles, sms) * cfg.block_m * cfg.block_n / efficiency


def tma_candidates(m: int, n: int, block_scaled: bool, sms: int) -> list[GemmConfig]:
    """Tiles for an H100/H200, best guess first (benchmarks/sweep_fp8_tma.py, results in
    benchmarks/results/sweep-fp8-tma-h200.json). Per-channel: 256x128 tiles with 8 warps are the fastest per
    tile, 128x128 ones ~13% slower per element, and which wins is decided by the last, partly filled wave
    (M = 512, N = 6144: 96 big tiles, one wave, beat 192 small ones; N = 10240: 160 big tiles, two waves, lost
    to 320 small ones). Block scaling holds a second fp32 tile (each step's product), so it keeps 128x128."""
    if block_scaled:
        return [
            GemmConfig(128, 128, 128, 8, 8, 4),
            GemmConfig(256, 128, 128, 8, 8, 3),
            GemmConfig(64, 128, 128, 8, 4, 5),
        ]
    big, small = GemmConfig(256, 128, 128, 8, 8, 3), GemmConfig(128, 128, 128, 8, 8, 4)
    if _wave_cost(m, n, small, sms, 0.87) < _wave_cost(m, n, big, sms, 1.0):
        return [small, big]
    return [big, small]


def fp8_tma_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    block_scaled: bool,
    config: GemmConfig | None = None,
    persistent: bool = True,
) -> torch.Tensor:
    """Launch the TMA kernel (one program per SM, or with ``persistent=False`` one per tile). Callers check
    :func:`tma_usable` first (the dispatchers do); scales as in
    :func:`~mxrun.kernels.scaled_gemm.fp8_gemm_triton` / ``fp8_block_gemm_triton``."""
    fn = "fp8_tma_gemm"
    a_scale, b_scale, bias = unit_stride(a_scale), unit_stride(b_scale), unit_stride(bias)
    m, n, k = fp8_operand_shapes(fn, a, b)
    if block_scaled:
        check_block_scales(fn, a_scale, b_scale, m, n, k)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    sms = _sm_count(a.device.index if a.device.index is not None else torch.cuda.current_device())

    def launch(cfg: GemmConfig) -> None:
        if block_scaled and (cfg.block_n != 128 or cfg.block_k != 128):
            raise ValueError(f"block-scaled TMA GEMM needs 128-wide N and K tiles, got {cfg}")
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        programs = min(tiles, sms * cfg.programs_per_sm) if persistent else tiles
        _fp8_tma_gemm_kernel[(programs,)](
            _descriptor(a, cfg.block_m, cfg.block_k),
            _descriptor(b, cfg.block_n, cfg.block_k),
            a_scale,
            b_scale,
            bias if bias is not None else b_scale,
            c,
            m,
            n,
            k,
            a_scale.stride(0) if block_scaled else 0,
            b_scale.stride(0) if block_scaled else 0,
            c.stride(0),
            c.stride(1),
            programs,
            BLOCK_SCALED=block_scaled,
            A_PER_ROW=(not block_scaled) and a_scale.numel() > 1,
            B_PER_ROW=(not block_scaled) and b_scale.numel() > 1,
            HAS_BIAS=bias is not None,
            **cfg.launch_kwargs(),
        )

    if config is None:
        key = ("fp8_tma_gemm", block_scaled, m_bucket(m), n, k, out_dtype)
        config = pick_config(key, tma_candidates(m, n, block_scaled, sms), launch, True)
    launch(config)
    return c


__all__ = [
    "TMA_MIN_M",
    "check_block_scales",
    "fp8_operand_shapes",
    "fp8_tma_gemm",
    "tma_candidates",
    "tma_usable",
]
