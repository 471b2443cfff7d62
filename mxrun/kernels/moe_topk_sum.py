"""The MoE layer's last step: each token's ``k`` expert outputs added in fp32 and rounded once, in one launch.

The down GEMM writes one row per (token, slot) pair, ``y [T * k, H]`` in the activations' dtype (the routing
weight already applied). The layer's output is ``out_t = sum_j y_(t, j)``, added in fp32 in slot order and
rounded once. In torch that is three kernels: the zero fill of ``y`` (pairs dropped by an expert-parallel
sentinel are never written by the GEMM), the fp32 sum and the cast. This kernel reads ``top_k_index`` instead and
skips dropped pairs, so ``y`` needs no zero fill and the sum and the cast are one pass. H100
(``benchmarks/results/moe-topk-sum-h100.md``): the layer 3-11 us faster at 128 tokens (Mixtral-8x7B, alternating
runs; there the zero fill and the sum are small), 125-145 us at 8192 tokens on Qwen3-30B-A3B (two whole runs;
FP8 per-channel 1.76 -> 1.94x of bf16 ``torch._grouped_mm``, MXFP8 1.10 -> 1.17x); the fill alone writes
``T * k * H`` values, 0.9 GB for a DeepSeek-V3-like layer at 8192 tokens. The kernel alone beside that fill +
sum + cast and beside ``torch.compile`` of :func:`topk_sum_reference` (``benchmarks/bench_moe_topk_sum.py``,
``results/moe-topk-sum-bench-h100.json``): 2.3-4.1x and 1.0-2.6x faster, bit-exact, ~3.0 TB/s at 8192 tokens.
"""

from __future__ import annotations

import torch

from mxrun.kernels.backend import tl, triton


@triton.jit
def _topk_sum_kernel(
    y_ptr,  # [T * TOP_K, H], rows contiguous (stride_y apart)
    index_ptr,  # int [T * TOP_K]: each pair's expert; outside [0, num_experts) = dropped
    out_ptr,  # [T, H], rows contiguous (stride_out apart)
    H,
    num_experts,
    stride_y,
    stride_out,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program: BLOCK_H columns of one token, its TOP_K rows added in slot order in fp32."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        expert = tl.load(index_ptr + pair)
        kept = ((expert >= 0) & (expert < num_experts)).to(tl.int32)
        mask = ok & (tl.full([BLOCK_H], 0, tl.int32) + kept != 0)  # a vector mask (the interpreter's need)
        acc += tl.load(y_ptr + pair * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def topk_sum_triton(y: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``out [T, H]`` (``y``'s dtype): for each token the sum over its slots ``j`` of ``y[t * k + j]`` in fp32,
    slot by slot from zero, rounded once; rows of dropped pairs (expert outside ``[0, num_experts)``) are not
    read, so they may hold anything."""
    tokens, top_k = top_k_index.shape
    if y.dim() != 2 or y.shape[0] != tokens * top_k or y.stride(1) != 1:
        raise ValueError(f"topk_sum_triton: y must be [T * k = {tokens * top_k}, H] with contiguous rows")
    hidden = y.shape[1]
    out = torch.empty((tokens, hidden), dtype=y.dtype, device=y.device)
    if tokens == 0 or hidden == 0:
        return out
    block_h = min(1024, triton.next_power_of_2(hidden))
    _topk_sum_kernel[(tokens, triton.cdiv(hidden, block_h))](
        y, top_k_index.reshape(-1).contiguous(), out, hidden, num_experts, y.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip
    return out


def topk_sum_reference(y: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The same sum in torch: fp32, slot by slot from zero, dropped pairs left out, rounded once."""
    tokens, top_k = top_k_index.shape
    rows = y.view(tokens, top_k, -1)
    kept = (top_k_index >= 0) & (top_k_index < num_experts)
    acc = torch.zeros((tokens, y.shape[1]), dtype=torch.float32, device=y.device)
    for j in range(top_k):
        acc = acc + torch.where(kept[:, j, None], rows[:, j].float(), 0.0)
    return acc.to(y.dtype)


__all__ = ["topk_sum_reference", "topk_sum_triton"]
