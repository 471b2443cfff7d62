"""The split-K small-M GEMM against the plain-torch references of every scheme it serves (FP8 W8A8 per-token /
per-tensor, FP8 weight-only per-tensor / per-channel, MXFP8 W8A16 and W8A8 with both scale rules), with ragged
N, K not a multiple of the K step, several splits and M = 1, and through the Linear dispatchers.

Tolerance: one output ulp, as in test_scaled_gemm.py. Every product the kernel forms is exact in fp32 (E4M3
codes, bf16/fp16 activations and power-of-two MX scales), the splits are added in fp32 and the scales that
factor out of K are applied once, so only the fp32 summation order differs from the references; at M <= 64 the
MMA is mma.sync with fp32 accumulation (no wgmma accumulator), so no extra allowance is needed."""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8_reference
from mxrun.kernels.mid_m_gemm import MID_M_MIN
from mxrun.kernels.mxfp8_gemm import mxfp8_aligned_linear_reference, mxfp8_linear, mxfp8_linear_reference
from mxrun.kernels.mxfp8_quantize import MxScaleRule, quantize_mxfp8_reference
from mxrun.kernels.scaled_gemm import (
    BLOCK_SPLIT_K_MAX_M,
    W8A8_SPLIT_K_MAX_M,
    GemmInputError,
    fp8_block_gemm_reference,
    fp8_block_linear,
    fp8_block_linear_reference,
    fp8_gemm_reference,
    fp8_linear,
    fp8_linear_reference,
    fp8_weight_only_linear,
    fp8_weight_only_reference,
)
from mxrun.kernels.small_m_gemm import (
    SMALL_M_MAX,
    SplitKConfig,
    default_config,
    small_m_gemm_triton,
    split_k_for,
)

from .device_cases import HAS_CUDA, KERNEL_DEVICE
from .test_scaled_gemm import _dev, _inputs, assert_one_ulp, fp8_mma_slack

G = Fp8Granularity
SHAPES = [(1, 72, 544), (5, 130, 800), (16, 64, 512), (40, 96, 288)] + (
    [(7, 4096, 14336), (16, 10240, 8192)] if HAS_CUDA else []
)


@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES[:4])
def test_w8a8_prequantized_any_split(m, n, k, split_k) -> None:
    x, w, bias = _inputs(m, n, k, seed=11)
    qa = quantize_fp8_reference(x, G.PER_ROW)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    ref = fp8_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    a, sa, b, sb, bias_d = _dev(qa.data, qa.scale, qw.data, qw.scale, bias)
    out = small_m_gemm_triton(
        a, b, a_scale=sa, weight_scale=sb, bias=bias_d, out_dtype=torch.bfloat16, split_k=split_k
    )
    assert_one_ulp(out, ref)


@pytest.mark.parametrize("activation", ["token", "tensor"])
@pytest.mark.parametrize("weight_granularity", [G.PER_ROW, G.PER_TENSOR])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_fp8_linear_small_m(m, n, k, weight_granularity, activation) -> None:
    """Through the dispatcher: the split-K kernel up to ``W8A8_SPLIT_K_MAX_M`` rows (one ulp: mma.sync with an
    fp32 accumulator), the tile kernel beyond (wgmma's FP8 accumulator: its allowance on the GPU)."""
    x, w, bias = _inputs(m, n, k, seed=12)
    q = quantize_fp8_reference(w, weight_granularity)
    ref = fp8_linear_reference(x, q.data, q.scale, bias, activation)
    slack = fp8_mma_slack(x, w) if m > W8A8_SPLIT_K_MAX_M else None
    assert_one_ulp(fp8_linear(*_dev(x, q.data, q.scale, bias), activation, backend="triton"), ref, slack)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", [G.PER_ROW, G.PER_TENSOR])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_weight_only_small_m(m, n, k, granularity, dtype) -> None:
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=13)
    q = quantize_fp8_reference(w, granularity)
    ref = fp8_weight_only_reference(x, q.data, q.scale, granularity, bias)
    out = fp8_weight_only_linear(*_dev(x, q.data, q.scale), granularity, _dev(bias)[0], backend="triton")
    assert_one_ulp(out, ref)


def _scales_ahead(monkeypatch, ahead: bool) -> None:
    """Make the split-K kernel load each step's weight scales the step before (``ahead``) or in the step, for
    MX codes and 128x128 block scales alike, whatever the operands (the rule otherwise follows the MMA kind)."""
    import mxrun.kernels.small_m_gemm as small_m

    def rule(b_mx, blocked, mma, config):
        return (b_mx or blocked) and ahead and (b_mx or config.block_k == 128)

    monkeypatch.setattr(small_m, "scales_ahead", rule)


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("rule", [None, MxScaleRule.ROUND_UP, MxScaleRule.FLOOR])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_mxfp8_linear_small_m(m, n, k, rule, ahead, monkeypatch) -> None:
    """MXFP8 weight-only and W8A8 with ragged N and K and several splits, the codes loaded a step ahead or in
    their step."""
    _scales_ahead(monkeypatch, ahead)
    x, w, bias = _inputs(m, n, k, seed=14)
    q = quantize_mxfp8_reference(w)
    ref = mxfp8_linear_reference(x, q.data, q.scale_e8m0, bias, rule)
    assert_one_ulp(mxfp8_linear(*_dev(x, q.data, q.scale_e8m0, bias), rule, backend="triton"), ref)


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [*SHAPES, (3, 300, 416)])
def test_block_weight_only(m, n, k, dtype, split_k, ahead, monkeypatch) -> None:
    """128x128 weight blocks: each 128-wide K step's product times its block's scale (N and K ending inside a
    block, column blocks in either half of a block row), the scales loaded a step ahead or in their step; the
    scales multiply fp32 step sums instead of each weight, a difference of fp32 roundings within the ulp."""
    _scales_ahead(monkeypatch, ahead)
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=41)
    q = quantize_fp8_reference(w, G.BLOCK_128X128)
    ref = fp8_weight_only_reference(x, q.data, q.scale, G.BLOCK_128X128, bias)
    a, b, s, bias_d = _dev(x, q.data, q.scale, bias)
    assert_one_ulp(small_m_gemm_triton(a, b, weight_block_scale=s, bias=bias_d, split_k=split_k), ref)


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("step", [128, 256])
@pytest.mark.parametrize("split_k", [None, 1, 2])
@pytest.mark.parametrize(("m", "n", "k"), [*SHAPES, (3, 300, 416), (2, 64, 300)])
def test_block_w8a8_codes(m, n, k, split_k, step, ahead, monkeypatch) -> None:
    """1x128 activation groups (E4M3 codes) and 128x128 weight blocks in the fp16 MMA: each 128-wide part's
    product times the block's scale and each row's group scale (fp32 accumulation: no wgmma allowance), with K
    steps of one or two blocks (K = 300: the last step's second part lies past K); with 128-wide steps the
    scales loaded a step ahead or in their step."""
    _scales_ahead(monkeypatch, ahead)
    x, w, bias = _inputs(m, n, k, seed=42)
    qa = quantize_fp8_reference(x, G.GROUP_1X128)
    qw = quantize_fp8_reference(w, G.BLOCK_128X128)
    ref = fp8_block_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    a, sa, b, sb, bias_d = _dev(qa.data, qa.scale, qw.data, qw.scale, bias)
    config = default_config(torch.float8_e4m3fn, False, m, block_weight=True)._replace(block_k=step)
    out = small_m_gemm_triton(
        a,
        b,
        a_scale=sa,
        weight_block_scale=sb,
        bias=bias_d,
        out_dtype=torch.bfloat16,
        split_k=split_k,
        config=config,
    )
    assert_one_ulp(out, ref)


def _spy_split_k(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every split-K launch the dispatchers make."""
    import mxrun.kernels.small_m_gemm as small_m

    calls: list[dict] = []
    real = small_m.small_m_gemm_triton

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(small_m, "small_m_gemm_triton", spy)
    return calls


@pytest.mark.parametrize(("m", "n", "k"), [(1, 72, 544), (5, 130, 800), (32, 96, 288)])
def test_block_dispatchers_take_split_k(m, n, k, monkeypatch) -> None:
    """Up to BLOCK_SPLIT_K_MAX_M rows the block W8A8 and weight-only Linears run the split-K kernel with their
    block scales (not the tile kernels), within an ulp of their references."""
    calls = _spy_split_k(monkeypatch)
    x, w, bias = _inputs(m, n, k, seed=43)
    q = quantize_fp8_reference(w, G.BLOCK_128X128)
    args = _dev(x, q.data, q.scale, bias)
    assert m <= BLOCK_SPLIT_K_MAX_M
    assert_one_ulp(fp8_block_linear(*args, backend="triton"), fp8_block_linear_reference(x, *q, bias))
    ref = fp8_weight_only_reference(x, q.data, q.scale, G.BLOCK_128X128, bias)
    out = fp8_weight_only_linear(*args[:3], G.BLOCK_128X128, args[3], backend="triton")
    assert_one_ulp(out, ref)
    assert len(calls) == 2 and all(c["weight_block_scale"] is args[2] for c in calls)
    assert calls[0]["a_scale"].shape == (m, -(-k // 128)) and "a_scale" not in calls[1]


@pytest.mark.parametrize("rule", [None, MxScaleRule.ROUND_UP, MxScaleRule.FLOOR])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 72, 544), (16, 300, 416), (40, 96, 288)])
def test_tile_aligned_mx_weight_as_blocks(m, n, k, rule, monkeypatch) -> None:
    """A tile-aligned MXFP8 weight with its tile scales reaches the few-row kernels as block-scaled FP8 (each K
    step's product times its tile's power of two). W8A16: within an ulp of the MXFP8 reference of the same
    weight, as its element-wise decode is. W8A8: the aligned path at every M (activations over 1x128 groups with
    the MX rule, E4M3 codes in the split-K kernel up to BLOCK_SPLIT_K_MAX_M rows), within an ulp of the aligned
    reference, as above 64 rows."""
    from mxrun.kernels.mx_regroup import align_mxfp8, aligned_tile_scales

    calls = _spy_split_k(monkeypatch)
    x, w, bias = _inputs(m, n, k, seed=44)
    w = w * torch.logspace(-2, 1, n)[:, None].to(w.dtype)  # tiles whose blocks had different exponents
    q = quantize_mxfp8_reference(w)
    aligned = align_mxfp8(q.data, q.scale_e8m0)
    tiles = aligned_tile_scales(aligned.scale_e8m0, n, k)
    if rule is None:
        ref = mxfp8_linear_reference(x, aligned.data, aligned.scale_e8m0, bias, rule)
    else:
        ref = mxfp8_aligned_linear_reference(x, aligned.data, aligned.scale_e8m0, bias, rule)
    xd, wd, sd, bias_d, tiles_d = _dev(x, aligned.data, aligned.scale_e8m0, bias, tiles)
    out = mxfp8_linear(xd, wd, sd, bias_d, rule, backend="triton", weight_tile_scale=tiles_d)
    # W8A8 beyond the split-K kernel: the tile kernel's wgmma accumulator on the GPU
    slack = fp8_mma_slack(x, w) if rule is not None and m > BLOCK_SPLIT_K_MAX_M else None
    assert_one_ulp(out, ref, slack)
    split_k_rows = BLOCK_SPLIT_K_MAX_M if rule is not None else SMALL_M_MAX if not HAS_CUDA else MID_M_MIN - 1
    if m <= split_k_rows:  # (the interpreter has no mid-M kernel: W8A16 takes split-K up to 64 rows)
        assert len(calls) == 1 and calls[0]["weight_block_scale"] is tiles_d
        assert "weight_scale_e8m0" not in calls[0]
        assert (calls[0].get("a_scale") is not None) == (rule is not None)


def test_splits_are_deterministic_and_change_nothing_but_order() -> None:
    """Different split counts add the same exact products in another order: within an ulp of each other, and
    the same split count gives the same bits twice."""
    x, w, _ = _inputs(3, 96, 1024, seed=15)
    q = quantize_mxfp8_reference(w)
    a, b, s = _dev(x, q.data, q.scale_e8m0)
    one = small_m_gemm_triton(a, b, weight_scale_e8m0=s, split_k=1)
    four = small_m_gemm_triton(a, b, weight_scale_e8m0=s, split_k=4)
    assert_one_ulp(four, one)
    assert torch.equal(four, small_m_gemm_triton(a, b, weight_scale_e8m0=s, split_k=4))


def test_split_choice() -> None:
    assert split_k_for(4096, 14336) == 8  # 64 column blocks x 8 splits = 512 programs
    assert split_k_for(57344, 8192) == 1  # already 896 column blocks
    assert split_k_for(64, 256) == 1  # one K step: no split
    assert split_k_for(64, 1 << 20) == 32  # capped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_scale": None}, "exactly one of"),
        ({"rows": 65}, "at most 64 rows"),
        ({"a_fp8_without_scale": True}, "need a_scale and out_dtype"),
        ({"scale_shape": (3, 1)}, "1 or 64 elements"),
        ({"a_fp8_without_out_dtype": True}, "need a_scale and out_dtype"),
        ({"bf16_with_a_scale": True}, "a_scale goes with E4M3 activations only"),
        ({"blocks": (1, 2)}, "block scales must be fp32 \\(1, 1\\)"),
        ({"blocks": (1, 1), "config": "narrow k"}, "K steps a multiple of 128"),
        ({"blocks": (1, 1), "config": "wide n"}, "column blocks dividing 128"),
        ({"blocks": (1, 1), "codes_scale": (2, 2)}, "1x128 group scales \\(2, 1\\)"),
        ({"blocks": (1, 1), "codes_scale": (2, 1), "and_channel": True}, "exactly one of"),
        ({"codes_scale": (2, 3)}, "1 or 2 elements"),
    ],
)
def test_bad_inputs(kwargs, message) -> None:
    rows = kwargs.get("rows", 2)
    x = torch.randn(rows, 128, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    w = torch.randn(64, 128, device=KERNEL_DEVICE).to(torch.float8_e4m3fn)
    scale = torch.ones(kwargs.get("scale_shape", (64, 1)), device=KERNEL_DEVICE)
    if "weight_scale" in kwargs:
        scale = None
    extra = {}
    if kwargs.get("a_fp8_without_scale"):
        x = x.to(torch.float8_e4m3fn)
    if kwargs.get("bf16_with_a_scale"):
        extra.update(a_scale=torch.ones(rows, 1, device=KERNEL_DEVICE))
    if kwargs.get("a_fp8_without_out_dtype"):
        x = x.to(torch.float8_e4m3fn)
        extra.update(a_scale=torch.ones(rows, 1, device=KERNEL_DEVICE))
    if "codes_scale" in kwargs:  # E4M3 codes with these scales (1x128 groups of K = 128: [2, 1])
        x = x.to(torch.float8_e4m3fn)
        extra.update(
            a_scale=torch.ones(kwargs["codes_scale"], device=KERNEL_DEVICE), out_dtype=torch.bfloat16
        )
        if "blocks" not in kwargs:
            scale = torch.ones(64, 1, device=KERNEL_DEVICE)
    if "blocks" in kwargs:
        extra.update(weight_block_scale=torch.ones(kwargs["blocks"], device=KERNEL_DEVICE))
        scale = scale if kwargs.get("and_channel") else None
        tiles = {"narrow k": SplitKConfig(block_k=64), "wide n": SplitKConfig(block_n=256)}
        if "config" in kwargs:
            extra.update(config=tiles[kwargs["config"]])
    with pytest.raises(GemmInputError, match=message):
        small_m_gemm_triton(x, w, weight_scale=scale, **extra)


def test_last_arrival_resets_its_counters() -> None:
    """With several splits the last program of each column block to arrive sums the partials and sets the
    block's counter back to zero, so back-to-back launches (other shapes in between) give the same bits."""
    from mxrun.kernels.workspace import live_buffers

    x, w, _ = _inputs(4, 200, 1024, seed=17)
    q = quantize_fp8_reference(w, G.PER_ROW)
    a, b, s = _dev(x, q.data, q.scale)
    first = small_m_gemm_triton(a, b, weight_scale=s, split_k=4)
    other = small_m_gemm_triton(
        a[:, :512].contiguous(), b[:96, :512].contiguous(), weight_scale=s[:96], split_k=2
    )
    assert other.shape == (4, 96)
    assert torch.equal(first, small_m_gemm_triton(a, b, weight_scale=s, split_k=4))
    counters = live_buffers(a.device, "split-k arrivals")
    assert counters and all(int(t.abs().sum()) == 0 for t in counters)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arena_left", [True, False])
def test_graph_capture_takes_counters_from_the_arena(arena_left, monkeypatch) -> None:
    """A split-K call first made while a CUDA graph is captured (on a stream nothing ran on before) takes its
    arrival counters from the zeroed arena that a call outside the capture made, and keeps them for that
    stream: the graph does not zero them itself (it held a memset node per call before, about 1 us each at
    replay), so a count planted before a replay is still there after it. With the arena used up the counters
    come from the graph's pool (zeroed by the graph) and are not kept. Replays give the eager call's bits."""
    from mxrun.kernels import workspace

    splits = 4
    x, w, _ = _inputs(4, 1024, 2048, seed=3)
    q = quantize_fp8_reference(w, G.PER_ROW)
    a, b, s = _dev(x, q.data, q.scale)
    eager = small_m_gemm_triton(a, b, weight_scale=s, split_k=splits)  # outside a capture: makes the arena
    arena = workspace._ARENAS[a.device]
    if not arena_left:
        monkeypatch.setitem(workspace._ARENAS, a.device, [arena[0], arena[0].numel()])
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = small_m_gemm_triton(a, b, weight_scale=s, split_k=splits)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    kept = workspace._BUFFERS.get((a.device, stream.cuda_stream, "split-k arrivals"))
    if not arena_left:
        assert kept is None
        return
    assert kept is not None and kept.untyped_storage().data_ptr() == arena[0].untyped_storage().data_ptr()
    assert int(kept.abs().sum()) == 0
    kept[0] = 100  # no program of column block 0 then counts itself last: the count only grows
    graph.replay()
    torch.cuda.synchronize()
    assert int(kept[0]) == 100 + splits
    kept.zero_()


@pytest.mark.parametrize("ahead", [True, False])
@pytest.mark.parametrize("spread", [12, 40, 130])
def test_mx_with_far_apart_block_scales(spread, ahead, monkeypatch) -> None:
    """MX blocks whose scales lie far apart (2^-spread, on both sides, down to fp32/bf16 subnormal weights and
    activations) stay within one ulp of the W8A8 reference: the decoded values are exact wherever bf16 holds
    them, as in the reference (each step's codes loaded a step ahead or in their step)."""
    _scales_ahead(monkeypatch, ahead)
    x, w, bias = _inputs(5, 96, 512, seed=19)
    block = torch.arange(512) // 32
    far = torch.where(block % 4 == 1, 2.0**-spread, 1.0) * torch.where(
        block % 4 == 3, 2.0 ** -(spread // 2), 1.0
    )
    x, w = x * far.to(x.dtype), w * far.to(w.dtype)
    q = quantize_mxfp8_reference(w)
    ref = mxfp8_linear_reference(x, q.data, q.scale_e8m0, bias, MxScaleRule.ROUND_UP)
    a, b, s, bias_d = _dev(x, q.data, q.scale_e8m0, bias)
    out = small_m_gemm_triton(a, b, weight_scale_e8m0=s, activation_mx_rule="round_up", bias=bias_d)
    assert_one_ulp(out, ref)


@pytest.mark.parametrize("rule", ["round_up", "floor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "split_k"), [(96, 256, None), (130, 384, 2), (64, 512, 1)])
def test_one_row_rounded_in_the_loop_gives_the_pass_bits(monkeypatch, rule, dtype, n, k, split_k) -> None:
    """MXFP8 W8A8 with one row: rounding the row inside the split-K loop, each step's slice as it is loaded,
    gives bit for bit what the separate rounding pass gives (the same rounding arithmetic, the same MMAs), for
    both scale rules, bf16 and fp16, tiny, huge, NaN and infinite activations, ragged N and any split; and
    within one ulp of the W8A8 reference where the row is finite."""
    from mxrun.kernels import small_m_gemm

    x, w, bias = _inputs(1, n, k, dtype=dtype, seed=23)
    x[0, :32] *= 2.0**-30  # a block far below the rest
    x[0, 40] = 300.0
    x[0, 64] = float("inf")  # its block's outputs are NaN either way
    x[0, 100] = float("nan")
    q = quantize_mxfp8_reference(w)
    a, b, s, bias_d = _dev(x, q.data, q.scale_e8m0, bias)
    passes = []
    real_pass = small_m_gemm.mx_round_triton
    monkeypatch.setattr(
        small_m_gemm,
        "mx_round_triton",
        lambda *args, **kwargs: passes.append(1) or real_pass(*args, **kwargs),
    )
    outs = []
    for in_loop in (False, True):
        monkeypatch.setattr(small_m_gemm, "ROUND_ONE_ROW_IN_LOOP", in_loop)
        outs.append(
            small_m_gemm_triton(
                a, b, weight_scale_e8m0=s, activation_mx_rule=rule, bias=bias_d, split_k=split_k
            )
        )
    assert len(passes) == 1  # the separate pass ran for the first call only
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    finite = x.clone()
    finite[0, 64:128] = 0.0
    a = _dev(finite, q.data, q.scale_e8m0, bias)[0]
    out = small_m_gemm_triton(
        a, b, weight_scale_e8m0=s, activation_mx_rule=rule, bias=bias_d, split_k=split_k
    )
    assert_one_ulp(out, mxfp8_linear_reference(finite, q.data, q.scale_e8m0, bias, MxScaleRule(rule)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "split_k"), [(96, 4160, None), (130, 4352, 2), (64, 4608, 1)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_one_row_quantized_in_the_loop_gives_the_pass_bits(
    monkeypatch, dtype, n, k, split_k, per_channel
) -> None:
    """FP8 W8A8 with one row: each program finding the row's per-token scale and encoding its slices inside the
    split-K kernel gives bit for bit what the per-token quantize launch and the codes kernel give (the same
    amax, scale and encoding arithmetic, the same MMAs), for bf16 and fp16, tiny, huge, NaN and infinite
    activations, per-tensor and per-channel weights, ragged N and any split; and fp8_linear takes it at one row
    for both activation rules, within one ulp of the reference."""
    from mxrun.kernels import small_m_gemm
    from mxrun.kernels.fp8_quantize import Fp8Granularity as G

    x, w, bias = _inputs(1, n, k, dtype=dtype, seed=29)
    x[0, :16] *= 2.0**-40
    x[0, 7] = 3000.0
    q = quantize_fp8_reference(w, G.PER_ROW if per_channel else G.PER_TENSOR)
    a, b, s, bias_d = _dev(x, q.data, q.scale, bias)
    config = small_m_gemm.default_config(torch.float8_e4m3fn, False, 1, False, n)
    assert small_m_gemm.quantizes_row_in_loop(1, n, k, config, split_k)  # the case takes the in-kernel path
    outs = []
    for in_loop in (False, True):
        monkeypatch.setattr(small_m_gemm, "QUANTIZE_ONE_ROW_IN_LOOP", in_loop)
        outs.append(
            small_m_gemm_triton(a, b, weight_scale=s, bias=bias_d, split_k=split_k, quantize_rows=True)
        )
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
    for special in (float("nan"), float("inf")):  # the row's scale NaN / Inf: the same bits either way
        bad = x.clone()
        bad[0, k // 2] = special
        a_bad = _dev(bad, q.data, q.scale, bias)[0]
        got = small_m_gemm_triton(a_bad, b, weight_scale=s, bias=bias_d, split_k=split_k, quantize_rows=True)
        monkeypatch.setattr(small_m_gemm, "QUANTIZE_ONE_ROW_IN_LOOP", False)
        want = small_m_gemm_triton(a_bad, b, weight_scale=s, bias=bias_d, split_k=split_k, quantize_rows=True)
        monkeypatch.setattr(small_m_gemm, "QUANTIZE_ONE_ROW_IN_LOOP", True)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    from mxrun.kernels import scaled_gemm

    def no_pass(*args, **kwargs):
        raise AssertionError("the quantize launch ran")

    monkeypatch.setattr(small_m_gemm, "quantize_fp8", no_pass)
    monkeypatch.setattr(scaled_gemm, "quantize_fp8", no_pass)
    for activation in ("token", "tensor"):
        out = fp8_linear(a, b, s, bias_d, activation, backend="triton")
        assert_one_ulp(out, fp8_linear_reference(x, q.data, q.scale, bias, activation))


def test_pdl_follows_only_the_short_passes(monkeypatch) -> None:
    """``PDL_AFTER_PASS``'s rule: the per-token quantize lets the GEMM start early only where it is not the
    row-chunks kernel (rows of up to 4096 columns), and a row quantized inside the GEMM has no pass to follow."""
    from mxrun.kernels import small_m_gemm

    monkeypatch.setattr(small_m_gemm, "pdl_usable", lambda device: True)
    taken = []

    def launch(kind):
        def stop(*args, **kwargs):
            taken.append((kind, kwargs.get("launch_dependents", False)))
            raise StopIteration

        return stop

    monkeypatch.setattr(small_m_gemm, "quantize_fp8_triton", launch("early"))
    monkeypatch.setattr(small_m_gemm, "quantize_fp8", launch("plain"))
    for m, k, want in ((16, 4096, "early"), (1, 4096, "early"), (16, 14336, "plain"), (1, 28672, "plain")):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        w = torch.zeros(64, k, dtype=torch.float8_e4m3fn)
        with pytest.raises(StopIteration):
            small_m_gemm_triton(x, w, weight_scale=torch.ones(64, 1), quantize_rows=True)
        assert taken[-1] == (want, want == "early"), (m, k)
    monkeypatch.setattr(small_m_gemm, "PDL_AFTER_PASS", False)
    x, w = torch.randn(16, 4096, dtype=torch.bfloat16), torch.zeros(64, 4096, dtype=torch.float8_e4m3fn)
    with pytest.raises(StopIteration):
        small_m_gemm_triton(x, w, weight_scale=torch.ones(64, 1), quantize_rows=True)
    assert taken[-1] == ("plain", False)


@pytest.mark.parametrize(("value", "allowed"), [("0", False), ("", False), ("1", True), (None, True)])
def test_mxrun_pdl_env_turns_the_dependent_launches_off(value, allowed) -> None:
    """``MXRUN_PDL=0`` (or empty) is read at import and makes ``pdl_usable`` say no on any device."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MXRUN_PDL"}
    if value is not None:
        env["MXRUN_PDL"] = value
    code = "import mxrun.kernels.backend as b; print(b._PDL_ALLOWED)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(allowed)


@pytest.mark.skipif(not HAS_CUDA, reason="programmatic dependent launch needs an sm_90+ GPU")
@pytest.mark.parametrize(
    ("m", "n", "k"), [(16, 4096, 4096), (16, 4096, 14336), (4, 130, 4160), (1, 96, 4096)]
)
def test_pdl_after_the_activation_pass_gives_the_same_bits(monkeypatch, m, n, k) -> None:
    """``PDL_AFTER_PASS``: the GEMM as a programmatic dependent launch of the per-token quantize / the MX rounding
    (waiting for them before it reads anything) gives the bits of the ordinary launches, eagerly and replayed
    from a CUDA graph, where the pass rewrites its output between replays."""
    from mxrun.kernels import small_m_gemm
    from mxrun.kernels.backend import pdl_usable

    if not pdl_usable(torch.device(KERNEL_DEVICE)):
        pytest.skip("needs sm_90+ and a Triton with griddepcontrol")
    x, w, bias = _inputs(m, n, k, seed=37)
    q = quantize_fp8_reference(w, G.PER_ROW)
    mx = quantize_mxfp8_reference(w)
    a, b, s, bias_d, mx_w, mx_s = _dev(x, q.data, q.scale, bias, mx.data, mx.scale_e8m0)
    calls = {
        "per-token": lambda a: small_m_gemm_triton(a, b, weight_scale=s, bias=bias_d, quantize_rows=True),
        "mx": lambda a: small_m_gemm_triton(a, mx_w, weight_scale_e8m0=mx_s, activation_mx_rule="round_up"),
    }
    for name, call in calls.items():
        monkeypatch.setattr(small_m_gemm, "PDL_AFTER_PASS", False)
        want = call(a)
        monkeypatch.setattr(small_m_gemm, "PDL_AFTER_PASS", True)
        assert torch.equal(call(a).view(torch.int16), want.view(torch.int16)), name
        source = torch.zeros_like(a)
        call(source)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(source)
        for inputs in (a, a * 3.0):
            source.copy_(inputs)
            graph.replay()
            monkeypatch.setattr(small_m_gemm, "PDL_AFTER_PASS", False)
            expected = call(inputs)
            monkeypatch.setattr(small_m_gemm, "PDL_AFTER_PASS", True)
            assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), name


def test_quantizes_row_in_loop_only_one_row_read_whole_in_one_wave() -> None:
    """The in-kernel per-token quantize takes one row of more than ROW_CHUNKS_MIN_COLS (whose quantize launch
    costs most) and at most QUANTIZE_ROW_MAX_K columns (each program reads it whole), and launches whose
    programs fit the config's target."""
    from mxrun.kernels.fp8_quantize import ROW_CHUNKS_MIN_COLS
    from mxrun.kernels.small_m_gemm import FP16_MMA_CONFIG, QUANTIZE_ROW_MAX_K, quantizes_row_in_loop

    cfg, long_row = FP16_MMA_CONFIG, ROW_CHUNKS_MIN_COLS + 128
    assert quantizes_row_in_loop(1, 4096, QUANTIZE_ROW_MAX_K, cfg) and quantizes_row_in_loop(
        1, 4096, long_row, cfg
    )
    assert not quantizes_row_in_loop(1, 4096, ROW_CHUNKS_MIN_COLS, cfg)
    assert not quantizes_row_in_loop(2, 4096, long_row, cfg)
    assert not quantizes_row_in_loop(1, 4096, QUANTIZE_ROW_MAX_K + 128, cfg)
    wide = cfg.block_n * (cfg.target_programs + 1)  # one split each, one too many
    assert not quantizes_row_in_loop(1, wide, long_row, cfg, split_k=1)
    assert quantizes_row_in_loop(1, wide - cfg.block_n, long_row, cfg, split_k=1)


def test_rounds_in_loop_only_one_row_in_one_short_wave() -> None:
    """The in-loop rounding takes one row only, and launches whose programs fit the config's target (one wave
    beside the pass kernel's registers) and walk at most ROUND_IN_LOOP_MAX_STEPS K steps each."""
    from mxrun.kernels.small_m_gemm import DEFAULT_CONFIG, ROUND_IN_LOOP_MAX_STEPS, rounds_in_loop

    target = DEFAULT_CONFIG.target_programs
    assert rounds_in_loop(1, target, ROUND_IN_LOOP_MAX_STEPS, DEFAULT_CONFIG)
    assert not rounds_in_loop(2, target, ROUND_IN_LOOP_MAX_STEPS, DEFAULT_CONFIG)
    assert not rounds_in_loop(1, target + 1, 4, DEFAULT_CONFIG)
    assert not rounds_in_loop(1, 64, ROUND_IN_LOOP_MAX_STEPS + 1, DEFAULT_CONFIG)


@pytest.mark.parametrize(
    ("name", "limit"),
    [("NVIDIA H100 80GB HBM3", "ROUND_IN_LOOP_MAX_STEPS"), ("NVIDIA H200", "ROUND_IN_LOOP_MAX_STEPS_H200")],
)
def test_round_in_loop_steps_limit_is_the_chips(monkeypatch, name, limit) -> None:
    """The H200 takes its own (shorter) step limit, measured apart from the H100's; no device, the H100's."""
    from mxrun.kernels import small_m_gemm

    monkeypatch.setattr(small_m_gemm, "device_name", lambda device: name)
    steps = getattr(small_m_gemm, limit)
    cuda = torch.device("cuda", 0)
    assert small_m_gemm.ROUND_IN_LOOP_MAX_STEPS_H200 < small_m_gemm.ROUND_IN_LOOP_MAX_STEPS
    assert small_m_gemm.round_in_loop_max_steps(cuda) == steps
    cfg = small_m_gemm.DEFAULT_CONFIG
    assert small_m_gemm.rounds_in_loop(1, 64, steps, cfg, cuda)
    assert not small_m_gemm.rounds_in_loop(1, 64, steps + 1, cfg, cuda)
    assert small_m_gemm.round_in_loop_max_steps(None) == small_m_gemm.ROUND_IN_LOOP_MAX_STEPS


def test_default_tile_by_operand_kind() -> None:
    """fp16 MMAs (E4M3 codes, fp16 activations) and bf16 MMAs get the tiles measured best for them up to 16
    rows; decoding MX weights, and 32- or 64-row tiles, keep the default (they need the registers)."""
    from mxrun.kernels.small_m_gemm import (
        BF16_MMA_CONFIG,
        BLOCK_FP16_MMA_STEP,
        DEFAULT_CONFIG,
        FP16_MMA_CONFIG,
        NARROW_N,
        NARROW_TARGET_PROGRAMS,
        default_config,
    )

    assert default_config(torch.float8_e4m3fn, mx_weight=False) is FP16_MMA_CONFIG
    assert default_config(torch.float16, mx_weight=False) is FP16_MMA_CONFIG
    assert default_config(torch.bfloat16, mx_weight=False) is BF16_MMA_CONFIG
    assert default_config(torch.bfloat16, mx_weight=True) is DEFAULT_CONFIG
    assert default_config(torch.float8_e4m3fn, mx_weight=False, m=16) is FP16_MMA_CONFIG
    assert default_config(torch.float8_e4m3fn, mx_weight=False, m=17) is DEFAULT_CONFIG
    assert default_config(torch.bfloat16, mx_weight=False, m=64) is DEFAULT_CONFIG
    assert FP16_MMA_CONFIG != BF16_MMA_CONFIG != DEFAULT_CONFIG
    # 128x128 blocks: K steps of BLOCK_FP16_MMA_STEP (each 128-wide part in one block), the bf16 tile as it is
    blocks = default_config(torch.float8_e4m3fn, mx_weight=False, block_weight=True)
    assert blocks == FP16_MMA_CONFIG._replace(block_k=BLOCK_FP16_MMA_STEP) and blocks.block_k % 128 == 0
    assert default_config(torch.bfloat16, mx_weight=False, block_weight=True) is BF16_MMA_CONFIG
    # E4M3 codes on narrow per-tensor / per-channel layers: two programs per SM; not blocks, not fp16 values
    narrow = default_config(torch.float8_e4m3fn, mx_weight=False, n=NARROW_N)
    assert narrow == FP16_MMA_CONFIG._replace(target_programs=NARROW_TARGET_PROGRAMS) != FP16_MMA_CONFIG
    assert default_config(torch.float8_e4m3fn, mx_weight=False, n=NARROW_N + 1) is FP16_MMA_CONFIG
    assert default_config(torch.float16, mx_weight=False, n=NARROW_N) is FP16_MMA_CONFIG
    assert default_config(torch.float8_e4m3fn, mx_weight=False, block_weight=True, n=NARROW_N) == blocks
    assert 128 % BF16_MMA_CONFIG.block_n == 0 and BF16_MMA_CONFIG.block_k == 128


needs_sm90 = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="the folded MX decode is PTX for sm_90+"
)


@needs_sm90
@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 72, 544), (5, 130, 800), (16, 64, 512), (40, 96, 288), (7, 4096, 14336)]
)
@pytest.mark.parametrize("codes", ["every", "realistic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_scale_fold_gives_the_same_bits(m, n, k, split_k, codes, dtype) -> None:
    """MX weights whose power of two is folded into the E4M3 conversion give bit for bit the output of the fp32
    decode (all form exactly E4M3 * 2^(e - 127) in the MMA's type): bf16 activations over every code the bf16
    fold takes (0-142, subnormal and huge weights included), fp16 ones over every code the fp16 fold takes
    (113-134), and both over the codes real weights have, with MX-rounded activations, bias, ragged N and K
    and any split."""
    from mxrun.kernels.e4m3 import (
        MX_FOLD16_MAX_CODE,
        MX_FOLD16_MIN_CODE,
        MX_FOLD_MAX_CODE,
        mx_scales_foldable,
        mx_scales_foldable_f16,
    )

    fp16 = dtype == torch.float16
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=21)
    q = quantize_mxfp8_reference(w)
    g = torch.Generator().manual_seed(22)
    if codes == "every":  # any E8M0 code makes a valid MXFP8 weight; small activations keep outputs finite
        low, high = (MX_FOLD16_MIN_CODE, MX_FOLD16_MAX_CODE) if fp16 else (0, MX_FOLD_MAX_CODE)
        scales = torch.randint(low, high + 1, q.scale_e8m0.shape, generator=g, dtype=torch.uint8)
        x = x * (2.0**-16 if fp16 else 2.0**-20)
    else:
        scales = q.scale_e8m0
    assert mx_scales_foldable_f16(scales) if fp16 else mx_scales_foldable(scales, q.data)
    a, b, s, bias_d = _dev(x, q.data, scales, bias)
    run = lambda fold: small_m_gemm_triton(  # noqa: E731
        a,
        b,
        weight_scale_e8m0=s,
        activation_mx_rule="round_up",
        bias=bias_d,
        split_k=split_k,
        mx_scale_fold=fold and not fp16,
        mx_scale_fold16=fold and fp16,
    )
    folded, plain = run(True), run(False)
    assert torch.equal(folded.view(torch.int16), plain.view(torch.int16))
    if codes == "realistic":
        assert_one_ulp(folded, mxfp8_linear_reference(x, q.data, scales, bias, MxScaleRule.ROUND_UP))


def test_mx_scales_foldable_f16() -> None:
    """The fp16 fold takes E8M0 codes 113-134 (2^-14 ... 2^7): below, E4M3's smallest step would fall under
    fp16's; above, 448 times the scale would pass fp16's largest value."""
    from mxrun.kernels.e4m3 import MX_FOLD16_MAX_CODE, MX_FOLD16_MIN_CODE, mx_scales_foldable_f16

    assert (MX_FOLD16_MIN_CODE, MX_FOLD16_MAX_CODE) == (113, 134)
    assert torch.finfo(torch.float16).max >= 448.0 * 2.0 ** (MX_FOLD16_MAX_CODE - 127)
    assert torch.finfo(torch.float16).max < 448.0 * 2.0 ** (MX_FOLD16_MAX_CODE + 1 - 127)
    assert (
        2.0**-9 * 2.0 ** (MX_FOLD16_MIN_CODE - 127) >= 2.0**-24
    )  # the smallest E4M3 subnormal, times the scale
    codes = torch.arange(MX_FOLD16_MIN_CODE, MX_FOLD16_MAX_CODE + 1, dtype=torch.uint8)
    assert mx_scales_foldable_f16(codes)
    assert mx_scales_foldable_f16(codes.view(torch.float8_e8m0fnu))
    for outside in (0, MX_FOLD16_MIN_CODE - 1, MX_FOLD16_MAX_CODE + 1, 255):
        assert not mx_scales_foldable_f16(torch.cat([codes, torch.tensor([outside], dtype=torch.uint8)]))


def test_mx_scales_foldable() -> None:
    """The fold's multiplier 2^(e - 15) is a bf16 normal up to code 142: above it (and for the NaN code), or
    with a NaN element (the widening does not keep it NaN), the weight must take the fp32 decode."""
    from mxrun.kernels.e4m3 import MX_FOLD_MAX_CODE, mx_scales_foldable

    codes = torch.arange(0, MX_FOLD_MAX_CODE + 1, dtype=torch.uint8)
    assert mx_scales_foldable(codes)
    assert not mx_scales_foldable(torch.cat([codes, torch.tensor([MX_FOLD_MAX_CODE + 1], dtype=torch.uint8)]))
    assert not mx_scales_foldable(torch.tensor([255], dtype=torch.uint8).view(torch.float8_e8m0fnu))
    data = torch.zeros(8, dtype=torch.uint8)
    assert mx_scales_foldable(codes, data.view(torch.float8_e4m3fn))
    data[3] = 0x7F  # an E4M3 NaN element under a finite scale
    assert not mx_scales_foldable(codes, data.view(torch.float8_e4m3fn))


def split_k_operands(kind: str, m: int, n: int, k: int, seed: int) -> tuple:
    """Activations, weight, bias and keyword scales (on the kernel device) of one operand kind: ``codes`` (E4M3
    per-token codes, per-channel weight), ``bf16-weight-only`` / ``fp16-weight-only`` (per-channel weight),
    ``mx-bf16`` / ``mx-fp16`` (MXFP8 weight with its fold where the weight allows it) and ``mx-fp32`` (bf16
    activations, no fold)."""
    from mxrun.kernels.e4m3 import mx_scales_foldable, mx_scales_foldable_f16

    dtype = torch.float16 if kind in ("fp16-weight-only", "mx-fp16") else torch.bfloat16
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=seed)
    if kind.startswith("mx"):
        q = quantize_mxfp8_reference(w)
        a, b, s, bias_d = _dev(x, q.data, q.scale_e8m0, bias)
        fold = kind == "mx-bf16" and mx_scales_foldable(q.scale_e8m0, q.data)
        fold16 = kind == "mx-fp16" and mx_scales_foldable_f16(q.scale_e8m0)
        return a, b, bias_d, dict(weight_scale_e8m0=s, mx_scale_fold=fold, mx_scale_fold16=fold16)
    q = quantize_fp8_reference(w, G.PER_ROW)
    a, b, s, bias_d = _dev(x, q.data, q.scale, bias)
    kwargs = dict(weight_scale=s)
    if kind == "codes":
        qa = quantize_fp8_reference(x, G.PER_ROW)
        a, sa = _dev(qa.data, qa.scale)
        kwargs.update(a_scale=sa, out_dtype=torch.bfloat16)
    return a, b, bias_d, kwargs


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="TMA loads need sm_90+")
@pytest.mark.parametrize("split_k", [None, 3])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 72, 544), (5, 130, 800), (16, 200, 4128), (3, 96, 72)])
@pytest.mark.parametrize(
    "kind", ["codes", "fp16-weight-only", "bf16-weight-only", "mx-bf16", "mx-fp16", "mx-fp32"]
)
def test_weight_by_tma_gives_the_same_bits(m, n, k, split_k, kind) -> None:
    """The weight read by TMA (zeros filled in by the hardware past N and K) and by masked pointer loads give the
    same output bit for bit, for every operand kind, ragged N, K not a multiple of the K step and any split; a
    weight whose rows are not 16-byte aligned (K = 72) is read by pointers whatever is asked."""
    if kind.startswith("mx") and k % 32:
        pytest.skip("MXFP8 needs K % 32 == 0")
    a, b, bias_d, kwargs = split_k_operands(kind, m, n, k, seed=31)
    assert (
        not kind.startswith("mx") or kwargs["mx_scale_fold"] or kwargs["mx_scale_fold16"] or kind == "mx-fp32"
    )
    run = lambda tma: small_m_gemm_triton(  # noqa: E731
        a, b, bias=bias_d, split_k=split_k, weight_tma=tma, **kwargs
    )
    by_tma, by_pointers = run(True), run(False)
    assert torch.equal(by_tma.view(torch.int16), by_pointers.view(torch.int16))
    assert bool(torch.isfinite(by_tma).all()) and by_tma.abs().max() > 0


def test_scales_ahead_where_measured_faster() -> None:
    """Codes of MX weights are loaded a step ahead whatever the MMA; 128x128 block scales only beside a bf16
    MMA (weight-only) with one block per step; E4M3 codes in the fp16 MMA keep the loads in their step."""
    from mxrun.kernels.small_m_gemm import BF16_MMA_CONFIG, FP16_MMA_CONFIG, scales_ahead

    assert scales_ahead(True, False, 1, BF16_MMA_CONFIG) and scales_ahead(True, False, 2, FP16_MMA_CONFIG)
    assert scales_ahead(False, True, 1, BF16_MMA_CONFIG._replace(block_k=128))
    assert not scales_ahead(False, True, 2, FP16_MMA_CONFIG._replace(block_k=128))
    assert not scales_ahead(False, True, 1, BF16_MMA_CONFIG._replace(block_k=256))
    assert not scales_ahead(False, False, 1, BF16_MMA_CONFIG)


@pytest.mark.parametrize("split_k", [None, 3])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 72, 544), (5, 130, 800), (16, 200, 4128)])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("kind", ["codes", "bf16-weight-only", "mx-bf16"])
def test_box_major_weight_gives_the_same_bits(m, n, k, split_k, tma, kind) -> None:
    """The weight read box-major (:class:`~mxrun.kernels.box_major.BoxMajorWeight`, by TMA or by pointers)
    gives the row-major read's output bit for bit: ragged N and K (zeros stored past them), any split."""
    from mxrun.kernels.box_major import BoxMajorWeight

    if tma and (not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9):
        pytest.skip("TMA loads need sm_90+")
    mx = kind.startswith("mx")
    if mx and k % 32:
        pytest.skip("MXFP8 needs K % 32 == 0")
    a, b, bias_d, kwargs = split_k_operands(kind, m, n, k, seed=37)
    config = default_config(a.dtype, mx, m, False, n)
    if not HAS_CUDA:  # small tiles: several boxes per program under the interpreter
        config = config._replace(block_n=32, block_k=64)
    run = lambda weight: small_m_gemm_triton(  # noqa: E731
        a, weight, bias=bias_d, split_k=split_k, weight_tma=tma, config=config, **kwargs
    )
    by_rows, by_boxes = run(b), run(BoxMajorWeight.of(b, config.block_n, config.block_k))
    assert torch.equal(by_boxes.view(torch.int16), by_rows.view(torch.int16))
    assert bool(torch.isfinite(by_boxes).all()) and by_boxes.abs().max() > 0


def test_box_major_weight_bad_inputs() -> None:
    from mxrun.kernels.box_major import BoxMajorWeight

    x = torch.randn(2, 256, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    w = torch.randn(64, 256, device=KERNEL_DEVICE).to(torch.float8_e4m3fn)
    scale = torch.ones(64, 1, device=KERNEL_DEVICE)
    config = SplitKConfig(block_n=32, block_k=128)
    with pytest.raises(GemmInputError, match=r"\[32, 64\] boxes must be the tile \[32, 128\]"):
        small_m_gemm_triton(x, BoxMajorWeight.of(w, 32, 64), weight_scale=scale, config=config)
    wrong_rows = BoxMajorWeight.of(w, 32, 128)._replace(n=100)
    with pytest.raises(GemmInputError, match=r"a box-major \[100, 256\] weight"):
        small_m_gemm_triton(x, wrong_rows, weight_scale=scale, config=config)
    with pytest.raises(GemmInputError, match="goes with per-tensor / per-channel and MXFP8 scales"):
        small_m_gemm_triton(
            x,
            BoxMajorWeight.of(w, 32, 128),
            weight_block_scale=torch.ones(1, 2, device=KERNEL_DEVICE),
            config=config,
        )


@pytest.mark.parametrize("rule", [None, MxScaleRule.ROUND_UP])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 72, 544), (16, 130, 800), (40, 96, 256), (70, 96, 256)])
def test_mxfp8_linear_takes_a_box_major_weight(m, n, k, rule) -> None:
    """:func:`mxfp8_linear` on a box-major weight gives the row-major weight's bits at every row count: the
    few-row kernels read the boxes, the large-M paths (here from 65 rows) a row-major copy; a tile-aligned
    weight is refused."""
    from mxrun.kernels.box_major import BoxMajorWeight

    x, w, bias = _inputs(m, n, k, seed=39)
    q = quantize_mxfp8_reference(w)
    a, b, s, bias_d = _dev(x, q.data, q.scale_e8m0, bias)
    rows = mxfp8_linear(a, b, s, bias_d, rule, backend="triton")
    boxes = mxfp8_linear(a, BoxMajorWeight.of(b), s, bias_d, rule, backend="triton")
    assert torch.equal(boxes.view(torch.int16), rows.view(torch.int16))
    with pytest.raises(GemmInputError, match=r"tile-aligned weight \(weight_tile_scale\) is held row-major"):
        mxfp8_linear(a, BoxMajorWeight.of(b), s, bias_d, rule, weight_tile_scale=torch.ones(1, 1))
