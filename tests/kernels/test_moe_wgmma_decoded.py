"""The Gluon grouped GEMM for weights decoded in registers (``mxrun/kernels/moe_wgmma_decoded.py``).

The kernel needs an sm_90 GPU; on CPU only its layout helper and the launcher's rules are checked. The error
bound is that of ``test_moe_gemm.py`` (derived there): every operand value the MMA sees is exact, so kernel
and reference add the same exact products in fp32 and differ by summation order, then one bf16 rounding:
``2^-7 |ref| + 1e-5 max|ref|`` per element for one GEMM, ``(2k + 1) 2^-7 max|ref|`` for the whole forward.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mxrun.kernels import moe_gemm
from mxrun.kernels.moe_gemm import (
    ExpertActivation,
    ExpertWeightFormat,
    ExpertWeights,
    moe_block_m,
    moe_decoded_wgmma,
    moe_experts_reference,
    moe_experts_triton,
    moe_grouped_gemm_triton,
)
from mxrun.kernels.moe_routing import group_tokens
from mxrun.kernels.moe_wgmma_decoded import HAS_GLUON, moe_decoded_wgmma_gemm
from tests.kernels.test_moe_gemm import (
    ULP,
    _assert_one_ulp,
    _gemm_reference,
    _routing,
    _stack,
    _x,
    assert_no_sync_and_no_recompile,
)

F = ExpertWeightFormat
A = ExpertActivation
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not (HOPPER and HAS_GLUON), reason="needs an sm_90 GPU and Triton's Gluon")


@pytest.mark.skipif(not HAS_GLUON, reason="needs Triton's Gluon")
def test_split_k_layout_keeps_every_element_in_place() -> None:
    """The codes' layout helper: a [64, 64] layout seen as [64, 2, 32] must put element (r, g, j) in the
    register, lane and warp that hold (r, 32 g + j), or the folded multiplier would meet the wrong weights.
    The input is a wgmma register-operand-like layout with bases in both dims at every level."""
    from triton.experimental.gluon import language as gl

    from mxrun.kernels.moe_wgmma_decoded import _split_k_layout

    two_d = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [8, 0], [0, 8], [0, 16], [0, 32]],
        lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]],
        block_bases=[],
        shape=[64, 64],
    )
    three_d = _split_k_layout(two_d, 32)
    assert three_d.shape == [64, 2, 32]

    def place(layout, reg, lane, warp):
        coord = [0] * len(layout.shape)
        for bases, index in ((layout.reg_bases, reg), (layout.lane_bases, lane), (layout.warp_bases, warp)):
            for bit, basis in enumerate(bases):
                if index >> bit & 1:
                    coord = [c ^ b for c, b in zip(coord, basis, strict=True)]
        return coord

    seen = set()
    for reg, lane, warp in itertools.product(range(32), range(32), range(4)):
        r, k = place(two_d, reg, lane, warp)
        assert place(three_d, reg, lane, warp) == [r, k // 32, k % 32]
        seen.add((r, k))
    assert len(seen) == 64 * 64


def test_launcher_rule_without_a_hopper_gpu() -> None:
    """Off the GPU (or off sm_90) the layer never takes the Gluon kernel; its block rule is twice the bucket
    (the tokens are that kernel's MMA N), 16 to 64 rows."""
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    stack = ExpertWeights(torch.zeros(8, 256, 128), torch.ones(8, 256, 1), F.FP8_CHANNEL)
    down = ExpertWeights(torch.zeros(8, 128, 128), torch.ones(8, 128, 1), F.FP8_CHANNEL)
    assert not moe_decoded_wgmma(x, 8, stack, down, A.NONE, mx_fold=False)
    assert moe_block_m(256, 8, A.NONE, decoded_wgmma=True) == 64  # Mixtral at 128 tokens: 32 pairs on average
    assert moe_block_m(32, 8, A.NONE, decoded_wgmma=True) == 16  # 16 tokens: 4 per expert
    assert moe_block_m(1024, 128, A.NONE, decoded_wgmma=True) == 16  # Qwen3 at 128 tokens: 8 per expert
    assert moe_block_m(2048, 8, A.NONE, decoded_wgmma=True) == 128  # Mixtral at 1024 tokens: 256 per expert
    assert moe_block_m(256, 8, A.NONE) == 32  # the Triton kernels' rule is unchanged


@pytest.mark.parametrize(
    ("row_sets", "tail_m", "message"), [(3, None, "row_sets=3"), (None, 48, "tail_m=48")]
)
def test_launcher_refuses_unknown_row_sets_and_tail_sizes(row_sets, tail_m, message) -> None:
    """Before any launch (so on CPU too): row sets other than 1 or 2 and narrow sizes other than 0, 16, 32 or
    64 are named errors, not a kernel built for a tile it cannot hold."""
    w = torch.zeros(2, 128, 128)
    with pytest.raises(moe_gemm.GemmInputError, match=message):
        moe_decoded_wgmma_gemm(
            torch.zeros(4, 128), w, torch.ones(2, 128, 1), 0, torch.zeros(128, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32), 4, 128, torch.zeros(4, 128), gated=False, gather_top_k=None,
            row_sets=row_sets, tail_m=tail_m,
        )  # fmt: skip


def _foldable_every_code(weights: ExpertWeights, seed: int) -> ExpertWeights:
    """The stack with random E8M0 codes over every foldable value (0 .. MX_FOLD_MAX_CODE)."""
    from mxrun.kernels.e4m3 import MX_FOLD_MAX_CODE

    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(
        0, MX_FOLD_MAX_CODE + 1, weights.scale.shape, generator=generator, dtype=torch.uint8
    )
    return ExpertWeights(
        weights.data, codes.to(weights.data.device).view(weights.scale.dtype), weights.format
    )


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("fmt", [F.FP8_CHANNEL, F.FP8_TENSOR, F.FP8_BLOCK, F.MXFP8, "mxfp8-every-code"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize(("block_m", "k"), [(16, 128), (32, 384), (64, 256), (128, 256)])
def test_gpu_grouped_gemm_matches_reference(fmt, gated, block_m, k) -> None:
    """One grouped GEMM: a ragged N tail (80 rows: tiles of 64; 128x128 blocks take N = 192 instead, whose up
    rows start half way into a row block), one, two and three K steps (the ring is filled past K, with
    zeros), padding rows, experts that get nothing, 40 pairs on one expert (more than one 32-row block)."""
    every_code = fmt == "mxfp8-every-code"
    fmt = F.MXFP8 if every_code else fmt
    experts, n, tokens, top_k = 6, 192 if fmt is F.FP8_BLOCK else 80, 27, 2
    weights = _stack(fmt, experts, 2 * n if gated else n, k, seed=51)
    if every_code:
        weights = _foldable_every_code(weights, seed=52)
    routing, index = _routing(tokens, experts, top_k, seed=53, only=[0, 2, 3, 5])
    x = _x(tokens if gated else tokens * top_k, k, seed=54) * (2.0**-20 if every_code else 1.0)
    groups = group_tokens(index, experts, block_m)
    out = torch.zeros(tokens * top_k, n, dtype=torch.bfloat16, device="cuda")
    moe_grouped_gemm_triton(
        x, None, weights, groups, out, gated=gated, gather_top_k=top_k if gated else None,
        routing_weights=None if gated else routing.reshape(-1), mx_scale_fold=fmt is F.MXFP8,
        decoded_wgmma=True,
    )  # fmt: skip
    reference = _gemm_reference(x, weights, index, gated, gated, None if gated else routing)
    _assert_one_ulp(out, reference)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("fmt", [F.FP8_CHANNEL, F.FP8_BLOCK, F.MXFP8])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize(("block_m", "k"), [(32, 384), (128, 256)])
@pytest.mark.parametrize("group_m", [0, 3])
def test_gpu_two_warp_groups_match_reference(fmt, gated, block_m, k, group_m) -> None:
    """The two-warp-group variant (128 weight rows per program, what layers of many experts take) under the
    same bound: N = 80 (one ragged tile) or, with 128x128 blocks, 256 (up rows in their own row blocks); both
    program orders (groups of 3 layout blocks leave a partial last group)."""
    experts, n, tokens, top_k = 6, 256 if fmt is F.FP8_BLOCK else 80, 27, 2
    weights = _stack(fmt, experts, 2 * n if gated else n, k, seed=71)
    routing, index = _routing(tokens, experts, top_k, seed=72, only=[0, 2, 3, 5])
    x = _x(tokens if gated else tokens * top_k, k, seed=73)
    groups = group_tokens(index, experts, block_m)
    out = torch.zeros(tokens * top_k, n, dtype=torch.bfloat16, device="cuda")
    moe_decoded_wgmma_gemm(
        x, weights.data, weights.scale, {F.FP8_CHANNEL: 0, F.FP8_BLOCK: 1, F.MXFP8: 2}[fmt],
        groups.sorted_pair_ids, groups.block_expert, groups.num_pairs, block_m, out, gated=gated,
        gather_top_k=top_k if gated else None, routing_weights=None if gated else routing.reshape(-1), warps=8,
        group_m=group_m,
    )  # fmt: skip
    reference = _gemm_reference(x, weights, index, gated, gated, None if gated else routing)
    _assert_one_ulp(out, reference)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("fmt", [F.FP8_CHANNEL, F.FP8_TENSOR, F.FP8_BLOCK, F.MXFP8])
@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("row_sets", [1, 2])
@pytest.mark.parametrize("n", [80, 384])
def test_gpu_down_row_sets_match_reference(fmt, warps, row_sets, n) -> None:
    """The ungated GEMM with one or two weight row sets per warp group (64 or 128 rows each) under the same
    bound. N = 80 leaves the second set partly (4 warps) or wholly (8 warps) past N; N = 384 gives several
    column tiles, and at 8 warps with two sets (256 rows a program) the last tile's second set lies wholly
    past N, where the kernel reads the last row block's scales for rows that are all zeros. 128x128 blocks take
    N = 384 only (a set must lie in one row block)."""
    if fmt is F.FP8_BLOCK and n % 128:
        pytest.skip("128x128 blocks need each row set inside one row block")
    experts, k, tokens, top_k, block_m = 5, 256, 45, 2, 64
    weights = _stack(fmt, experts, n, k, seed=81)
    routing, index = _routing(tokens, experts, top_k, seed=82, only=[0, 1, 4])
    x = _x(tokens * top_k, k, seed=83)
    groups = group_tokens(index, experts, block_m)
    sentinel = torch.finfo(torch.bfloat16).max
    out = torch.full((tokens * top_k, n), sentinel, dtype=torch.bfloat16, device="cuda")
    w_mode = {F.FP8_CHANNEL: 0, F.FP8_TENSOR: 0, F.FP8_BLOCK: 1, F.MXFP8: 2}[fmt]
    moe_decoded_wgmma_gemm(
        x, weights.data, weights.scale, w_mode, groups.sorted_pair_ids, groups.block_expert, groups.num_pairs,
        block_m, out, gated=False, gather_top_k=None, routing_weights=routing.reshape(-1), warps=warps,
        row_sets=row_sets,
    )  # fmt: skip
    reference = _gemm_reference(x, weights, index, False, False, routing)
    assert not (out == sentinel).any(), "a column of some pair was not written"
    _assert_one_ulp(out, reference)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("fmt", [F.FP8_CHANNEL, F.FP8_BLOCK, F.MXFP8])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("tail_m", [0, 16, 32, 64])
def test_gpu_narrow_tail_blocks_match_reference(fmt, gated, tail_m) -> None:
    """128-row blocks whose rows past ``tail_m`` (or twice it, below 128) are padding run a narrower MMA.
    Experts of 150 pairs (a full block and one of 22 rows), 33, 32 (exactly ``tail_m`` = 32 rows), 97, 16 and
    none, so that each narrow size meets blocks on both sides of its threshold; the same bound as full
    blocks."""
    counts = [150, 33, 32, 97, 16, 0]
    experts, n, k = len(counts), 128, 256
    generator = torch.Generator().manual_seed(91)
    index = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    index = index[torch.randperm(index.numel(), generator=generator)].reshape(-1, 1).to("cuda")
    routing = torch.rand(index.shape, generator=generator).to("cuda") + 0.5
    weights = _stack(fmt, experts, 2 * n if gated else n, k, seed=92)
    x = _x(index.numel(), k, seed=93)
    groups = group_tokens(index, experts, 128)
    out = torch.zeros(index.numel(), n, dtype=torch.bfloat16, device="cuda")
    moe_decoded_wgmma_gemm(
        x, weights.data, weights.scale, {F.FP8_CHANNEL: 0, F.FP8_BLOCK: 1, F.MXFP8: 2}[fmt],
        groups.sorted_pair_ids, groups.block_expert, groups.num_pairs, 128, out, gated=gated,
        gather_top_k=1 if gated else None, routing_weights=None if gated else routing.reshape(-1), tail_m=tail_m,
    )  # fmt: skip
    reference = _gemm_reference(x, weights, index, gated, gated, None if gated else routing)
    _assert_one_ulp(out, reference)


@pytest.mark.gpu
@needs_hopper
def test_gpu_refuses_what_it_cannot_run() -> None:
    weights = _stack(F.MXFP8, 2, 128, 128, seed=0)
    _, index = _routing(3, 2, 1, seed=0)
    out = torch.zeros(3, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(moe_gemm.GemmInputError, match="foldable MX scales"):
        moe_grouped_gemm_triton(
            _x(3, 128, seed=0), None, weights, group_tokens(index, 2, 16), out, gated=True, gather_top_k=1,
            decoded_wgmma=True,
        )  # fmt: skip
    with pytest.raises(moe_gemm.GemmInputError, match="K a multiple of 128"):
        short = _stack(F.FP8_CHANNEL, 2, 128, 96, seed=0)
        moe_grouped_gemm_triton(
            _x(3, 96, seed=0), None, short, group_tokens(index, 2, 16), out, gated=True, gather_top_k=1,
            decoded_wgmma=True,
        )  # fmt: skip
    with pytest.raises(moe_gemm.GemmInputError, match="block scales need N a multiple of 16 x warps"):
        blocks = _stack(F.FP8_BLOCK, 2, 192, 128, seed=0)  # N = 192: 64 rows per program, not 128
        groups = group_tokens(index, 2, 16)
        moe_decoded_wgmma_gemm(
            _x(3, 128, seed=0), blocks.data, blocks.scale, 1, groups.sorted_pair_ids, groups.block_expert,
            groups.num_pairs, 16, torch.zeros(3, 192, dtype=torch.bfloat16, device="cuda"), gated=False,
            gather_top_k=None, warps=8,
        )  # fmt: skip
    with pytest.raises(moe_gemm.GemmInputError, match="N of 64 with 128x128 weight blocks"):
        blocks = _stack(F.FP8_BLOCK, 2, 160, 128, seed=0)  # N = 80: a tile would straddle two row blocks
        moe_grouped_gemm_triton(
            _x(3, 128, seed=0), None, blocks, group_tokens(index, 2, 16), out[:, :80], gated=True,
            gather_top_k=1, decoded_wgmma=True,
        )  # fmt: skip


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize(
    ("fmt", "activation"),
    [(F.FP8_CHANNEL, A.NONE), (F.FP8_BLOCK, A.NONE), (F.MXFP8, A.NONE), (F.MXFP8, A.MX_ROUND_UP)],
)
def test_gpu_experts_forward_takes_the_kernel_at_32_pairs_per_expert(fmt, activation) -> None:
    """The whole forward at 32 pairs per expert on average (the Mixtral 128-token case, scaled down): the
    launcher's rule picks the kernel, and the output stays within the whole-forward bound (MX activations:
    the quantized-activation bound of test_moe_gemm.py)."""
    experts, hidden, inter, tokens, top_k = 8, 512, 384, 128, 2
    gate_up = _stack(fmt, experts, 2 * inter, hidden, seed=61)
    down = _stack(fmt, experts, hidden, inter, seed=62)
    routing, index = _routing(tokens, experts, top_k, seed=63)
    x = _x(tokens, hidden, seed=64)
    fold = fmt is F.MXFP8
    assert moe_decoded_wgmma(x, tokens * top_k, gate_up, down, A.NONE, fold)
    out = moe_experts_triton(x, index, routing, gate_up, down, activation, mx_scales_foldable=fold).float()
    reference = moe_experts_reference(x, index, routing, gate_up, down, activation).float()
    if activation is A.NONE:
        assert (out - reference).abs().max() <= (2 * top_k + 1) * ULP * reference.abs().max()
    else:
        assert (out - reference).norm() <= 2.0**-5 * reference.norm()


@pytest.mark.gpu
@needs_hopper
def test_gpu_experts_forward_with_many_experts_takes_two_warp_groups(monkeypatch) -> None:
    """160 experts at 32 pairs per expert on average, with two warp groups set for more than 128 experts (off
    by default: MOE_DECODED_WGMMA_WIDE_EXPERTS): the rule picks the kernel, both GEMMs launch it with 8 warps,
    and the output stays within the whole-forward bound."""
    monkeypatch.setattr(moe_gemm, "MOE_DECODED_WGMMA_WIDE_EXPERTS", 128)
    launched = []

    def spy(*args, **kwargs):
        launched.append(kwargs["warps"])
        return moe_decoded_wgmma_gemm(*args, **kwargs)

    monkeypatch.setattr(moe_gemm, "moe_decoded_wgmma_gemm", spy)
    experts, hidden, inter, tokens, top_k = 160, 256, 256, 640, 8
    gate_up = _stack(F.MXFP8, experts, 2 * inter, hidden, seed=81)
    down = _stack(F.MXFP8, experts, hidden, inter, seed=82)
    routing, index = _routing(tokens, experts, top_k, seed=83)
    x = _x(tokens, hidden, seed=84)
    assert moe_decoded_wgmma(x, tokens * top_k, gate_up, down, A.NONE, True)
    out = moe_experts_triton(x, index, routing, gate_up, down, A.NONE, mx_scales_foldable=True).float()
    reference = moe_experts_reference(x, index, routing, gate_up, down, A.NONE).float()
    assert launched == [8, 8]
    assert (out - reference).abs().max() <= (2 * top_k + 1) * ULP * reference.abs().max()


@pytest.mark.gpu
@needs_hopper
def test_gpu_no_host_sync_and_no_recompile_within_a_bucket() -> None:
    """The layer on the Gluon kernel (17-32 pairs per expert: 194-254 pairs over 8 experts) neither
    synchronizes with the host nor compiles again for another token count of the same bucket."""
    from mxrun.kernels.moe_wgmma_decoded import moe_decoded_wgmma_kernel

    def takes_the_kernel(x, pairs, gate_up, down) -> None:
        assert moe_decoded_wgmma(x, pairs, gate_up, down, A.NONE, False)

    assert_no_sync_and_no_recompile(
        moe_decoded_wgmma_kernel, F.FP8_CHANNEL, (97, 101, 113, 127), takes_the_kernel
    )
