"""FP8 W8A8 GEMM for large M on Hopper, written in Gluon so that the accumulator's promotion overlaps the MMAs.

Hopper's FP8 wgmma accumulates in reduced precision; like cuBLASLt with fast accumulation off, mxrun adds each
128-wide K step's product into an fp32 accumulator (see ``GemmConfig.max_imprecise_acc``). In Triton the add
comes right after the step's wgmmas, so ptxas makes the warp group wait for them and the tensor cores idle
through every add (:mod:`mxrun.kernels.fp8_tma_gemm`: 0.74-0.81x of ``torch._scaled_mm``). Gluon exposes the
asynchronous wgmma and its wait, so this kernel keeps two register sets for the step products and works one
step ahead: it issues step k's MMAs into one set, waits only for step k-1's (``warpgroup_mma_wait(1)``), adds
that set into the accumulator while step k runs, and refills step k-1's shared-memory slot by TMA. The same
arithmetic as the Triton kernels (products promoted every 128 K, added in K order; equal error statistics
measured).

Measured on an H100, GEMM alone against ``_scaled_mm`` in the same run (``benchmarks/sweep_fp8_tma.py --shapes
2,3,4,5,6,7,8,9,10,11,12,13 --persistent-only --no-pointer --tiles 256,128,128,8,8,3``,
``results/sweep-fp8-wgmma-h100.json``): 128x128 tiles, 8 warps, 4 stages ran at 0.85-1.05x where K >= 8192
(Triton TMA kernel: 0.70-0.86x) and 0.47-0.80x at K = 4096 (TMA: 0.32-0.82x, better on one of five), hence
:data:`WGMMA_MIN_K`. Three register sets of a 128x256 tile would not fit, so tiles stay 128x128. A persistent
variant (one program per SM, the next tile's loads issued during the current tile's last steps) measured
slower in a first try (0.58-0.81x) and was dropped; it is the obvious next step for short K.

Needs CUDA sm_90+, Triton's Gluon (``triton.experimental.gluon``, Triton >= 3.5) and what TMA needs (K-contiguous
operands, 16-byte aligned rows); :func:`wgmma_gemm_usable` says whether it can run, and the dispatcher falls
back to the Triton TMA kernel otherwise. Blackwell (sm_100) has its own MMA (tcgen05) and would get its own
kernel; this one is for sm_90 only.
"""

from __future__ import annotations

import functools

import torch

from mxrun.kernels.backend import HAS_TRITON, triton

try:  # Gluon is experimental and Hopper-specific: the package works without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAS_GLUON = HAS_TRITON
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAS_GLUON = False

WGMMA_MIN_K = 8192
"""From this K the dispatcher prefers this kernel to the persistent Triton TMA kernel. With fewer K steps per
tile the TMA kernel's persistence (the next tile's loads overlap this tile's epilogue) is worth more than the
overlapped promotion: H100, same run, GEMM alone, x ``_scaled_mm``: K = 4096 0.47-0.80 here against 0.32-0.82;
K >= 8192 0.85-1.05 against 0.70-0.86 (``benchmarks/results/sweep-fp8-wgmma-h100.json``)."""

WGMMA_BLOCK = (128, 128, 128)
"""The tile (M, N, K): three fp32 register sets of it (accumulator and two step products) fit 8 warps."""
WGMMA_STAGES = 4
WGMMA_WARPS = 8
WGMMA_GROUP_M = 8


if HAS_GLUON:

    @gluon.jit
    def _refill(a_desc, b_desc, a_s, b_s, ready, step, k_steps, off_m, off_n, STAGES: gl.constexpr):
        """TMA loads of K step ``step`` (if there is one) into its slot; the slot's last MMAs are done."""
        gl.thread_barrier()  # both warp groups' MMAs on the slot are done before TMA overwrites it
        slot = step % STAGES
        pred = step < k_steps
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(
            a_desc, [off_m, step * BLOCK_K], ready.index(slot), a_s.index(slot), pred
        )
        tma.async_copy_global_to_shared(
            b_desc, [off_n, step * BLOCK_K], ready.index(slot), b_s.index(slot), pred
        )

    @gluon.jit
    def _step_product(a_s, b_s, ready, step, regs, STAGES: gl.constexpr):
        """Start K step ``step``'s MMAs into ``regs`` (their old contents ignored) once its tiles have landed."""
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        return warpgroup_mma(
            a_s.index(slot), b_s.index(slot).permute((1, 0)), regs, use_acc=False, is_async=True
        )

    @gluon.jit(do_not_specialize=["M"])
    def _fp8_wgmma_gemm_kernel(
        a_desc,  # [M, K] float8e4nv, tiles [BLOCK_M, BLOCK_K]
        b_desc,  # [N, K] float8e4nv weight, tiles [BLOCK_N, BLOCK_K]
        a_scale_ptr,  # fp32 [M] (A_PER_ROW) or [1]
        b_scale_ptr,  # fp32 [N] (B_PER_ROW) or [1]
        bias_ptr,
        c_ptr,  # [M, N], row stride stride_cm, unit column stride
        M,
        N,
        K,
        stride_cm,
        A_PER_ROW: gl.constexpr,
        B_PER_ROW: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        pid = gl.program_id(0)
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        size_m = min(num_pid_m - first_m, GROUP_M)
        off_m = (first_m + (pid % group) % size_m) * BLOCK_M
        off_n = ((pid % group) // size_m) * BLOCK_N
        k_steps = gl.cdiv(K, BLOCK_K)

        a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
        b_s = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        for i in gl.static_range(STAGES):
            _refill(a_desc, b_desc, a_s, b_s, ready, i, k_steps, off_m, off_n, STAGES)

        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 32]
        )
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout)
        regs_b = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout)
        # Two steps per iteration so that each register set keeps its registers (no copies of in-flight results).
        pending_a = _step_product(
            a_s, b_s, ready, 0, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout), STAGES
        )
        for kb in range(1, k_steps - 1, 2):
            pending_b = _step_product(a_s, b_s, ready, kb, regs_b, STAGES)
            regs_a = warpgroup_mma_wait(1, deps=(pending_a,))  # step kb-1 done; step kb runs on
            acc += regs_a
            _refill(a_desc, b_desc, a_s, b_s, ready, kb - 1 + STAGES, k_steps, off_m, off_n, STAGES)
            pending_a = _step_product(a_s, b_s, ready, kb + 1, regs_a, STAGES)
            regs_b = warpgroup_mma_wait(1, deps=(pending_b,))
            acc += regs_b
            _refill(a_desc, b_desc, a_s, b_s, ready, kb + STAGES, k_steps, off_m, off_n, STAGES)
        if k_steps % 2 == 0:  # the last step is still to start
            pending_b = _step_product(a_s, b_s, ready, k_steps - 1, regs_b, STAGES)
            acc += warpgroup_mma_wait(1, deps=(pending_a,))
            acc += warpgroup_mma_wait(0, deps=(pending_b,))
        else:
            acc += warpgroup_mma_wait(0, deps=(pending_a,))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))

        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        if A_PER_ROW:
            a_scale = gl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=1.0)
        else:
            a_scale = gl.load(a_scale_ptr + offs_m * 0)
        if B_PER_ROW:
            b_scale = gl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=1.0)
        else:
            b_scale = gl.load(b_scale_ptr + offs_n * 0)
        out = acc * a_scale[:, None] * b_scale[None, :]
        if HAS_BIAS:
            out = out + gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ptrs = c_ptr + offs_m.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
        gl.store(ptrs, out.to(c_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def wgmma_gemm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Gluon importable, an sm_90 GPU (wgmma; Blackwell has other MMAs), TMA-compatible operands (the
    dispatcher also asks for K >= :data:`WGMMA_MIN_K`)."""
    from mxrun.kernels.fp8_tma_gemm import tma_usable

    if not (HAS_GLUON and tma_usable(a, b)):
        return False
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] == 9


def fp8_wgmma_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(a s_a)(b s_b)^T + bias`` for E4M3 ``a`` ``[M, K]`` and ``b`` ``[N, K]`` with per-row/per-tensor fp32
    scales (``[M]``/``[M, 1]``/one element; ``[N]``/``[N, 1]``/one element). Operands it cannot take
    (:func:`wgmma_gemm_usable` is False: no Gluon, not sm_90, not TMA-ready) get a :class:`GemmInputError`."""
    from mxrun.kernels.fp8_tma_gemm import fp8_operand_shapes
    from mxrun.kernels.scaled_gemm import GemmInputError

    m, n, k = fp8_operand_shapes("fp8_wgmma_gemm", a, b)
    if not wgmma_gemm_usable(a, b):
        raise GemmInputError(
            "fp8_wgmma_gemm: needs Triton's Gluon, an sm_90 CUDA device and TMA-ready operands (K-contiguous, "
            "16-byte aligned rows); use fp8_tma_gemm or fp8_gemm_triton otherwise"
        )
    a_scale = a_scale.reshape(-1).contiguous()
    b_scale = b_scale.reshape(-1).contiguous()
    if a_scale.numel() not in (1, m) or b_scale.numel() not in (1, n):
        raise GemmInputError(
            f"fp8_wgmma_gemm: scales must have 1 or M={m} / 1 or N={n} elements, got {a_scale.numel()}, "
            f"{b_scale.numel()}"
        )
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    block_m, block_n, block_k = WGMMA_BLOCK
    a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k], _operand_layout(block_m, block_k))
    b_desc = TensorDescriptor.from_tensor(b, [block_n, block_k], _operand_layout(block_n, block_k))
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp8_wgmma_gemm_kernel[grid](
        a_desc,
        b_desc,
        a_scale,
        b_scale,
        bias if bias is not None else b_scale,
        c,
        m,
        n,
        k,
        c.stride(0),
        A_PER_ROW=a_scale.numel() > 1,
        B_PER_ROW=b_scale.numel() > 1,
        HAS_BIAS=bias is not None,
        GROUP_M=WGMMA_GROUP_M,
        STAGES=WGMMA_STAGES,
        num_warps=WGMMA_WARPS,
    )
    return c


@functools.cache
def _operand_layout(rows: int, cols: int):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float8e4nv)


__all__ = ["HAS_GLUON", "WGMMA_MIN_K", "fp8_wgmma_gemm", "wgmma_gemm_usable"]
