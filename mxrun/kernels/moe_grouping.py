"""Token grouping for the MoE grouped GEMM in one Triton launch (the torch version takes about twenty).

Why: at decode sizes (a few to a few hundred tokens) a MoE layer's GPU time is mostly small kernels back to
back, and :func:`~mxrun.kernels.moe_routing.group_tokens` (sort, scatter_add, cumsums, searchsorted, ...)
was most of them. One program here does the whole grouping: a histogram of the experts, the padded run
starts by prefix sums, a sort of (expert, pair) keys (which is the stable order the torch version's stable
sort gives), a scatter of each pair to its padded row, and a binary search for each block's expert. The
outputs are the same tensors, bit for bit (tested against :func:`group_tokens`).

One program holds all pairs in registers, so this is for ``S = T * k`` up to :data:`MAX_PAIRS`; larger
batches use the torch version, whose launch cost is small beside their GEMMs.
"""

from __future__ import annotations

import torch

from mxrun.kernels.backend import tl, triton
from mxrun.kernels.moe_routing import TokenGroups, group_tokens, padded_capacity
from mxrun.kernels.row_layout import next_power_of_2

MAX_PAIRS = 4096  # pairs one program sorts in registers (S = tokens x top_k)
# layout rows written per step of the padding fill, and blocks per step of the expert search
_FILL = tl.constexpr(1024)


@triton.jit
def _group_tokens_kernel(
    ids_ptr,  # [S] int32/int64: the expert of each pair (outside [0, E): dropped)
    sorted_pairs_ptr,  # [capacity] int32 out: pair id per layout row, S on padding rows
    block_expert_ptr,  # [n_blocks] int32 out: expert of each BLOCK_M rows, -1 for unused blocks
    counts_ptr,  # [E] int64 out: pairs per expert
    scratch_ptr,  # [2 * BINS] int32: row shift of each expert, then the end block of each expert's run
    S,
    E,
    capacity,
    n_blocks,
    BLOCK_M: tl.constexpr,
    S_POW2: tl.constexpr,
    BINS: tl.constexpr,  # a power of two >= E + 2 (bin E: dropped pairs, E + 1: lanes past S)
    SEARCH_STEPS: tl.constexpr,  # binary-search steps over E run ends: bits of E
):
    pair = tl.arange(0, S_POW2)
    in_range = pair < S
    ids = tl.load(ids_ptr + pair, mask=in_range, other=-1)  # compared in its own width: no wrap-around
    keyed = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    keyed = tl.where(in_range, keyed, E + 1)

    bins = tl.arange(0, BINS)
    counts = tl.where(bins < E, tl.histogram(keyed, BINS), 0)
    tl.store(counts_ptr + bins, counts.to(tl.int64), mask=bins < E)
    starts = tl.cumsum(counts, 0) - counts
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_ends = tl.cumsum(blocks, 0)
    padded_starts = (block_ends - blocks) * BLOCK_M
    tl.store(scratch_ptr + bins, padded_starts - starts)
    tl.store(scratch_ptr + BINS + bins, block_ends)
    for row0 in range(0, capacity, _FILL):
        rows = row0 + tl.arange(0, _FILL)
        tl.store(sorted_pairs_ptr + rows, tl.full([_FILL], 0, tl.int32) + S, mask=rows < capacity)
    tl.debug_barrier()  # the shifts and run ends above are read back below by other threads

    # Sorting (expert, pair) keys gives the pairs grouped by expert, in pair order within an expert.
    key = tl.sort(keyed * S_POW2 + pair)
    expert = key // S_POW2
    kept = expert < E
    shift = tl.load(scratch_ptr + tl.where(kept, expert, 0), mask=kept, other=0)
    tl.store(sorted_pairs_ptr + tl.arange(0, S_POW2) + shift, key % S_POW2, mask=kept)

    # block b belongs to the first expert whose run ends after it (searchsorted, right side)
    for block0 in range(0, n_blocks, _FILL):
        block = block0 + tl.arange(0, _FILL)
        lo = tl.zeros([_FILL], dtype=tl.int32)
        hi = tl.zeros([_FILL], dtype=tl.int32) + E
        for _ in tl.static_range(SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            end = tl.load(scratch_ptr + BINS + mid, mask=active, other=0)
            right = active & (end <= block)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        tl.store(block_expert_ptr + block, tl.where(lo < E, lo, -1), mask=block < n_blocks)


def group_tokens_triton(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> TokenGroups:
    """:func:`~mxrun.kernels.moe_routing.group_tokens` in one launch; same outputs. At most
    :data:`MAX_PAIRS` pairs (``top_k_index.numel()``)."""
    num_pairs = top_k_index.numel()
    if num_pairs > MAX_PAIRS:
        raise ValueError(f"group_tokens_triton: {num_pairs} pairs, at most {MAX_PAIRS} fit one program")
    device = top_k_index.device
    capacity = padded_capacity(num_pairs, num_experts, block_m)
    n_blocks = capacity // block_m
    sorted_pair_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=device)
    counts = torch.empty(num_experts, dtype=torch.int64, device=device)
    if num_pairs == 0:
        counts.zero_()
        return TokenGroups(sorted_pair_ids, block_expert, counts, block_m, num_pairs)
    bins = next_power_of_2(num_experts + 2)
    scratch = torch.empty(2 * bins, dtype=torch.int32, device=device)
    s_pow2 = max(16, next_power_of_2(num_pairs))
    _group_tokens_kernel[(1,)](
        top_k_index.reshape(-1),
        sorted_pair_ids,
        block_expert,
        counts,
        scratch,
        num_pairs,
        num_experts,
        capacity,
        n_blocks,
        BLOCK_M=block_m,
        S_POW2=s_pow2,
        BINS=bins,
        SEARCH_STEPS=max(1, num_experts.bit_length()),
        num_warps=4 if s_pow2 <= 1024 else 8,
    )
    return TokenGroups(sorted_pair_ids, block_expert, counts, block_m, num_pairs)


def group_tokens_fast(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> TokenGroups:
    """One launch for up to :data:`MAX_PAIRS` pairs on CUDA, the torch version otherwise."""
    if top_k_index.is_cuda and top_k_index.numel() <= MAX_PAIRS:
        return group_tokens_triton(top_k_index, num_experts, block_m)
    return group_tokens(top_k_index, num_experts, block_m)


__all__ = ["MAX_PAIRS", "group_tokens_fast", "group_tokens_triton"]
