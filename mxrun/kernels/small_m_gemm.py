"""Split-K GEMM for small M (decode), where a quantized Linear does almost no math and must stream its FP8
weight at the memory's speed.

With M <= :data:`SMALL_M_MAX` rows, a tile-per-output-block GEMM launches only ``N / BLOCK_N`` programs, each
walking the whole K: too few loads in flight to saturate HBM (measured: the W8A16 kernels ran at bf16's speed,
half of what their bytes allow). Here the K range is split too, so ``N / BLOCK_N x SPLIT_K`` programs (about
four per SM) each stream one slab of the weight, widen it in registers and run a bf16/fp16 MMA with fp32
accumulation. One launch does everything: with one split a program finishes its outputs itself; with more, each
writes fp32 partial sums to ``[SPLIT_K, M, N]`` and counts itself in on a per-column-block counter, and the last
to arrive adds the splits in split order (deterministic, whoever is last), applies the scales that factor out of
K (per-tensor / per-channel weight scales, per-token / per-tensor activation scales), adds the bias and casts.
That is for tiles of up to :data:`FUSED_SUM_MAX_BLOCK_M` rows; taller ones leave the sum to a second kernel
spread over the whole output. Launched as a programmatic dependent launch after the activations' pass, it first
measured no gain beyond noise on the H100; with the pass triggering its dependents as it starts, it pays where the
pass is short (:data:`PDL_AFTER_PASS`). Measured and left out: prefetching its first weight lines into L2 while it
waits (slower: the prefetches delay the quantize kernel's reads, which are on the critical path). Nor
did quantizing per-token activations inside this launch (prototype at commit 2b41991: programs take tickets as
they start, the first ones quantize pieces of the rows, every program waits on a counter before its loop, with
or without an L2 prefetch of its first weight steps while it waits): the same bits, but x1.05-1.10 the time of
the quantize launch and this one, slower in all 14 cases warm and cold (H100, seven Llama shapes at M = 1 and
16, ``results/small-m-fused-token-quant-{warm,cold}-h100.log``): the programs cannot stream their weight before
the codes exist, so the quantize stays on the critical path, now with the counters' waits added; loading the
first weight step into registers before the wait was slower still (``...-first-step-{warm,cold}-h100.log``).
One long row is quantized here after all, with no waiting: every program reads the whole row for its amax and
encodes its own slices (:data:`QUANTIZE_ONE_ROW_IN_LOOP`).

The split sum's price (``benchmarks/small_m_overhead.py``, ``results/small-m-overhead-h100.log``: the launch with
its partials stored and never added, timing only): 1.2-1.6 us at M = 1 on the Llama layers, warm and cold, of
8B ``o``'s 9.6 us cold; the last program waits for its partials' store, the release fence, the arrival atomic
and the partials' loads, each an L2 round trip. The same weight bytes read by 528-1056 programs that only stream
them take 7.1-7.5 us there. Loading the epilogue's scales and bias before that chain instead of after it (in
every program) did not pay: same bits, x1.001 the time warm and x0.997 cold over FP8 per-token, per-tensor and
weight-only at M = 1 and 16 (switch ``SPLIT_K_FACTORS_AHEAD`` at commit 9c55437,
``results/split-k-factors-ahead-h100.log``). A sum that skips the trips through L2 (the splits of a column block
as one thread-block cluster adding through distributed shared memory) is the next step; Triton 3.6 exposes no
distributed shared memory.

Operands it takes (every product below is exact in fp32, so only the fp32 summation order differs from the
references in :mod:`mxrun.kernels.scaled_gemm` / :mod:`mxrun.kernels.mxfp8_gemm`):

* weights: E4M3 ``[N, K]`` with an fp32 per-tensor / per-channel scale (applied at the end), or with MXFP8 E8M0
  scales ``[N, K/32]`` (decoded in registers: E4M3 times its power of two, exact, in bf16/fp16);
* activations: bf16/fp16 as they are (weight-only; fp16 activations and E4M3 weights meet in an fp16 MMA, which
  holds every E4M3 value exactly), E4M3 codes with per-token / per-tensor fp32 scales (W8A8 FP8, quantized
  beforehand: the per-token amax needs the whole row), or bf16/fp16 rounded once to their MXFP8 values
  (W8A8 MXFP8, :func:`~mxrun.kernels.mxfp8_quantize.mx_round_triton`: one pass, values exact in bf16; one row
  is rounded inside the loop instead, :data:`ROUND_ONE_ROW_IN_LOOP`), then as weight-only.

E4M3 codes meet the weight's in an fp16 MMA (Triton widens E4M3 to fp16 with one hardware conversion per pair;
to bf16 it takes a second conversion per element): no widened copy of the activations, and the fastest path
measured here. H100 (``bench_linear.py --graph --ms 1 16 64``, ``results/linear-h100-small-m.md``): the FP8
W8A8 Linear at M = 1-16 went from 0.61-1.82x to 1.01-1.99x of bf16 cuBLAS (per-token) and from 0.46-1.78x to
0.75-1.88x (per-tensor) with this, the single launch and the tiles below. bf16 activations and E4M3 weights
meet in a bf16 MMA, the weight widened by :func:`~mxrun.kernels.e4m3.e4m3_to_bf16`. An MXFP8 weight takes the
same widening with its power of two folded into the widening's one bf16x2 multiply
(:func:`~mxrun.kernels.e4m3.e4m3_to_bf16_times`) when the weight allows it (``mx_scale_fold``: scale codes up
to 2^15 and no NaN element, which the caller checks once per loaded weight), else a decode through fp32. Both
give the same bits (tested); the fold saves the fp32 round trip: 232 of 1848 instructions of the default tile,
and the fp32 path's register spills (ptxas, sm_90). H100, same run (``bench_linear.py --graph --rep-ms 20 --ms
1 16 --columns mxfp8 mxfp8:unfolded mxfp8-wo mxfp8-wo:unfolded``, ``results/linear-h100-mx-fold.md``): MXFP8
W8A8 at M = 1 and 16 0.73-1.75x of bf16 folded against 0.72-1.72x (13 of 14 cases faster, by up to 4%). With
fp16 activations the weight becomes fp16 by the one conversion and an fp16x2 multiply by its power of two
(:func:`~mxrun.kernels.e4m3.e4m3_to_f16_times`, ``mx_scale_fold16``: codes 113-134), instead of the fp32
decode: same bits, 3-15% less time on the seven Llama shapes at M = 1 and 16
(``benchmarks/small_m_mx_fp16.py``, ``results/small-m-mx-fp16-h100.log``). Other MX decodes for bf16 measured
slower (same-run sweeps of five decode shapes at M = 1 and 16): the integer widening followed by a separate
bf16 scale multiply, fp16 -> fp32 by integer ops instead of the conversion (1.08-1.42x of bf16 against
1.38-1.66x), and one MMA per 32-wide group with the product scaled instead of the weight (1.06-1.41x against
1.36-1.71x). The decode loop is bound by instructions issued, not by the conversion unit. Two MXFP8 W8A8
variants that keep E4M3-coded activations were measured and dropped: fp16 MMAs per 32-wide group with each
partial product scaled (0.9-1.4x of bf16, against 1.4-1.7x rounding first), and one MMA per 128-wide step with
the blocks re-expressed at the step's largest exponent in fp16 (slower still: the per-element shifts and
per-step exponent handling cost more than the bf16 conversion they avoid). Also measured and left out: rounding
the activations to MXFP8 inside this kernel as each tile is loaded, instead of the separate pass (same bits,
tested; commit 8391da1): every column block's programs then round the same activation slab again, and the
instruction-bound loop got slower in all 14 cases (H100, at that commit ``bench_linear.py --graph --rep-ms 20
--ms 1 16 --columns mxfp8 mxfp8:round-pass mxfp8-wo``, ``results/linear-h100-fused-mx-round.md``: 8B qkv at
M = 1 18.0 against 14.2 us with the pass, 70B gate_up 238.6 against 193.9; weight-only 12.5 and 191.8). One
row is the exception: rounded in a 1-D layout (a value or two per thread) and placed as row 0 of the MMA's tile,
it costs the loop little and saves the pass's launch, so a one-row call takes it where its programs fit one wave
and walk few K steps (:data:`ROUND_ONE_ROW_IN_LOOP`). Nor was MXFP8 activation codes met with the weight in an
fp16 MMA, both relative to a per-row reference scale (exact within 14 binades of it; one conversion and one
multiply per weight pair): 1.00-1.06x the folded path's time
(``results/sweep-small-m-relative-h100.json``; see docs/linear-history.md). Nor was computing the product
transposed, the weight tile on Hopper's ``wgmma`` 64-row side and the activations on its 16-wide side (prototype
at commit e75d084, ``results/swap-ab-small-m-h100.log``): E4M3 codes then reach the tensor cores from shared
memory with no widening (``m64n16k32``), but with its best tile the GEMM took 0.93-1.04x this one's time
(geometric mean 1.00; the best of four tiles per case 0.93-0.99x), and Hopper's narrow FP8 accumulator over a
whole slab lost precision (relative error 1-3e-3 against at most 1e-4; promoting every step: 0.96-1.07x, still
7-9e-4); MXFP8 codes with one ``wgmma`` per 32-wide group and its product scaled took 1.22-1.82x the folded
decode's time (each group's result is waited for before it is scaled), and the folded MX decode feeding a bf16
``wgmma`` 0.99-1.16x. Nor did reading the E8M0 scales as the 32-bit words that hold them, which Triton then
pipelines with ``cp.async`` instead of waiting inside each step for the byte load and moving its result between
layouts (117 -> 90 registers, same bits): slower in 12 of 14 cases (8B qkv at M = 1 12.6 -> 15.3 us; only 8B
down faster, 27.4 -> 26.1), ``results/mx-scale-words-h100.log``. What took the wait out instead: the byte loads
issued a step ahead (:data:`MX_CODES_AHEAD`, x0.96 the time). Reading them by TMA instead, one box per
(column block, K step) of a regrouped copy of the codes, beside the weight tile's box (prototype at commit
c235ff3: no wait inside the step, no layout change through shared memory, 92 registers): the same bits, 2-5%
faster on 12 of the 14 decode cases but 12% slower on 70B ``gate_up`` (its 896 programs run in two waves),
x0.995 warm and x0.982 cold over all (``results/small-m-mx-codes-tma-h100.log``); not kept, as the copy costs
1/32 of the weight's bytes again.

128x128 block weights (FP8 blocks, and MXFP8 stored tile-aligned with its power-of-two tile scales) run here too:
a program's columns lie in one block row and each 128-wide part of a K step in one block, so each part's product
(a fresh MMA) is added into the accumulator times its block's scale, and, beside E4M3 activation codes, each
row's 1x128 group scale; at most 64 rows, that multiply is cheap beside the widening. H100, the seven Llama
shapes, interleaved in one run against the tile kernels they took before (``benchmarks/sweep_linear_setting.py
--setting scaled.BLOCK_SPLIT_K_MAX_M --values 0 32 --ms 1 16 32 --columns scaled_mm fp8-block fp8-block-wo
--repeats 1``, ``results/block-split-k-h100.log``): x0.67 the time, faster in 38 of 42 (FP8 block W8A8 at M = 1
0.71-0.79x -> 1.02-2.02x of ``_scaled_mm``; the four slower are ``gate_up`` layers at 16-32 rows, by 2-14%).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mxrun.kernels.backend import Backend, device_name, gdc_wait, pdl_usable, tl, triton, triton_interpreting
from mxrun.kernels.box_major import BoxMajorWeight, box_first_row
from mxrun.kernels.e4m3 import e4m3_code, e4m3_to_bf16, fast_widen_usable, widen_to_fp32
from mxrun.kernels.fp8_quantize import (
    ROW_CHUNKS_MIN_COLS,
    Fp8Granularity,
    quantize_fp8,
    quantize_fp8_triton,
    row_amax_bits,
    row_chunks_apply,
    scale_from_amax_bits,
)
from mxrun.kernels.fp8_tma_gemm import tma_usable
from mxrun.kernels.mxfp8_gemm import mx_decode_weight
from mxrun.kernels.mxfp8_quantize import (
    MX_BLOCK_SIZE,
    E4m3Cast,
    MxScaleRule,
    mx_round_rows,
    mx_round_triton,
    resolve_cast,
)
from mxrun.kernels.scale_division import divide_by_scale, scale_division_setup
from mxrun.kernels.scaled_gemm import GemmInputError
from mxrun.kernels.workspace import zeroed_int32

SMALL_M_MAX = 64
"""Up to this many rows the split-K kernel takes any M; the Linear dispatchers send it up to 32 rows where the
mid-M kernel (:mod:`mxrun.kernels.mid_m_gemm`) can run and FP8 W8A8 up to
:data:`~mxrun.kernels.scaled_gemm.W8A8_SPLIT_K_MAX_M`. One program holds all rows (16, 32 or 64: the MMA needs at
least 16), so a new M compiles at most three variants."""


FUSED_SUM_MAX_BLOCK_M = 16
"""Up to this tile height the last split to arrive adds the partials (one launch); taller tiles leave that to
a second kernel, spread over the whole output (H100: at M = 64 the in-kernel sum cost 2-5 us on 4096-wide
layers, more than the launch it saves)."""


def block_m_for(m: int) -> int:
    """Rows one program holds: the next power of two of ``m``, at least 16."""
    return max(16, 1 << max(0, (m - 1).bit_length()))


class SplitKConfig(NamedTuple):
    """Tile and split policy: ``target_programs`` is how many (column block x K split) programs to aim for;
    ``max_registers`` caps ptxas's registers per thread (more programs fit on an SM; None: no cap)."""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 4 * 132  # about four programs per SM of an H100/H200
    max_registers: int | None = None


# Per operand kind, the tile with the best geometric-mean speedup over bf16 on five decode shapes at M = 1 and
# 16 (H100, benchmarks/sweep_small_m.py, results/sweep-small-m-h100.json; measured while the kernel was still
# launched as a programmatic dependent launch, which changed nothing beyond noise): the fp16 MMA (E4M3 codes,
# or fp16 activations) streams fastest with 256-wide K steps; the bf16 MMA with narrower column blocks and more
# programs (geometric mean 1.78x against 1.62x of bf16 with the default tile; after the integer widening,
# results/sweep-small-m-h100-widen.json, 1.82x with 10 of 10 cases at 1.7x, against 1.88x with 9 for 64x256
# tiles); decoding MX weights needs the registers the default leaves it.
DEFAULT_CONFIG = SplitKConfig()
FP16_MMA_CONFIG = SplitKConfig(block_k=256, max_registers=80)
BF16_MMA_CONFIG = SplitKConfig(block_n=32, target_programs=8 * 132, max_registers=80)
BLOCK_FP16_MMA_STEP = 128
"""K step of 128x128 weight blocks meeting an fp16 MMA (E4M3 activation codes, fp16 activations; the tile of
:data:`FP16_MMA_CONFIG` otherwise): each step runs one MMA per 128-wide block it covers, each product scaled
by its block's scales. 256 (two blocks a step, as the codes kernel's 64x256 tile) took x0.999 the time of 128
on the seven Llama shapes at M = 1 and 16, FP8 block W8A8 (H100, ``benchmarks/sweep_linear_setting.py
--setting small.BLOCK_FP16_MMA_STEP --values 128 256 --ms 1 16 --columns scaled_mm fp8-block --repeats 1``,
``results/block-split-k-step-h100.log``)."""


NARROW_N = 4096
NARROW_TARGET_PROGRAMS = 264
"""E4M3 activation codes against per-tensor / per-channel weights of at most :data:`NARROW_N` output columns
aim for this many programs, two per SM, instead of :data:`FP16_MMA_CONFIG`'s four: half the K splits, each
twice as long. H100, interleaved (``benchmarks/sweep_linear_setting.py --setting small.NARROW_TARGET_PROGRAMS
--values 528 264 --shapes "8B qkv 4096->6144" "8B o 4096->4096" "8B down 14336->4096" --ms 1 16 --columns
scaled_mm fp8-channel fp8-tensor fp8-block mxfp8-tiles --repeats 2``, ``results/small-m-narrow-target-h100.log``;
the second repeat, the first being slower for every value-independent reason of a first pass): per-token and
per-tensor W8A8 on 8B ``o`` 1-2% faster at M = 1 and 6-7% at 16, on 8B ``down`` 0-3%; 8B ``qkv`` (6144 columns,
unchanged) within 3%. 128x128 blocks gained on 8B ``o`` but lost 4-5% on 8B ``down``; they keep four per SM."""


WEIGHT_TMA = True
"""By default the weight tiles of MX weights and of the fp16 MMA (E4M3 activation codes, fp16 activations) come
by TMA (a tensor descriptor; one bulk copy per tile, out-of-bounds rows and columns filled with zeros by the
hardware) instead of per-thread ``cp.async`` pointer loads, on sm_90+ where the weight allows it; FP8 weights
meeting bf16 activations keep the pointer loads. H100, GEMM alone, default tiles, the seven Llama shapes at M = 1
and 16 (``benchmarks/small_m_tma.py``, ``results/small-m-tma-h100.log``, warm L2 and cold weights alike): the
folded MX decode faster in 11 of 14 cases by up to 10% (8B ``qkv`` at M = 16 13.2 -> 11.9 us, 70B ``gate_up``
192.1 -> 188.6; 106 registers instead of 117, the address arithmetic gone), at most 1% slower in the others (8B
``qkv`` and ``o`` at M = 1); the codes kernel 1-3% faster in 10 of 14, up to 0.9% slower on the two ``gate_up``
shapes; FP8 weight-only with bf16 activations 10-25% slower (74 registers instead of 58, so fewer programs per
SM). Each kind's best tile with and without TMA (``benchmarks/sweep_small_m.py --weight-tma``,
``results/sweep-small-m-tma-{mx,codes}-h100.json``) gives the same picture; a fourth pipeline slot made TMA
slower."""


def default_config(
    activation_dtype: torch.dtype,
    mx_weight: bool,
    m: int = 1,
    block_weight: bool = False,
    n: int | None = None,
) -> SplitKConfig:
    """The tile :func:`small_m_gemm_triton` uses unless given one: by the MMA's type and the weight's scales
    for up to 16 rows (what the sweep measured; their register caps would spill with 32- or 64-row tiles),
    :data:`DEFAULT_CONFIG` beyond; 128x128 weight blocks meeting an fp16 MMA take :data:`BLOCK_FP16_MMA_STEP`,
    and E4M3 codes against per-tensor / per-channel weights of ``n <= NARROW_N`` columns
    :data:`NARROW_TARGET_PROGRAMS`."""
    if mx_weight or block_m_for(m) > 16:
        return DEFAULT_CONFIG
    if activation_dtype == torch.bfloat16:
        return BF16_MMA_CONFIG
    if block_weight:
        return FP16_MMA_CONFIG._replace(block_k=BLOCK_FP16_MMA_STEP)
    if activation_dtype == torch.float8_e4m3fn and n is not None and n <= NARROW_N:
        return FP16_MMA_CONFIG._replace(target_programs=NARROW_TARGET_PROGRAMS)
    return FP16_MMA_CONFIG


@triton.jit
def _mma_operand(x, MMA: tl.constexpr):
    """An operand in the MMA's input type: fp32 (interpreter), bf16, or fp16 (E4M3 codes and fp16 values)."""
    if MMA == 0:
        y = x.to(tl.float32)
    elif MMA == 1:
        y = x.to(tl.bfloat16)
    else:
        y = x.to(tl.float16)
    return y


@triton.jit
def _scale_and_store(
    total, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N,
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, a_scale_value=1.0,
):  # fmt: skip
    """The scales that factor out of K (0 none, 1 per tensor, 2 per row / column; 3, per K step, were applied
    in the loop; 4, the one row's scale found in this kernel, ``a_scale_value``), bias, cast, store."""
    if A_SCALE == 1:
        total = total * tl.load(a_scale_ptr)
    elif A_SCALE == 4:
        total = total * a_scale_value
    elif A_SCALE == 2:
        total = total * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=1.0)[:, None]
    if B_SCALE == 1:
        total = total * tl.load(b_scale_ptr)
    elif B_SCALE == 2:
        total = total * tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=1.0)[None, :]
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, total.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _block_part_scale(block_scales, a_groups, k0, k_end, m_ok, A_SCALE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each row's multiplier ``[BLOCK_M]`` of the 128 K at ``k0`` over 128x128 weight blocks: the block's scale
    (times, A_SCALE 3, the row's 1x128 group scale); zero for a part at or past ``k_end`` (the second half of
    the last step), which reads the last block's scales in bounds."""
    block = tl.minimum(k0, k_end - 1) // 128
    scale = tl.where(k0 < k_end, tl.load(block_scales + block), 0.0)
    if A_SCALE == 3:
        rows = tl.load(a_groups + block, mask=m_ok, other=0.0) * scale
    else:
        rows = tl.full([BLOCK_M], 1.0, tl.float32) * scale
    return rows


@triton.jit
def _block_step(
    acc, a_rows, b_ptr, b_cols, part_scale, k0, k_end, m_ok, n_ok, pid_n,
    MMA: tl.constexpr, FAST_WIDEN: tl.constexpr, B_TMA: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """128 K of a program over 128x128 weight blocks (``k0`` a multiple of 128): the part's product, a fresh
    MMA, added into ``acc`` times each row's ``part_scale`` (:func:`_block_part_scale`); the accumulator of at
    most 64 rows is small, so the multiply costs little beside the widening. A part at or past ``k_end`` loads
    zeros."""
    offs_k = tl.arange(0, 128)
    k_ok = k0 + offs_k < k_end
    a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    if B_TMA:  # past K the hardware fills in zeros; a split's end within K is a multiple of the step
        b = b_ptr.load([pid_n * BLOCK_N, k0]).T
    else:
        b = tl.load(b_ptr + b_cols + (k0 + offs_k)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    w = e4m3_to_bf16(b, FAST_WIDEN) if MMA == 1 else b
    if MMA == 0:
        part = tl.dot(_mma_operand(a, MMA), _mma_operand(w, MMA), input_precision="ieee")
    else:
        part = tl.dot(_mma_operand(a, MMA), _mma_operand(w, MMA))
    return acc + part * part_scale[:, None]


@triton.jit(do_not_specialize=["M"])
def _split_k_kernel(
    a_ptr,  # [M, K] bf16/fp16 values, or float8e4nv codes; (m, k) at m*stride_am + k
    b_ptr,  # [N, K] float8e4nv weight, K contiguous, (n, k) at n*stride_bn + k
    bs_ptr,  # B_MX: uint8 E8M0 [N, K/32], (n, g) at n*stride_bsn + g; B_SCALE 3: fp32 [cdiv(N, 128), cdiv(K, 128)]
    p_ptr,  # SPLIT_K > 1: fp32 partials [SPLIT_K, M, N], contiguous
    count_ptr,  # SPLIT_K > 1: int32 [cdiv(N, BLOCK_N)] arrival counters, zero before and after each launch
    a_scale_ptr,  # A_SCALE 1: fp32 [1]; 2: fp32 [M]; 3: fp32 1x128 groups [M, cdiv(K, 128)], rows stride_asm
    b_scale_ptr,  # B_SCALE 1: fp32 [1]; 2: fp32 [N] (B_SCALE 3: the block scales come as bs_ptr)
    bias_ptr,
    c_ptr,  # [M, N] output, contiguous
    M,
    N,
    K,
    K_PER_SPLIT,  # multiple of BLOCK_K
    stride_am,
    stride_bn,
    stride_bsn,
    stride_asm,
    B_MX: tl.constexpr,
    A_SCALE: tl.constexpr,
    B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FUSED_SUM: tl.constexpr,  # the last split to arrive adds the partials (else _split_k_sum_kernel does)
    MMA: tl.constexpr,  # 0: fp32 (interpreter only: its bf16/fp16 dot is wrong), 1: bf16, 2: fp16
    FAST_WIDEN: tl.constexpr,  # FP8 weights, bf16 MMA: E4M3 -> bf16 with integer ops (sm_90+, see e4m3.py)
    MX_FOLD: tl.constexpr,  # MX weights: 1 the bf16 widening with the power of two folded in, 2 the fp16 one
    B_TMA: tl.constexpr,  # b_ptr is a tensor descriptor of [BLOCK_N, BLOCK_K] boxes (TMA loads, no masks)
    B_BOXES: tl.constexpr,  # b_ptr holds the weight box-major (mxrun.kernels.box_major): each box one run
    SCALES_AHEAD: tl.constexpr,  # B_MX, or B_SCALE 3 with BLOCK_K 128: the next step's scales loaded a step ahead
    A_ROUND: tl.constexpr,  # M == 1: round the row to its MXFP8 values here, each step's slice as loaded
    A_ROW_QUANT: tl.constexpr,  # M == 1, A bf16/fp16: its per-row FP8 scale found here, each slice encoded
    AMAX_STEP: tl.constexpr,  # A_ROW_QUANT: columns per step of the row's amax (the whole row: one step)
    ROUND_UP: tl.constexpr,  # A_ROUND: the MX scale rule (round_up, else floor)
    SOFT_CAST: tl.constexpr,  # A_ROUND, A_ROW_QUANT: E4M3 encoded in integer arithmetic (the interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 32; of 128 with B_SCALE 3
    WAIT_PRIOR: tl.constexpr = False,  # launched as a programmatic dependent launch of the activations' pass
):
    """One program: BLOCK_N output columns x all (<= BLOCK_M) rows over one K slab. With one split it finishes
    the output itself; with more, it stores fp32 partial sums and the last of a column block's splits to
    arrive adds them all in split order (deterministic: the order does not depend on who arrives last).
    128x128 weight blocks (B_SCALE 3): a program's columns lie in one block row and each 128-wide part of a K
    step in one block, so each part's product is added times that block's scale (:func:`_block_step`)."""
    G: tl.constexpr = BLOCK_K // 32
    if WAIT_PRIOR:  # a programmatic dependent launch: the pass before it has finished and its writes show
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = offs_n.to(tl.int64)[None, :] * stride_bn  # B read as [BLOCK_K, BLOCK_N], K contiguous
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, G)
    bs_cols = bs_ptr + offs_n.to(tl.int64)[None, :] * stride_bsn
    block_scales = bs_ptr + ((pid_n * BLOCK_N) // 128) * stride_bsn  # B_SCALE 3: this block row's scales
    a_groups = a_scale_ptr + offs_m.to(tl.int64) * stride_asm  # A_SCALE 3: the rows' group scales
    row_scale = 1.0
    if A_ROW_QUANT:  # the per-token quantize's arithmetic on the one row (each program finds the same scale)
        one_row = tl.full([1], True, tl.int1)
        row_ptr = a_ptr + tl.zeros([1, 1], dtype=tl.int64)
        row_scale = scale_from_amax_bits(row_amax_bits(row_ptr, one_row, K, 1, 1, AMAX_STEP))
        pre, divisor, reciprocal = scale_division_setup(row_scale)
        row_scale = tl.max(row_scale, axis=0)
    if B_MX and SCALES_AHEAD:
        codes_next = _mx_step_codes(bs_cols, k_begin, k_end, offs_g, n_ok)
    if B_SCALE == 3 and SCALES_AHEAD:
        part_scale_next = _block_part_scale(block_scales, a_groups, k_begin, k_end, m_ok, A_SCALE, BLOCK_M)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if B_SCALE == 3 and SCALES_AHEAD:  # one 128x128 block a step, its scales loaded the step before
            part_scale = part_scale_next
            part_scale_next = _block_part_scale(
                block_scales, a_groups, k0 + 128, k_end, m_ok, A_SCALE, BLOCK_M
            )
            acc = _block_step(acc, a_rows, b_ptr, b_cols, part_scale, k0, k_end, m_ok, n_ok, pid_n, MMA,
                              FAST_WIDEN, B_TMA, BLOCK_N)  # fmt: skip
        elif B_SCALE == 3:  # one 128x128 block per 128-wide part of the step
            for half in tl.static_range(BLOCK_K // 128):
                part_scale = _block_part_scale(block_scales, a_groups, k0 + half * 128, k_end, m_ok, A_SCALE,
                                               BLOCK_M)  # fmt: skip
                acc = _block_step(acc, a_rows, b_ptr, b_cols, part_scale, k0 + half * 128, k_end, m_ok, n_ok,
                                  pid_n, MMA, FAST_WIDEN, B_TMA, BLOCK_N)  # fmt: skip
        else:
            k_ok = k0 + offs_k < k_end
            if A_ROUND:  # the one row, rounded in a 1-D layout (a value or two per thread), is row 0 of A
                row = tl.load(a_ptr + k0 + offs_k, mask=k_ok, other=0.0)
                row = mx_round_rows(tl.reshape(row, [1, BLOCK_K]), ROUND_UP, SOFT_CAST, 1, BLOCK_K)
                a = tl.where((offs_m == 0)[:, None], row, 0.0).to(a_ptr.dtype.element_ty)
            elif A_ROW_QUANT:  # the one row's slice as E4M3 codes, row 0 of A
                row = widen_to_fp32(tl.load(a_ptr + k0 + offs_k, mask=k_ok, other=0.0))
                q = e4m3_code(divide_by_scale(row[None, :], pre[:, None], divisor[:, None], reciprocal[:, None]),
                              SOFT_CAST).to(tl.float8e4nv, bitcast=True)  # fmt: skip
                a = tl.where((offs_m == 0)[:, None], _mma_operand(q, MMA), 0.0)
            else:
                a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if B_BOXES and B_TMA:
                b = b_ptr.load([box_first_row(pid_n, k0, K, BLOCK_N, BLOCK_K), 0]).T
            elif B_BOXES:  # zeros stored past N and K: no masks
                box = box_first_row(pid_n, k0, K, BLOCK_N, BLOCK_K).to(tl.int64) * BLOCK_K
                b = tl.load(b_ptr + box + tl.arange(0, BLOCK_N)[None, :] * BLOCK_K + offs_k[:, None])
            elif B_TMA:
                b = b_ptr.load([pid_n * BLOCK_N, k0]).T
            else:
                b = tl.load(
                    b_ptr + b_cols + (k0 + offs_k)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0
                )
            if B_MX:  # decode the weight in registers: E4M3 times its power of two, exact in fp32
                if SCALES_AHEAD:
                    codes = codes_next
                    codes_next = _mx_step_codes(bs_cols, k0 + BLOCK_K, k_end, offs_g, n_ok)
                else:
                    codes = _mx_step_codes(bs_cols, k0, k_end, offs_g, n_ok)
                w = mx_decode_weight(b, codes, MX_FOLD, False)
            elif MMA == 1:
                w = e4m3_to_bf16(b, FAST_WIDEN)
            else:
                w = b
            if MMA == 0:
                acc = tl.dot(_mma_operand(a, MMA), _mma_operand(w, MMA), acc, input_precision="ieee")
            else:
                acc = tl.dot(_mma_operand(a, MMA), _mma_operand(w, MMA), acc)
    if SPLIT_K == 1:
        _scale_and_store(acc, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N,
                         A_SCALE, B_SCALE, HAS_BIAS, row_scale)  # fmt: skip
    else:
        tile = (offs_m.to(tl.int64) * N)[:, None] + offs_n[None, :]
        tile_ok = m_ok[:, None] & n_ok[None, :]
        tl.store(p_ptr + pid_k * M * N + tile, acc, mask=tile_ok)
        if FUSED_SUM:
            tl.debug_barrier()  # every thread's partials are written before the release below
            arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        else:
            arrived = 0  # the sum kernel adds them
        if FUSED_SUM and arrived == SPLIT_K - 1:
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # L2, not L1: other SMs wrote these
                total += tl.load(p_ptr + s * M * N + tile, mask=tile_ok, other=0.0, cache_modifier=".cg")
            _scale_and_store(total, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N,
                             A_SCALE, B_SCALE, HAS_BIAS, row_scale)  # fmt: skip


@triton.jit
def _mx_step_codes(bs_cols, k0, k_end, offs_g, n_ok):
    """The E8M0 codes ``[G, BLOCK_N]`` of the K step starting at ``k0`` (127, i.e. 2^0, past ``k_end``)."""
    g_ok = k0 + offs_g * 32 < k_end
    codes = tl.load(bs_cols + (k0 // 32 + offs_g)[:, None], mask=g_ok[:, None] & n_ok[None, :], other=127)
    return codes.to(tl.int32)


@triton.jit(do_not_specialize=["M"])
def _split_k_sum_kernel(
    p_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, M, N,
    SPLIT_K: tl.constexpr, A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The splits' partials added in split order, then scales, bias, cast (for tiles of more than 16 rows, where
    one program adding all of a column block's splits would be the slowest part)."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = (offs_m.to(tl.int64) * N)[:, None] + offs_n[None, :]
    tile_ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(p_ptr + s * M * N + tile, mask=tile_ok, other=0.0)
    _scale_and_store(total, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N,
                     A_SCALE, B_SCALE, HAS_BIAS)  # fmt: skip


def split_k_for(n: int, k: int, config: SplitKConfig = DEFAULT_CONFIG) -> int:
    """Splits of K so that ``cdiv(N, block_n) x splits`` is about ``config.target_programs``, each split at
    least two K steps long; at most 32 (the final sum's unrolled loop)."""
    column_blocks = triton.cdiv(n, config.block_n)
    steps = triton.cdiv(k, config.block_k)
    want = max(1, config.target_programs // column_blocks)
    return max(1, min(want, steps // 2, 32))


def sum_splits(
    partials: torch.Tensor,
    a_scale: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    c: torch.Tensor,
) -> None:
    """``c`` = the fp32 ``partials`` ``[splits, M, N]`` added in split order (deterministic), times the scales
    that factor out of K (per tensor or per row / column), plus bias, cast to ``c``'s dtype."""
    splits, m, n = partials.shape
    _split_k_sum_kernel[(triton.cdiv(n, 128), triton.cdiv(m, 16))](
        partials,
        a_scale.reshape(-1) if a_scale is not None else c,
        weight_scale.reshape(-1) if weight_scale is not None else c,
        bias if bias is not None else c,
        c,
        m,
        n,
        SPLIT_K=splits,
        A_SCALE=scale_mode(a_scale, m, "activation", "sum_splits"),
        B_SCALE=scale_mode(weight_scale, n, "weight", "sum_splits"),
        HAS_BIAS=bias is not None,
        BLOCK_M=16,
        BLOCK_N=128,
        num_warps=4,
    )


def mx_fold_mode(b_mx: bool, mma: int, fold_bf16: bool, fold_f16: bool, device: torch.device) -> int:
    """The kernel's MX_FOLD: 1 for bf16 activations on a weight :func:`~mxrun.kernels.e4m3.mx_scales_foldable`
    allows, 2 for fp16 ones on a weight :func:`~mxrun.kernels.e4m3.mx_scales_foldable_f16` allows (both PTX for
    sm_90+), else 0 (the fp32 decode)."""
    if not (b_mx and fast_widen_usable(device)):
        return 0
    if mma == 1 and fold_bf16:
        return 1
    return 2 if mma == 2 and fold_f16 else 0


MX_CODES_AHEAD = True
"""MX weights: each step's E8M0 codes are loaded one step ahead, into registers the loop carries, so that the
step does not wait for their load (byte loads, which Triton does not pipeline)."""

BLOCK_SCALES_AHEAD = True
"""128x128 weight blocks meeting bf16 activations (weight-only) on 128-wide K steps: each step's block scale is
loaded one step ahead, likewise. Not beside E4M3 activation codes, whose short steps (no widening) gained on some
shapes and lost on others (see :func:`scales_ahead`)."""


def scales_ahead(b_mx: bool, blocked: bool, mma: int, config: SplitKConfig) -> bool:
    """Whether the split-K kernel loads each K step's weight scales the step before (:data:`MX_CODES_AHEAD`,
    :data:`BLOCK_SCALES_AHEAD`). H100, interleaved, the seven Llama shapes at M = 1 and 16, two repeats
    (``benchmarks/sweep_linear_setting.py --setting small.MX_CODES_AHEAD --values 0 1 --ms 1 16 --columns
    scaled_mm mxfp8 mxfp8-w8a16-decode mxfp8-wo --repeats 2 [--cold-weights]``,
    ``results/mx-codes-ahead-h100.log``): MX weights x0.959 the time warm, x0.966 cold (faster in 78 and 81 of
    84; MXFP8 weight-only at M = 1 warm on 8B ``gate_up`` 1.65-1.66 -> 1.74-1.78x of bf16, 8B ``qkv``
    1.78-1.81 -> 1.93-1.97x); fp16 activations with the fp16 fold (``benchmarks/small_m_mx_fp16.py``, column
    ``mx16_fold_in_step``, ``results/small-m-mx-fp16-codes-ahead-h100.log``) x0.964, faster in 14 of 14.
    128x128 blocks (``--setting small.BLOCK_SCALES_AHEAD ... --columns scaled_mm fp8-block fp8-block-wo
    mxfp8-tiles mxfp8-tiles-w8a16-decode``, ``results/block-scales-ahead-h100.log``): weight-only x0.992 warm,
    x0.980 cold (faster in 47 and 55 of 56); W8A8 x0.980 warm but x0.995 cold, faster in only 25 and 13 of 56
    (70B ``gate_up`` 12-15% faster, 70B ``qkv`` and ``down`` 3-4% slower), so it keeps the loads in its step."""
    if b_mx:
        return MX_CODES_AHEAD
    return blocked and BLOCK_SCALES_AHEAD and mma == 1 and config.block_k == 128


PDL_AFTER_PASS = True
"""On sm_90+, where this launcher runs a pass over the activations first (the MX rounding; the per-token quantize
of ``quantize_rows`` for rows of up to :data:`~mxrun.kernels.fp8_quantize.ROW_CHUNKS_MIN_COLS` columns, one
program per row or two), that pass lets the GEMM start as soon as all its programs have
(``griddepcontrol.launch_dependents``) and the GEMM goes as a programmatic dependent launch whose programs wait
for the pass's results (``griddepcontrol.wait``) before they read anything: the GEMM's launch and its programs'
start overlap the pass instead of following it. The same bits (tested, eagerly and in CUDA graphs). H100,
interleaved, two repeats (``benchmarks/sweep_linear_setting.py --setting small.PDL_AFTER_PASS --values 0 1 --ms 1
16 --columns scaled_mm fp8-channel mxfp8 --repeats 2 [--cold-weights]``, ``results/pdl-after-pass-h100.log``, run
with the GEMM a dependent launch after every pass): where this rule takes it (per-token FP8 on the 4096-wide
8B layers, MXFP8 W8A8 wherever it rounds in a pass) x0.978 the time warm and x0.973 cold, faster in 27 and 28 of
30 (MXFP8 8B ``o`` at M = 16 1.46-1.51 -> 1.56-1.60x of ``_scaled_mm`` warm, 8B ``down`` 1.62-1.63 -> 1.66-1.69x
cold). After the row-chunks quantize of longer rows (hundreds of programs, the GEMM's arriving while they still
run) it was slower (8B ``down`` per-token at M = 16 1.71-1.73 -> 1.59x of ``_scaled_mm``; x1.015 warm and x1.023
cold over the cases the rule leaves out, those without a pass included), so those keep the ordinary launch.
Measured at 1 and 16 rows; 17-32 rows (one or two passes' programs per row as well) follow the same rule."""


ROUND_ONE_ROW_IN_LOOP = True
"""MXFP8 W8A8 with one activation row rounds that row inside this kernel, each K step's slice in a 1-D layout
as it is loaded (a value or two per thread, then row 0 of the MMA's A tile), instead of in a pass of its own
before the launch, where :func:`rounds_in_loop` says so; the same bits as the pass (tested). H100, interleaved
with the pass, the seven Llama shapes at M = 1 (``benchmarks/sweep_linear_setting.py --setting
small.ROUND_ONE_ROW_IN_LOOP --values 0 1 --ms 1 --columns scaled_mm mxfp8 mxfp8-wo --repeats 2``,
``results/mx-round-in-loop-ab-h100.log``): x0.974 the time over the 28 timings, the two gated-out layers
included (8B ``o`` 1.56-1.59 -> 1.78-1.82x of ``_scaled_mm``, 8B ``qkv`` 1.55-1.61 -> 1.66-1.72x, 8B ``down``
1.73-1.74 -> 1.82-1.85x). Measured in prototypes (``results/mx-round-in-loop-h100.log``) and not taken: 16 rows,
each step rounding the whole tile (x1.1-1.45 the time of the pass: every column block's programs round the same
rows again, 16 values per thread per step); launches whose programs would not fit one wave beside the pass
kernel's registers (70B ``gate_up``'s 896: this kernel needs 72 registers instead of 106, all 896 programs then
run at once, and the layer took 237 against 193 us); and programs of more than :data:`ROUND_IN_LOOP_MAX_STEPS`
K steps (70B ``down``'s 56: 97.2 against 96.3 us)."""
ROUND_IN_LOOP_MAX_STEPS = 32
ROUND_IN_LOOP_MAX_STEPS_H200 = 8
"""The same limit on an H200 (:func:`round_in_loop_max_steps`): with 1.4 times the H100's memory bandwidth and the
same SMs, the MX decode loop is bound by the instructions it issues, so the rounding's instructions in every
step cost more than the pass's launch beyond a few steps. H200, interleaved, the seven Llama shapes at M = 1
(``benchmarks/sweep_linear_setting.py --setting small.ROUND_IN_LOOP_MAX_STEPS_H200 --values 32 16 8 0 --ms 1
--columns scaled_mm mxfp8 --repeats 2 [--cold-weights]``, run as ``small.ROUND_IN_LOOP_MAX_STEPS`` before the
limit per chip, ``results/mx-round-in-loop-steps-h200.log``): 8 steps x0.971 the time of 32 warm and x0.966 cold (8B
``gate_up``, 32 steps, 0.99-1.00 -> 1.12x of ``_scaled_mm`` warm, 70B ``qkv``, 22 steps, 1.45 -> 1.57-1.59x;
8B ``down``, 14 steps, 1.91-1.93 -> 1.98-2.00x cold); 16 x0.978 and x0.972; 0 (always the pass) x0.968 and
x0.979 (8B ``o`` cold 1.62-1.64 -> 1.51x). On the H100 the rounding in the loop had gained on those three
(``results/mx-round-in-loop-ab-h100.log``: 8B ``down`` 1.73-1.74 -> 1.82-1.85x, 8B ``gate_up`` and 70B ``qkv``
by 1-2%), hence a limit per chip."""


def round_in_loop_max_steps(device: torch.device | None) -> int:
    """K steps per program up to which one row is rounded in the loop on ``device``:
    :data:`ROUND_IN_LOOP_MAX_STEPS_H200` on an H200 (the name also covers the H200 NVL and the GH200's, of
    the same memory), else :data:`ROUND_IN_LOOP_MAX_STEPS` (measured on the H100)."""
    fast_memory = device is not None and "H200" in device_name(device)
    return ROUND_IN_LOOP_MAX_STEPS_H200 if fast_memory else ROUND_IN_LOOP_MAX_STEPS


def rounds_in_loop(
    m: int, programs: int, steps: int, config: SplitKConfig, device: torch.device | None = None
) -> bool:
    """Whether an MXFP8 W8A8 call of ``m`` rows launching ``programs`` programs of ``steps`` K steps each
    rounds its activations in the loop (:data:`ROUND_ONE_ROW_IN_LOOP`) rather than in a pass first, on
    ``device`` (:func:`round_in_loop_max_steps`)."""
    return (
        ROUND_ONE_ROW_IN_LOOP
        and m == 1
        and programs <= config.target_programs
        and steps <= round_in_loop_max_steps(device)
    )


QUANTIZE_ONE_ROW_IN_LOOP = True
"""FP8 W8A8 with per-token scales and one long activation row (decode) quantizes that row inside this kernel:
each program reads the whole row for its amax first (the per-token quantize's arithmetic; every program finds the
same scale), then encodes each K step's slice as it loads it, instead of a quantize launch before this one, where
:func:`quantizes_row_in_loop` says so; the same bits as the launch (tested). Only rows of more than
:data:`~mxrun.kernels.fp8_quantize.ROW_CHUNKS_MIN_COLS` columns: their quantize launch runs the row-chunk kernel,
whose programs also read the whole row for its amax, and costs 2.4 us or more; a 4096-wide row's costs less
than each program reading it before its loop. H100, interleaved at M = 1 (``sweep_linear_setting.py --setting
small.QUANTIZE_ONE_ROW_IN_LOOP --values 0 1 --ms 1 --columns scaled_mm fp8-channel fp8-tensor``,
``results/fp8-row-quant-in-loop-h100.log``): before the column gate x1.022 the time over the seven Llama shapes,
slower on the three 4096-wide ones (8B ``qkv`` and ``o`` 2.17-2.34 -> 2.04-2.13x of ``_scaled_mm``), faster on
8B ``down``; with it (``--shapes`` 8B ``down``, 70B ``qkv``, 8B ``o`` as the control, ``--repeats 3``) x0.990,
per-token 8B ``down`` 25.7-25.8 -> 25.1-25.2 us in the last two repeats, 70B ``qkv`` within noise (34.6-34.8 ->
34.5). The 4096-wide rows too (``QUANTIZE_ROW_MIN_K`` 0 against 4096, the same sweep with and without
``--cold-weights`` on 8B ``qkv``, ``o`` and ``gate_up``, ``results/fp8-row-quant-4096-in-loop-h100.log``): x0.954
the time with cold weights (8B ``o`` per-token 1.55 -> 1.68-1.71x of ``_scaled_mm``, ``gate_up`` slower) but
x1.064 warm, slower in all 12; left at 4096."""
QUANTIZE_ROW_MIN_K = ROW_CHUNKS_MIN_COLS  # rows of more columns than this (a switch for the A/B sweeps)
QUANTIZE_ROW_MAX_K = 16384


def quantizes_row_in_loop(m: int, n: int, k: int, config: SplitKConfig, split_k: int | None = None) -> bool:
    """Whether a per-token FP8 W8A8 call of ``m`` rows quantizes its row inside the kernel
    (:data:`QUANTIZE_ONE_ROW_IN_LOOP`): one row of more than :data:`ROW_CHUNKS_MIN_COLS` and at most
    :data:`QUANTIZE_ROW_MAX_K` columns (each program reads it whole, at once), in a launch whose programs fit the
    config's target."""
    if not (QUANTIZE_ONE_ROW_IN_LOOP and m == 1 and QUANTIZE_ROW_MIN_K < k <= QUANTIZE_ROW_MAX_K and n > 0):
        return False
    splits = split_k or split_k_for(n, k, config)
    return triton.cdiv(n, config.block_n) * splits <= config.target_programs


def _tma_loadable(weight: torch.Tensor, config: SplitKConfig) -> bool:
    """Whether TMA can read ``weight`` in ``config``'s tiles: what :func:`~mxrun.kernels.fp8_tma_gemm.tma_usable`
    asks of any TMA operand, and boxes of at most 256 per side."""
    return tma_usable(weight) and max(config.block_n, config.block_k) <= 256


def _weight_descriptor(weight: torch.Tensor, config: SplitKConfig) -> object:
    """The weight's TMA descriptor in ``[block_n, block_k]`` boxes (host side: built per call, a few
    microseconds of Python; a CUDA graph captures it with the launch)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(weight, [config.block_n, config.block_k])


def scale_mode(scale: torch.Tensor | None, rows: int, what: str, fn: str) -> int:
    """The kernels' scale mode of ``scale`` for an operand of ``rows`` rows: 0 none, 1 per tensor, 2 per row."""
    if scale is None:
        return 0
    if scale.dtype != torch.float32:
        raise GemmInputError(f"{fn}: the {what} scale must be float32, got {scale.dtype}")
    if scale.numel() == 1:
        return 1
    if scale.numel() == rows:
        return 2
    raise GemmInputError(f"{fn}: the {what} scale must have 1 or {rows} elements, got {tuple(scale.shape)}")


def check_operands(
    fn: str,
    a: torch.Tensor,
    weight: torch.Tensor | BoxMajorWeight,
    a_scale: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    activation_mx_rule: MxScaleRule | str | None,
    bias: torch.Tensor | None,
) -> tuple[int, int, torch.dtype]:
    """The operands the W8A16 / W8A8 launchers share (this kernel's and the mid-M kernel's): a K-contiguous E4M3
    weight ``[N, K]`` (or one held box-major, :class:`~mxrun.kernels.box_major.BoxMajorWeight`); activations
    ``[M, K]``, K-contiguous, either bf16/fp16 values (no ``a_scale``; the output in their dtype) or E4M3 codes
    with ``a_scale`` and ``out_dtype`` (no ``activation_mx_rule``); a bias ``[N]``. Returns ``(N, K, output
    dtype)``; raises :class:`GemmInputError` naming ``fn`` otherwise."""
    if isinstance(weight, BoxMajorWeight):
        weight.check(fn)
    elif weight.dim() != 2 or weight.stride(1) != 1:
        raise GemmInputError(f"{fn}: the weight must be a K-contiguous float8_e4m3fn [N, K] tensor")
    if weight.dtype != torch.float8_e4m3fn:
        raise GemmInputError(f"{fn}: the weight must be a K-contiguous float8_e4m3fn [N, K] tensor")
    n, k = weight.shape
    if a.dim() != 2 or a.shape[1] != k or a.stride(1) != 1:
        raise GemmInputError(f"{fn}: A must be a K-contiguous [M, K={k}] tensor, got {tuple(a.shape)}")
    if bias is not None and bias.shape != (n,):
        raise GemmInputError(f"{fn}: bias must be [N={n}], got {tuple(bias.shape)}")
    if a.dtype in (torch.bfloat16, torch.float16):
        if a_scale is not None:
            raise GemmInputError(f"{fn}: a_scale goes with E4M3 activations only")
        if activation_mx_rule is not None and k % MX_BLOCK_SIZE:
            raise GemmInputError(f"{fn}: MXFP8 activations need K % 32 == 0, got K={k}")
        return n, k, a.dtype
    if a.dtype == torch.float8_e4m3fn:
        if a_scale is None or activation_mx_rule is not None or out_dtype is None:
            raise GemmInputError(
                f"{fn}: E4M3 activations need a_scale and out_dtype (and no activation_mx_rule)"
            )
        return n, k, out_dtype
    raise GemmInputError(f"{fn}: activations must be bfloat16, float16 or float8_e4m3fn, got {a.dtype}")


def small_m_gemm_triton(
    a: torch.Tensor,
    weight: torch.Tensor | BoxMajorWeight,
    *,
    a_scale: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    weight_scale_e8m0: torch.Tensor | None = None,
    weight_block_scale: torch.Tensor | None = None,
    activation_mx_rule: MxScaleRule | str | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    split_k: int | None = None,
    config: SplitKConfig | None = None,
    fast_widen: bool = True,
    mx_scale_fold: bool = False,
    mx_scale_fold16: bool = False,
    weight_tma: bool | None = None,
    quantize_rows: bool = False,
) -> torch.Tensor:
    """``y = (a s_a) (W s_w)^T + bias`` for ``M <= SMALL_M_MAX`` (64) rows, split along K (see the module docstring).

    ``a``: bf16/fp16 ``[M, K]`` (optionally MX-rounded here with ``activation_mx_rule``: by a pass first, or
    inside the loop for one row, :func:`rounds_in_loop`), or E4M3 codes with
    ``a_scale`` (fp32, 0-dim/``[1]`` or ``[M, 1]``; 1x128 groups ``[M, cdiv(K, 128)]`` beside block weights) and
    ``out_dtype``. ``weight``: E4M3 ``[N, K]`` with exactly one of ``weight_scale`` (fp32, per tensor or
    ``[N, 1]``), ``weight_scale_e8m0`` (``[N, K/32]``) and ``weight_block_scale`` (fp32 128x128 blocks
    ``[cdiv(N, 128), cdiv(K, 128)]``, each K step's product times its block's scale; also the fp32 tile scales
    of a tile-aligned MXFP8 weight, :func:`~mxrun.kernels.mx_regroup.aligned_tile_scales`, whose powers of two
    make every product exact as with its E8M0 codes).
    ``fast_widen=False`` keeps Triton's own E4M3 -> bf16 conversion (for comparison; same values).
    ``mx_scale_fold=True`` promises that every E8M0 code is at most ``MX_FOLD_MAX_CODE`` and no element is NaN
    (:func:`~mxrun.kernels.e4m3.mx_scales_foldable`, checked once per loaded weight by the caller): MX weights
    meeting bf16 activations are then decoded by the fast widening with their power of two folded in.
    ``mx_scale_fold16=True`` promises every code lies in ``[MX_FOLD16_MIN_CODE, MX_FOLD16_MAX_CODE]``
    (:func:`~mxrun.kernels.e4m3.mx_scales_foldable_f16`): fp16 activations then meet the weight converted to
    fp16 and multiplied by its power of two in fp16 (two instructions per pair instead of the fp32 decode).
    ``weight_tma``: read the weight tiles by TMA (True), by pointers (False), or as :data:`WEIGHT_TMA` says
    (None); TMA needs sm_90+ and a 16-byte aligned weight, else the pointers serve whatever is asked.
    ``quantize_rows``: FP8 W8A8 with per-token scales for bf16/fp16 ``a`` beside a per-tensor / per-channel
    weight: one row is quantized inside the kernel where :func:`quantizes_row_in_loop` says so, else the rows
    by :func:`~mxrun.kernels.fp8_quantize.quantize_fp8` first (the same codes and scales either way).
    ``weight`` may be held box-major (:class:`~mxrun.kernels.box_major.BoxMajorWeight`) in this call's ``[block_n,
    block_k]`` boxes (each box one run of memory: the same bits, faster to read; not with 128x128 block
    scales)."""
    fn = "small_m_gemm_triton"
    n, k, out_dtype = check_operands(fn, a, weight, a_scale, out_dtype, activation_mx_rule, bias)
    m = a.shape[0]
    row_quant = False
    pdl = PDL_AFTER_PASS and pdl_usable(a.device)  # see PDL_AFTER_PASS
    after_pass = False  # this launch follows a pass over the activations made here
    if quantize_rows:
        if a.dtype == torch.float8_e4m3fn or activation_mx_rule is not None or weight_scale is None:
            raise GemmInputError(
                f"{fn}: quantize_rows takes bf16/fp16 activations and a per-tensor / per-channel weight"
            )
        config = config or default_config(torch.float8_e4m3fn, False, m, False, n)
        row_quant = quantizes_row_in_loop(m, n, k, config, split_k)
        if not row_quant and pdl and not row_chunks_apply(m, k):  # see PDL_AFTER_PASS
            quantized = quantize_fp8_triton(a, Fp8Granularity.PER_ROW, launch_dependents=True)
            a, a_scale, after_pass = quantized.data, quantized.scale, True
        elif not row_quant:
            quantized = quantize_fp8(a, Fp8Granularity.PER_ROW, Backend.TRITON)
            a, a_scale = quantized.data, quantized.scale
    if m > SMALL_M_MAX:
        raise GemmInputError(f"{fn}: at most {SMALL_M_MAX} rows, got {m}")
    if sum(t is not None for t in (weight_scale, weight_scale_e8m0, weight_block_scale)) != 1:
        raise GemmInputError(
            f"{fn}: give exactly one of weight_scale, weight_scale_e8m0 and weight_block_scale"
        )
    if weight_scale_e8m0 is not None and (
        k % MX_BLOCK_SIZE or weight_scale_e8m0.shape != (n, k // MX_BLOCK_SIZE)
    ):
        raise GemmInputError(f"{fn}: MXFP8 weights need K % 32 == 0 and E8M0 scales [N, K/32]")
    blocked = weight_block_scale is not None
    config = config or default_config(a.dtype, weight_scale_e8m0 is not None, m, blocked, n)
    if blocked:
        weight_block_scale, a_scale = check_block_scales(fn, a_scale, weight_block_scale, m, n, k)
        if config.block_k % 128 or 128 % config.block_n:
            raise GemmInputError(
                f"{fn}: 128x128 blocks need K steps a multiple of 128 and column blocks dividing 128, "
                f"got {config}"
            )
        a_scale_mode, b_scale_mode = 0 if a_scale is None else 3, 3
    else:
        a_scale_mode = 4 if row_quant else scale_mode(a_scale, m, "activation", fn)
        b_scale_mode = scale_mode(weight_scale, n, "weight", fn)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    splits = split_k or split_k_for(n, k, config)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)  # no empty splits
    column_blocks = triton.cdiv(n, config.block_n)
    a_round = activation_mx_rule is not None and not blocked
    a_round = a_round and rounds_in_loop(
        m, column_blocks * splits, k_per_split // config.block_k, config, a.device
    )
    if activation_mx_rule is not None and not a_round:
        a = mx_round_triton(a, activation_mx_rule, launch_dependents=pdl)  # same values: then as weight-only
        after_pass = pdl
    block_m = block_m_for(m)
    fused_sum = block_m <= FUSED_SUM_MAX_BLOCK_M
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=a.device) if splits > 1 else c
    counters = zeroed_int32(a.device, "split-k arrivals", column_blocks) if splits > 1 and fused_sum else c
    b_mx = weight_scale_e8m0 is not None
    b_boxes = isinstance(weight, BoxMajorWeight)
    b_source = weight.boxes if b_boxes else weight
    bs = weight_scale_e8m0.view(torch.uint8) if b_mx else weight_block_scale if blocked else b_source
    # MMA inputs: fp32 in the interpreter; bf16 for bf16 activations; else fp16 (holds every E4M3 value)
    mma = 0 if triton_interpreting() else 1 if a.dtype == torch.bfloat16 and not row_quant else 2
    extra = {} if config.max_registers is None else {"maxnreg": config.max_registers}
    if after_pass:
        extra.update(launch_pdl=True, WAIT_PRIOR=True)
    if weight_tma is None:  # where it measured faster: see WEIGHT_TMA
        weight_tma = WEIGHT_TMA and (weight_scale_e8m0 is not None or mma == 2)
    box = config._replace(block_k=128) if blocked else config  # block steps load 128 K at a time
    b_tma = weight_tma and mma != 0 and _tma_loadable(b_source, box)
    if b_boxes and blocked:
        raise GemmInputError(f"{fn}: a box-major weight goes with per-tensor / per-channel and MXFP8 scales")
    if b_boxes and (weight.box_n, weight.box_k) != (config.block_n, config.block_k):
        raise GemmInputError(
            f"{fn}: the weight's [{weight.box_n}, {weight.box_k}] boxes must be the tile "
            f"[{config.block_n}, {config.block_k}]"
        )
    _split_k_kernel[(column_blocks, splits)](
        a,
        _weight_descriptor(b_source, box) if b_tma else b_source,
        bs,
        partials,
        counters,
        a_scale if a_scale_mode == 3 else a_scale.reshape(-1) if a_scale is not None else c,
        weight_scale.reshape(-1) if weight_scale is not None else c,
        bias if bias is not None else c,
        c,
        m,
        n,
        k,
        k_per_split,
        a.stride(0),
        b_source.stride(0),
        bs.stride(0),
        a_scale.stride(0) if a_scale_mode == 3 else 0,
        B_MX=b_mx,
        A_SCALE=a_scale_mode,
        B_SCALE=b_scale_mode,
        HAS_BIAS=bias is not None,
        SPLIT_K=splits,
        FUSED_SUM=fused_sum,
        MMA=mma,
        FAST_WIDEN=fast_widen and fast_widen_usable(a.device),
        MX_FOLD=mx_fold_mode(b_mx, mma, mx_scale_fold and fast_widen, mx_scale_fold16, a.device),
        B_TMA=b_tma,
        B_BOXES=b_boxes,
        SCALES_AHEAD=scales_ahead(b_mx, blocked, mma, config),
        A_ROUND=a_round,
        A_ROW_QUANT=row_quant,
        AMAX_STEP=triton.next_power_of_2(k) if row_quant else 1,
        ROUND_UP=a_round and MxScaleRule(activation_mx_rule) is MxScaleRule.ROUND_UP,
        SOFT_CAST=resolve_cast(E4m3Cast.AUTO),
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **extra,
    )
    if splits > 1 and not fused_sum:  # block scales were applied per K step
        sum_splits(partials, None if blocked else a_scale, weight_scale, bias, c)
    return c


def check_block_scales(
    fn: str,
    a_scale: torch.Tensor | None,
    weight_block_scale: torch.Tensor,
    m: int,
    n: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales the split-K and mid-M launchers take beside 128x128 weight blocks, K-contiguous: the weight's
    fp32 ``[cdiv(N, 128), cdiv(K, 128)]`` and, beside E4M3 activation codes, their fp32 1x128 group scales
    ``[M, cdiv(K, 128)]`` (None beside bf16/fp16 values); raises :class:`GemmInputError` naming ``fn`` for
    scales of another shape or dtype."""
    blocks = (triton.cdiv(n, 128), triton.cdiv(k, 128))
    if weight_block_scale.shape != blocks or weight_block_scale.dtype != torch.float32:
        raise GemmInputError(
            f"{fn}: 128x128 block scales must be fp32 {blocks}, got {tuple(weight_block_scale.shape)} "
            f"{weight_block_scale.dtype}"
        )
    if a_scale is None:
        return weight_block_scale.contiguous(), None
    groups = (m, blocks[1])
    if a_scale.shape != groups or a_scale.dtype != torch.float32:
        raise GemmInputError(
            f"{fn}: beside 128x128 weight blocks the activation codes need fp32 1x128 group scales {groups}, "
            f"got {tuple(a_scale.shape)} {a_scale.dtype}"
        )
    return weight_block_scale.contiguous(), a_scale.contiguous()


__all__ = [
    "BF16_MMA_CONFIG",
    "BLOCK_FP16_MMA_STEP",
    "DEFAULT_CONFIG",
    "FP16_MMA_CONFIG",
    "FUSED_SUM_MAX_BLOCK_M",
    "NARROW_N",
    "NARROW_TARGET_PROGRAMS",
    "ROUND_IN_LOOP_MAX_STEPS",
    "ROUND_IN_LOOP_MAX_STEPS_H200",
    "ROUND_ONE_ROW_IN_LOOP",
    "SMALL_M_MAX",
    "SplitKConfig",
    "check_block_scales",
    "check_operands",
    "default_config",
    "mx_fold_mode",
    "round_in_loop_max_steps",
    "rounds_in_loop",
    "scale_mode",
    "small_m_gemm_triton",
    "split_k_for",
    "sum_splits",
]
