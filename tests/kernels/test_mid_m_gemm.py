"""The mid-M W8A16 GEMM (weight tile as the MMA's register operand) against the plain-torch references of every
scheme it serves: FP8 weight-only per-tensor / per-channel / 128x128 blocks with bf16 and fp16 activations, MXFP8
weight-only and W8A8 (activations MX-rounded first) with both scale rules, with bias, ragged M and N, K not a
multiple of the K step, several splits; on the GPU also through the Linear dispatchers at the sizes they send
here. Without a GPU, the kernel's sm_90 PTX is checked for the per-step wait its register operand needs.

Tolerance: one output ulp, as in test_scaled_gemm.py. Every product is exact in fp32 (E4M3 values times a power
of two, bf16/fp16 activations), bf16/fp16 MMAs accumulate in fp32 and the splits are added in fp32 in split
order, so only the summation order differs from the references (block scales multiply each step's fp32 sum
instead of each weight, a difference of fp32 roundings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8_reference
from mxrun.kernels.fp8_wgmma_gemm import WGMMA_MIN_M
from mxrun.kernels.mid_m_gemm import (
    BLOCK_W8A8_MID_M_MAX,
    MID_M_MAX,
    MID_M_MIN,
    MX_MID_M_MAX,
    W8A8_MID_M_MAX,
    config_for,
    mid_m_gemm_triton,
    split_k_for,
)
from mxrun.kernels.mxfp8_gemm import mxfp8_linear, mxfp8_linear_reference
from mxrun.kernels.mxfp8_quantize import MxScaleRule, quantize_mxfp8_reference
from mxrun.kernels.scaled_gemm import (
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

from .device_cases import HAS_CUDA, KERNEL_DEVICE, gpu_only
from .test_scaled_gemm import _dev, _inputs, assert_one_ulp, fp8_mma_slack
from .test_small_m_gemm import split_k_operands

G = Fp8Granularity
# (M, N, K): ragged M and N, K = 544 and 800 end inside a 128-wide step, 288 is shorter than four steps
SHAPES = [(33, 72, 544), (70, 130, 800), (130, 64, 288)]
GPU_SHAPES = [(128, 4096, 4096), (250, 6144, 4096), (96, 10240, 8192), (40, 4096, 14336), (512, 4096, 14336)]


@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", [G.PER_ROW, G.PER_TENSOR])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_fp8_weight_only(m, n, k, granularity, dtype, split_k) -> None:
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=31)
    q = quantize_fp8_reference(w, granularity)
    ref = fp8_weight_only_reference(x, q.data, q.scale, granularity, bias)
    a, b, s, bias_d = _dev(x, q.data, q.scale, bias)
    assert_one_ulp(mid_m_gemm_triton(a, b, weight_scale=s, bias=bias_d, split_k=split_k), ref)


@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [*SHAPES, (40, 300, 416)])
def test_fp8_block_weight_only(m, n, k, dtype, split_k) -> None:
    """128x128 weight blocks: each 128-wide K step's product times its block's scale (N and K ending inside a
    block, a 64-row tile in either half of a block)."""
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=36)
    q = quantize_fp8_reference(w, G.BLOCK_128X128)
    ref = fp8_weight_only_reference(x, q.data, q.scale, G.BLOCK_128X128, bias)
    a, b, s, bias_d = _dev(x, q.data, q.scale, bias)
    assert_one_ulp(mid_m_gemm_triton(a, b, weight_block_scale=s, bias=bias_d, split_k=split_k), ref)


@pytest.mark.parametrize("split_k", [None, 2])
@pytest.mark.parametrize("rule", [None, MxScaleRule.ROUND_UP, MxScaleRule.FLOOR])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_mxfp8(m, n, k, rule, split_k) -> None:
    x, w, bias = _inputs(m, n, k, seed=32)
    q = quantize_mxfp8_reference(w)
    ref = mxfp8_linear_reference(x, q.data, q.scale_e8m0, bias, rule)
    a, b, s, bias_d = _dev(x, q.data, q.scale_e8m0, bias)
    out = mid_m_gemm_triton(a, b, weight_scale_e8m0=s, activation_mx_rule=rule, bias=bias_d, split_k=split_k)
    assert_one_ulp(out, ref)


@pytest.mark.parametrize("split_k", [None, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("weight_granularity", "activation_granularity"),
    [(G.PER_ROW, G.PER_ROW), (G.PER_TENSOR, G.PER_TENSOR), (G.PER_ROW, G.PER_TENSOR)],
)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_fp8_w8a8_codes(m, n, k, weight_granularity, activation_granularity, dtype, split_k) -> None:
    """E4M3 activation codes (per token / per tensor) and E4M3 weights in one FP8 MMA per K step; the scales
    applied after the K sum. On the GPU the wgmma accumulator's allowance of test_scaled_gemm.py applies."""
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=38)
    qa = quantize_fp8_reference(x, activation_granularity)
    qw = quantize_fp8_reference(w, weight_granularity)
    ref = fp8_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, dtype)
    a, sa, b, sb, bias_d = _dev(qa.data, qa.scale, qw.data, qw.scale, bias)
    out = mid_m_gemm_triton(a, b, a_scale=sa, weight_scale=sb, bias=bias_d, out_dtype=dtype, split_k=split_k)
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))


@pytest.mark.parametrize("split_k", [None, 2])
@pytest.mark.parametrize(("m", "n", "k"), [*SHAPES, (40, 300, 416)])
def test_fp8_block_w8a8_codes(m, n, k, split_k) -> None:
    """128x128 weight blocks and 1x128 activation groups: each K step's FP8 product times the step's weight
    block scale and each row's group scale."""
    x, w, bias = _inputs(m, n, k, seed=39)
    qa = quantize_fp8_reference(x, G.GROUP_1X128)
    qw = quantize_fp8_reference(w, G.BLOCK_128X128)
    ref = fp8_block_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    a, sa, b, sb, bias_d = _dev(qa.data, qa.scale, qw.data, qw.scale, bias)
    out = mid_m_gemm_triton(
        a, b, a_scale=sa, weight_block_scale=sb, bias=bias_d, out_dtype=torch.bfloat16, split_k=split_k
    )
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))


def test_splits_are_deterministic_and_change_nothing_but_order() -> None:
    x, w, _ = _inputs(40, 96, 1024, seed=33)
    q = quantize_fp8_reference(w, G.PER_ROW)
    a, b, s = _dev(x, q.data, q.scale)
    one = mid_m_gemm_triton(a, b, weight_scale=s, split_k=1)
    three = mid_m_gemm_triton(a, b, weight_scale=s, split_k=3)
    assert_one_ulp(three, one)
    assert torch.equal(three, mid_m_gemm_triton(a, b, weight_scale=s, split_k=3))


def test_tiles_and_splits() -> None:
    """64-row tiles up to 64 rows, 128 above; splits only where the tiles leave SMs idle."""
    assert config_for(64).block_m == 64 and config_for(65).block_m == 128
    assert split_k_for(128, 4096, 4096, config_for(128)) == 4  # 64 tiles, 264 programs wanted
    assert split_k_for(512, 57344, 8192, config_for(512)) == 1  # 3584 tiles already
    assert split_k_for(128, 4096, 256, config_for(128)) == 1  # two K steps: no split
    assert MID_M_MIN <= 64 < MX_MID_M_MAX <= MID_M_MAX
    assert MID_M_MIN <= 64 < min(W8A8_MID_M_MAX, BLOCK_W8A8_MID_M_MAX)


def test_w8a8_rows_go_where_the_tile_kernel_would_leave_sms_idle(monkeypatch) -> None:
    """The W8A8 dispatch rule on an H100's 132 SMs (TMA taken as usable): the mid-M kernel where the tile
    kernel's 64x128 tiles for ``m_bucket(M)`` rows number fewer than 0.7 x 132, the same for every M of a
    bucket, never below MID_M_MIN or above the given maximum."""
    from mxrun.kernels import mid_m_gemm

    monkeypatch.setattr(mid_m_gemm, "mid_m_usable", lambda *tensors: True)
    monkeypatch.setattr(mid_m_gemm, "_sms", lambda device: 132)

    def takes(m: int, n: int, max_rows: int = 256) -> bool:
        codes = torch.empty(m, 128, dtype=torch.float8_e4m3fn)
        return mid_m_gemm.w8a8_takes_mid_m(codes, torch.empty(n, 128, dtype=torch.float8_e4m3fn), max_rows)

    assert all(takes(m, 4096) for m in range(MID_M_MIN, 129))  # 8B o / down: 32 or 64 tiles
    assert not any(takes(m, 4096) for m in range(129, 257))  # 128 tiles
    assert takes(64, 6144) and not takes(65, 6144)  # 48 tiles, then 96
    assert takes(33, 10240) and not takes(100, 10240)  # 80, then 160
    assert not takes(48, 28672)  # 224 tiles
    assert takes(128, 3072) and not takes(130, 3072)  # 48 tiles, then 96 for the bucket (72 for 130 rows)
    assert not takes(MID_M_MIN - 1, 4096) and not takes(100, 4096, max_rows=64)
    # the rule was measured against the tile kernels, which have these rows only below the Gluon kernel's
    assert max(W8A8_MID_M_MAX, BLOCK_W8A8_MID_M_MAX) < WGMMA_MIN_M


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"no_scale": True}, "exactly one of"),
        ({"blocks": (1, 2)}, "block scales must be fp32"),
        ({"codes": True}, "need a_scale and out_dtype"),
        ({"a_scale": True}, "a_scale goes with E4M3 activations only"),
        ({"codes": True, "a_scale": True}, "need a_scale and out_dtype"),
        ({"codes": True, "a_scale": True, "mx": True, "out": True}, "fp32 scales only"),
        ({"codes": True, "a_scale": True, "blocks": (1, 2), "k": 256, "out": True}, "1x128 group scales"),
        ({"codes": True, "a_scale": 7, "out": True}, "1 or 40 elements"),
        ({"float32": True}, "bfloat16, float16 or float8_e4m3fn"),
        ({"k": 100, "mx": True}, "K % 32 == 0"),
        ({"bias": 3}, "bias must be"),
    ],
)
def test_bad_inputs(kwargs, message) -> None:
    k = kwargs.get("k", 128)
    x = torch.randn(40, k, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    w = torch.randn(64, k, device=KERNEL_DEVICE).to(torch.float8_e4m3fn)
    scale = {"weight_scale": torch.ones(64, 1, device=KERNEL_DEVICE)}
    if kwargs.get("mx"):
        scale = {"weight_scale_e8m0": torch.full((64, 4), 127, dtype=torch.uint8, device=KERNEL_DEVICE)}
    if kwargs.get("no_scale"):
        scale = {}
    if "blocks" in kwargs:
        scale = {"weight_block_scale": torch.ones(kwargs["blocks"], device=KERNEL_DEVICE)}
    if kwargs.get("codes"):
        x = x.to(torch.float8_e4m3fn)
    if kwargs.get("float32"):
        x = x.float()
    if "a_scale" in kwargs:  # True: per row; a number: that many elements
        rows = 40 if kwargs["a_scale"] is True else kwargs["a_scale"]
        scale["a_scale"] = torch.ones(rows, 1, device=KERNEL_DEVICE)
    if kwargs.get("out"):
        scale["out_dtype"] = torch.bfloat16
    bias = torch.ones(kwargs["bias"], device=KERNEL_DEVICE) if "bias" in kwargs else None
    with pytest.raises(GemmInputError, match=message):
        mid_m_gemm_triton(x, w, bias=bias, **scale)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), GPU_SHAPES)
def test_dispatchers_at_llama_shapes(m, n, k, dtype) -> None:
    """Through the Linear dispatchers (which send these M here on an H100) at Llama shapes, several launches
    of each: many programs per SM and splits, where the register operand's lifetime matters (see the module
    docstring: without the per-step wait, outputs came out wrong, Inf among them)."""
    from mxrun.kernels.e4m3 import mx_scales_foldable

    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=34)
    qc = quantize_fp8_reference(w, G.PER_ROW)
    ref = fp8_weight_only_reference(x, qc.data, qc.scale, G.PER_ROW, bias)
    args = _dev(x, qc.data, qc.scale)
    for _ in range(3):
        assert_one_ulp(fp8_weight_only_linear(*args, G.PER_ROW, _dev(bias)[0], backend="triton"), ref)
    qb = quantize_fp8_reference(w, G.BLOCK_128X128)
    ref = fp8_weight_only_reference(x, qb.data, qb.scale, G.BLOCK_128X128, bias)
    out = fp8_weight_only_linear(
        *_dev(x, qb.data, qb.scale), G.BLOCK_128X128, _dev(bias)[0], backend="triton"
    )
    assert_one_ulp(out, ref)
    slack = fp8_mma_slack(x, w)
    for activation in ("token", "tensor"):  # W8A8 (the mid-M kernel up to W8A8_MID_M_MAX rows)
        ref = fp8_linear_reference(x, qc.data, qc.scale, bias, activation)
        for _ in range(2):
            assert_one_ulp(fp8_linear(*args, _dev(bias)[0], activation, backend="triton"), ref, slack)
    ref = fp8_block_linear_reference(x, qb.data, qb.scale, bias)
    for _ in range(2):
        out = fp8_block_linear(*_dev(x, qb.data, qb.scale, bias), backend="triton")
        assert_one_ulp(out, ref, slack)
    if m > MX_MID_M_MAX:
        return  # MXFP8 takes the decode + cuBLAS and aligned paths there (tested in test_mxfp8_gemm.py)
    qm = quantize_mxfp8_reference(w)
    xd, wd, sd, bias_d = _dev(x, qm.data, qm.scale_e8m0, bias)
    fold = mx_scales_foldable(sd, wd)
    for rule in (None, MxScaleRule.ROUND_UP):
        ref = mxfp8_linear_reference(x, qm.data, qm.scale_e8m0, bias, rule)
        for _ in range(2):
            out = mxfp8_linear(xd, wd, sd, bias_d, rule, backend="triton", weight_scales_foldable=fold)
            assert_one_ulp(out, ref)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_fold_gives_the_same_bits(dtype) -> None:
    """The folded MX decodes (bf16: the powers of two in the widening's multiply; fp16: one conversion and one
    fp16 multiply per pair) and the fp32 one form the same weights in the MMA's type: the same output bits."""
    from mxrun.kernels.e4m3 import mx_scales_foldable, mx_scales_foldable_f16

    x, w, _ = _inputs(200, 4096, 4096, dtype=dtype, seed=35)
    q = quantize_mxfp8_reference(w)
    a, b, s = _dev(x, q.data, q.scale_e8m0)
    if dtype == torch.bfloat16:
        assert mx_scales_foldable(s, b)
        folded = mid_m_gemm_triton(a, b, weight_scale_e8m0=s, mx_scale_fold=True)
    else:
        assert mx_scales_foldable_f16(s)
        folded = mid_m_gemm_triton(a, b, weight_scale_e8m0=s, mx_scale_fold16=True)
    assert torch.equal(folded, mid_m_gemm_triton(a, b, weight_scale_e8m0=s))


def test_every_k_step_waits_for_its_mmas() -> None:
    """The register-operand rule of the module docstring, checked where the race cannot be seen: in the PTX
    that Triton generates for sm_90 (compiled without a GPU, in a process outside the interpreter), every
    ``wgmma.wait_group`` waits for all groups, for both dtypes, every weight kind and fold, both tiles, with and
    without splits. With ``acc = tl.dot(w, a.T, acc)`` instead, Triton 3.6 left 7 groups in flight across the
    loop (``wait_group 7``; wrong outputs on an H100) and Triton 3.9 leaves 1. The W8A8 cases (E4M3 codes from
    shared memory, no register operand) must wait too: each step's FP8 product is promoted to fp32 on its own."""
    cases = [
        "bf16,channel,0,128,1",
        "bf16,mx,1,64,2",
        "fp16,mx,2,256,1",
        "fp16,channel,0,40,3",
        "bf16,block,0,128,2",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_ptx.py")
    done = subprocess.run([sys.executable, str(script), *cases], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    waits = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(waits) == len(cases)
    for case, found in zip(cases, waits, strict=True):
        assert found and set(found) == {0}, (case, found)


@pytest.mark.skipif(HAS_CUDA, reason="on the GPU the dispatchers send these rows here")
def test_cpu_interpreter_dispatchers_keep_their_paths(monkeypatch) -> None:
    """Under the interpreter TMA is not usable, so the dispatchers keep the split-K kernel for 33-64 rows and
    never call the mid-M kernel (which is tested directly above)."""
    from mxrun.kernels import mid_m_gemm
    from mxrun.kernels.mid_m_gemm import mid_m_usable
    from mxrun.kernels.small_m_gemm import small_m_gemm_triton

    def refuse(*args, **kwargs):
        raise AssertionError("a dispatcher sent rows to the mid-M kernel without TMA")

    monkeypatch.setattr(mid_m_gemm, "mid_m_gemm_triton", refuse)

    x, w, _ = _inputs(40, 72, 544, seed=37)
    qc = quantize_fp8_reference(w, G.PER_ROW)
    assert not mid_m_usable(x, qc.data)
    out = fp8_weight_only_linear(x, qc.data, qc.scale, G.PER_ROW, None, backend="triton")
    assert torch.equal(out, small_m_gemm_triton(x, qc.data, weight_scale=qc.scale))
    qm = quantize_mxfp8_reference(w)
    out = mxfp8_linear(x, qm.data, qm.scale_e8m0, None, None, backend="triton")
    assert torch.equal(out, small_m_gemm_triton(x, qm.data, weight_scale_e8m0=qm.scale_e8m0))
    ref = fp8_linear_reference(x, qc.data, qc.scale, None, "token")
    assert_one_ulp(fp8_linear(x, qc.data, qc.scale, None, "token", backend="triton"), ref)
    qb = quantize_fp8_reference(w, G.BLOCK_128X128)
    ref = fp8_block_linear_reference(x, qb.data, qb.scale, None)
    assert_one_ulp(fp8_block_linear(x, qb.data, qb.scale, None, backend="triton"), ref)


@pytest.mark.parametrize("split_k", [None, 3])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("kind", ["bf16-weight-only", "codes", "mx-bf16"])
def test_box_major_weight_gives_the_same_bits(m, n, k, kind, split_k) -> None:
    """The weight read box-major (:class:`~mxrun.kernels.box_major.BoxMajorWeight` in this call's tile) gives
    the row-major read's output bit for bit: ragged N and K (zeros stored past them), any split."""
    from mxrun.kernels.box_major import BoxMajorWeight

    a, b, bias_d, kwargs = split_k_operands(kind, m, n, k, seed=38)
    config = config_for(m)
    run = lambda weight: mid_m_gemm_triton(  # noqa: E731
        a, weight, bias=bias_d, split_k=split_k, config=config, **kwargs
    )
    by_rows, by_boxes = run(b), run(BoxMajorWeight.of(b, config.block_n, config.block_k))
    assert torch.equal(by_boxes.view(torch.int16), by_rows.view(torch.int16))
    assert bool(torch.isfinite(by_boxes).all()) and by_boxes.abs().max() > 0
