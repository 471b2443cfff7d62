"""MXFP8 weights re-expressed at one power-of-two scale per 128x128 tile, for Hopper's FP8 tensor cores.

Why. Hopper has no MX MMA. An FP8 MMA chain can only run over a stretch of K where both operands' scales are
constant; MXFP8 changes them every 32 elements, so a kernel that keeps the MXFP8 scales must leave the tensor
cores and rescale its accumulator every 32 K (``mxfp8_fp8_gemm_triton``, measured at a fraction of bf16 cuBLAS).
The block-scaled FP8 GEMMs (:mod:`mxrun.kernels.fp8_tma_gemm`, :mod:`mxrun.kernels.scaled_gemm`) rescale every
128 K, on 128x128 weight tiles and 1x128 activation groups. So the MXFP8 W8A8 Linear on Hopper feeds them:

* the weight, kept in MXFP8 (the recipe's format, what is exported), re-expressed per call by
  :func:`regroup_mxfp8`: each 128x128 tile takes the largest E8M0 code ``T`` of its 128 rows x 4 blocks, and
  each element ``v`` (an E4M3 value of a block with code ``c``) becomes ``E4M3(v * 2^(c - T))``, RNE;
* the activations quantized with the MX scale rule over 1x128 groups
  (:func:`~mxrun.kernels.mxfp8_quantize.quantize_mx_group128`).

Numerics. Multiplying an E4M3 value by ``2^-(T - c)`` only moves its exponent, so it stays exact while the
result is an E4M3 normal (``>= 2^-6``); only elements below ``2^-6 * 2^(T-127)`` at the tile's scale fall
onto the subnormal grid and round (RNE). The change to any element is at most half a subnormal step,
``2^-10 * 2^(T-127)``: with the round-up rule the tile's largest block has its amax above ``224 * 2^(T-127)``,
so that is below ``2^-17.8`` of the tile's largest magnitude, far under the E4M3 rounding of the elements that
carry the sum (``2^-4`` relative). The activation side obeys the same bound per 1x128 group. NaN blocks (code
0xFF) do not take part in ``T`` and their elements become NaN, so a NaN spreads exactly as in MXFP8.

Cost: one read and one write of the weight's bytes per call (a bandwidth-bound kernel), which the 2x rate of
FP8 over bf16 MMAs pays for at large M (``ALIGNED_MIN_M`` in :mod:`mxrun.kernels.mxfp8_gemm`, measured there).
A recipe that sets ``tile_aligned: true`` stores the weight in this form once (:func:`align_mxfp8`: still
MXFP8, every block of a tile carrying the tile's code) and the GEMMs take it as stored, with its tile scales
from :func:`aligned_tile_scales`. On sm_100 the native MX MMA reads MXFP8 as it is and this step goes away.

Launch: one program per 128x128 tile, 8 warps, 0.83-0.85 of a device copy's speed on the H100 at 70B and
Mixtral-expert sizes, 0.70 on 8B qkv (6144x4096). Measured and left out (commit ee882d6, its
``benchmarks/sweep_mx_regroup.py``, ``benchmarks/results/sweep-mx-regroup-h100.json``): persistent programs
that walk the tiles with the next ones' loads in flight (1-4 programs per SM, 2-3 stages, 4-8 warps), slower
everywhere (0.37-0.82 of the copy; 70B gate_up 373 us per tile against 384-755).
"""

from __future__ import annotations

import torch

from mxrun.kernels.backend import Backend, resolve_backend, tl, triton
from mxrun.kernels.e4m3 import e4m3_code, encode_e4m3_reference
from mxrun.kernels.fp8_quantize import FP8_BLOCK, Fp8Quantized
from mxrun.kernels.mxfp8_quantize import (
    E8M0_NAN_CODE,
    MX_BLOCK_SIZE,
    Mxfp8Quantized,
    e8m0_to_float32,
    resolve_cast,
)
from mxrun.kernels.row_layout import QuantizeInputError, ceil_div

_BLOCKS_PER_TILE = FP8_BLOCK // MX_BLOCK_SIZE  # E8M0 codes per tile row
_REGROUP_WARPS = 8


def _check(data: torch.Tensor, scale_e8m0: torch.Tensor, fn: str) -> tuple[int, int]:
    """(N, K) of an MXFP8 ``[..., N, K]`` weight with its ``[..., N, K/32]`` codes, or a named error."""
    if data.dim() not in (2, 3) or data.dtype != torch.float8_e4m3fn:
        raise QuantizeInputError(
            f"{fn}: MXFP8 data must be a float8_e4m3fn [N, K] matrix or [E, N, K] stack, got "
            f"{data.dtype} {tuple(data.shape)}"
        )
    n, k = data.shape[-2:]
    if k % MX_BLOCK_SIZE or scale_e8m0.shape != (*data.shape[:-1], k // MX_BLOCK_SIZE):
        raise QuantizeInputError(
            f"{fn}: data {tuple(data.shape)} needs K % 32 == 0 and E8M0 scales "
            f"{(*data.shape[:-1], k // MX_BLOCK_SIZE)}, got {tuple(scale_e8m0.shape)}"
        )
    if scale_e8m0.element_size() != 1:
        raise QuantizeInputError(f"{fn}: scales must be uint8 / float8_e8m0fnu codes, got {scale_e8m0.dtype}")
    return n, k


def _power_of_two(shift: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^-shift`` for int32 ``shift >= 0``, built from bits; 0 below fp32's normal range (an E4M3
    value times such a factor rounds to zero anyway)."""
    factor = ((127 - shift.clamp(max=126)) << 23).view(torch.float32)
    return torch.where(shift > 126, torch.zeros_like(factor), factor)


def per_block_codes(tile_codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Tile codes ``[..., ceil(N/128), ceil(K/128)]`` spread to one per MXFP8 block ``[..., N, K/32]``."""
    rows = tile_codes.repeat_interleave(FP8_BLOCK, dim=-2)[..., :n, :]
    return rows.repeat_interleave(_BLOCKS_PER_TILE, dim=-1)[..., : k // MX_BLOCK_SIZE].contiguous()


def tile_codes_reference(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., ceil(N/128), ceil(K/128)]``: each 128x128 tile's largest E8M0 code (NaN blocks left out;
    a partial edge tile takes what it has) from MXFP8 codes ``[..., N, K/32]``."""
    codes = scale_e8m0.view(torch.uint8).to(torch.int32)
    n, groups = codes.shape[-2:]
    padded = torch.nn.functional.pad(codes, (0, -groups % _BLOCKS_PER_TILE, 0, -n % FP8_BLOCK))
    padded = torch.where(padded == E8M0_NAN_CODE, torch.zeros_like(padded), padded)
    tiles = padded.reshape(*codes.shape[:-2], padded.shape[-2] // FP8_BLOCK, FP8_BLOCK, -1, _BLOCKS_PER_TILE)
    return tiles.amax(dim=(-3, -1))


def reencode_reference(
    data: torch.Tensor, scale_e8m0: torch.Tensor, target_codes: torch.Tensor
) -> torch.Tensor:
    """E4M3 ``data`` of MXFP8 blocks with codes ``scale_e8m0`` re-encoded at the (not smaller) codes
    ``target_codes`` (same shape as the codes, any integer dtype): ``E4M3(v * 2^(code - target))``, RNE; NaN
    blocks become NaN. Any slice of whole blocks can go alone: nothing here crosses a block."""
    codes = scale_e8m0.view(torch.uint8).to(torch.int32)
    groups = data.shape[-1] // MX_BLOCK_SIZE
    factor = _power_of_two((target_codes.to(torch.int32) - codes).clamp(min=0))
    values = data.float().reshape(*data.shape[:-1], groups, MX_BLOCK_SIZE) * factor.unsqueeze(-1)
    is_nan = (codes == E8M0_NAN_CODE).unsqueeze(-1)
    values = torch.where(is_nan, torch.full_like(values, float("nan")), values)
    return encode_e4m3_reference(values).reshape(data.shape).contiguous()


def regroup_mxfp8_reference(data: torch.Tensor, scale_e8m0: torch.Tensor) -> Fp8Quantized:
    """Plain-torch :func:`regroup_mxfp8`; the definition the kernel is tested against."""
    n, k = _check(data, scale_e8m0, "regroup_mxfp8_reference")
    tile_code = tile_codes_reference(scale_e8m0)
    regrouped = reencode_reference(data, scale_e8m0, per_block_codes(tile_code, n, k))
    return Fp8Quantized(regrouped, e8m0_to_float32(tile_code.to(torch.uint8)))


@triton.jit
def _regroup_kernel(
    q_ptr,  # [B, N, K] float8e4nv, (b, n, k) at b*stride_qb + n*stride_qn + k
    s_ptr,  # [B, N, K/32] uint8 E8M0, (b, n, g) at b*stride_sb + n*stride_sn + g
    out_q_ptr,  # [B, N, K] uint8 E4M3 codes, contiguous
    out_s_ptr,  # [B, cdiv(N, 128), cdiv(K, 128)] fp32, contiguous
    N,
    K,
    stride_qb,
    stride_qn,
    stride_sb,
    stride_sn,
    SOFT_CAST: tl.constexpr,
    BLOCK_N: tl.constexpr,  # 128
    BLOCK_K: tl.constexpr,  # 128
):
    """One program per 128x128 tile: the tile's largest finite E8M0 code, then every element re-encoded at
    that scale."""
    G: tl.constexpr = BLOCK_K // 32
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    groups = pid_k * G + tl.arange(0, G)
    row_ok = rows < N
    codes = tl.load(
        s_ptr + pid_b * stride_sb + rows.to(tl.int64)[:, None] * stride_sn + groups[None, :],
        mask=row_ok[:, None] & (groups < K // 32)[None, :],
        other=0,
    ).to(tl.int32)
    tile_code = tl.max(tl.max(tl.where(codes == 255, 0, codes), axis=1), axis=0)
    shift = tl.maximum(tile_code - codes, 0)
    factor = tl.where(shift > 126, 0.0, ((127 - tl.minimum(shift, 126)) << 23).to(tl.float32, bitcast=True))

    mask = row_ok[:, None] & (cols < K)[None, :]
    values = tl.load(
        q_ptr + pid_b * stride_qb + rows.to(tl.int64)[:, None] * stride_qn + cols[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    values = tl.reshape(values, [BLOCK_N, G, 32]) * factor[:, :, None]
    values = tl.where((codes == 255)[:, :, None], float("nan"), values)
    q = tl.reshape(e4m3_code(values, SOFT_CAST), [BLOCK_N, BLOCK_K])
    tl.store(out_q_ptr + pid_b * N * K + rows.to(tl.int64)[:, None] * K + cols[None, :], q, mask=mask)

    scale = tl.where(tile_code == 0, 0x00400000, tile_code << 23).to(tl.float32, bitcast=True)
    n_tiles, k_tiles = tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)
    tl.store(out_s_ptr + (pid_b * n_tiles + pid_n) * k_tiles + pid_k, scale)


def regroup_mxfp8_triton(data: torch.Tensor, scale_e8m0: torch.Tensor) -> Fp8Quantized:
    """Triton :func:`regroup_mxfp8`: the reference's bytes and scales, no host sync."""
    fn = "regroup_mxfp8_triton"
    n, k = _check(data, scale_e8m0, fn)
    codes = scale_e8m0.view(torch.uint8)
    if data.numel() and (data.stride(-1) != 1 or codes.stride(-1) != 1):
        raise QuantizeInputError(f"{fn}: data and scales must be contiguous along K")
    batches = data.shape[0] if data.dim() == 3 else 1
    out = torch.empty(data.shape, dtype=torch.uint8, device=data.device)
    scale = torch.empty(
        (*data.shape[:-2], ceil_div(n, FP8_BLOCK), ceil_div(k, FP8_BLOCK)),
        dtype=torch.float32,
        device=data.device,
    )
    if data.numel():
        _regroup_kernel[(ceil_div(k, FP8_BLOCK), ceil_div(n, FP8_BLOCK), batches)](
            data,
            codes,
            out,
            scale,
            n,
            k,
            data.stride(0) if data.dim() == 3 else 0,
            data.stride(-2),
            codes.stride(0) if codes.dim() == 3 else 0,
            codes.stride(-2),
            SOFT_CAST=resolve_cast("auto"),
            BLOCK_N=FP8_BLOCK,
            BLOCK_K=FP8_BLOCK,
            num_warps=_REGROUP_WARPS,
        )
    return Fp8Quantized(out.view(torch.float8_e4m3fn), scale)


def regroup_mxfp8(
    data: torch.Tensor, scale_e8m0: torch.Tensor, backend: Backend | str = Backend.AUTO
) -> Fp8Quantized:
    """An MXFP8 weight ``[N, K]`` (or stack ``[E, N, K]``) as FP8 128x128 blocks with power-of-two fp32 scales
    ``[..., ceil(N/128), ceil(K/128)]`` (the layout of
    :data:`~mxrun.kernels.fp8_quantize.Fp8Granularity.BLOCK_128X128`); see the module docstring for the
    numerics. Triton on CUDA, torch elsewhere (same bytes)."""
    if resolve_backend(backend, data) is Backend.TRITON:
        return regroup_mxfp8_triton(data, scale_e8m0)
    return regroup_mxfp8_reference(data, scale_e8m0)


def align_mxfp8(
    data: torch.Tensor, scale_e8m0: torch.Tensor, backend: Backend | str = Backend.AUTO
) -> Mxfp8Quantized:
    """The same weight as MXFP8 whose blocks all carry their 128x128 tile's largest E8M0 code: the values of
    :func:`regroup_mxfp8` (so the module docstring's bound holds), in the MXFP8 layout (uint8 codes
    ``[..., N, K/32]``). What a recipe's ``tile_aligned: true`` stores: still MXFP8 to every reader, and
    :func:`aligned_tile_scales` gives the block-scaled GEMMs its scales without a pass over the weight."""
    n, k = _check(data, scale_e8m0, "align_mxfp8")
    regrouped = regroup_mxfp8(data, scale_e8m0, backend)
    tile_codes = (regrouped.scale.view(torch.int32) >> 23).to(torch.uint8)  # 2^-127 (0x00400000) is code 0
    return Mxfp8Quantized(regrouped.data, per_block_codes(tile_codes, n, k))


def aligned_tile_scales(scale_e8m0: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """fp32 ``[..., ceil(N/128), ceil(K/128)]`` scales of a tile-aligned MXFP8 weight (:func:`align_mxfp8`),
    read off its E8M0 codes; a weight that is not tile-aligned is a clear error (this check reads the codes
    back, a host sync: call it once per loaded weight, not per forward)."""
    codes = scale_e8m0.view(torch.uint8)
    if codes.shape[-2:] != (n, k // MX_BLOCK_SIZE):
        raise QuantizeInputError(
            f"aligned_tile_scales: codes {tuple(codes.shape)} are not [.., {n}, {k // 32}]"
        )
    tile_codes = codes[..., ::FP8_BLOCK, ::_BLOCKS_PER_TILE]
    if not torch.equal(per_block_codes(tile_codes, n, k), codes):
        raise QuantizeInputError(
            "aligned_tile_scales: the MXFP8 scales are not tile-aligned (each 128x128 tile must carry one E8M0 "
            "code); was the weight quantized with `tile_aligned: true`?"
        )
    return e8m0_to_float32(tile_codes.contiguous())


__all__ = [
    "align_mxfp8",
    "aligned_tile_scales",
    "per_block_codes",
    "reencode_reference",
    "regroup_mxfp8",
    "regroup_mxfp8_reference",
    "regroup_mxfp8_triton",
    "tile_codes_reference",
]
