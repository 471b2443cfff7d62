"""TMA-fed persistent FP8 GEMMs against the same references and bounds as the pointer kernels
(see test_scaled_gemm.py's docstring for the one-ulp rule and the wgmma allowance).

TMA exists only on a real sm_90+ GPU, so the kernel runs there; on CPU the refusal (`tma_usable`), the operand
checks and the tile choice are tested.
Shapes are ragged on purpose: M and N not multiples of the tile and K not a multiple of 128 (TMA zero-fills
out-of-range rows, columns and K), and the block case spreads the 1x128 group scales over 2^+-12 (a wrong
group scale is then far off).
"""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8_reference
from mxrun.kernels.fp8_tma_gemm import fp8_tma_gemm, tma_candidates, tma_usable
from mxrun.kernels.scaled_gemm import (
    GemmConfig,
    GemmInputError,
    fp8_block_gemm_reference,
    fp8_block_linear,
    fp8_gemm_reference,
    fp8_linear,
    fp8_linear_reference,
)

from .device_cases import HAS_CUDA, KERNEL_DEVICE
from .test_scaled_gemm import assert_one_ulp, fp8_mma_slack

G = Fp8Granularity
needs_tma = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.get_device_capability()[0] < 9, reason="TMA needs an sm_90+ GPU"
)
SHAPES = [(600, 1000, 1040), (1024, 4096, 4096), (777, 384, 2064)]
CONFIGS = [
    GemmConfig(128, 256, 128, 8, 8, 3),
    GemmConfig(128, 128, 128, 8, 8, 4),
    GemmConfig(64, 128, 128, 8, 4, 4),
    GemmConfig(64, 128, 128, 8, 4, 3, programs_per_sm=3),  # several programs per SM share the tiles
]


def _inputs(m: int, n: int, k: int, seed: int, spread_groups: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, : max(1, k // 64)] *= 30.0
    if spread_groups:  # each 1x128 group of a row at its own power of two in [2^-12, 2^12]
        exps = torch.randint(-12, 13, (m, -(-k // 128)), generator=g).float()
        x = x * exps.exp2().repeat_interleave(128, dim=1)[:, :k]
        x[: m // 7, 128:256] = 0.0  # all-zero groups: scale 1, codes 0
    w = torch.randn(n, k, generator=g) * 0.05
    if spread_groups:  # and each 128x128 weight block at its own power of two in [2^-6, 2^6]
        exps = torch.randint(-6, 7, (-(-n // 128), -(-k // 128)), generator=g).float().exp2()
        w = w * exps.repeat_interleave(128, dim=0).repeat_interleave(128, dim=1)[:n, :k]
    bias = torch.randn(n, generator=g)
    return x.to(torch.bfloat16), w.to(torch.bfloat16), bias.to(torch.bfloat16)


def test_tma_refused_off_hopper() -> None:
    cpu = torch.zeros(4, 32)
    assert not tma_usable(cpu)
    if HAS_CUDA:
        assert not tma_usable(torch.zeros(4, 24, device="cuda", dtype=torch.float8_e4m3fn))  # 24 B rows


def _check(x, w, bias, block_scaled: bool, weight_granularity, config, persistent: bool) -> None:
    """Quantize as the Linear would, run the TMA kernel, compare with the fp32 reference of the same bytes."""
    qa = quantize_fp8_reference(x, G.GROUP_1X128 if block_scaled else G.PER_ROW)
    qw = quantize_fp8_reference(w, weight_granularity)
    reference = fp8_block_gemm_reference if block_scaled else fp8_gemm_reference
    ref = reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    a, sa, b, sb, bias_d = (t.cuda() for t in (qa.data, qa.scale, qw.data, qw.scale, bias))
    out = fp8_tma_gemm(a, sa, b, sb, bias_d, torch.bfloat16, block_scaled=block_scaled, config=config,
                       persistent=persistent)  # fmt: skip
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))


def test_bad_operands_are_named() -> None:
    e4m3 = torch.float8_e4m3fn
    a, b = torch.zeros(8, 256, dtype=e4m3), torch.zeros(16, 256, dtype=e4m3)
    one = torch.ones(())
    with pytest.raises(GemmInputError, match=r"A \[M, K\] and B \[N, K\]"):
        fp8_tma_gemm(a, one, b[:, :128], one, None, torch.bfloat16, block_scaled=False)
    with pytest.raises(GemmInputError, match="float8_e4m3fn"):
        fp8_tma_gemm(a.to(torch.bfloat16), one, b, one, None, torch.bfloat16, block_scaled=False)
    with pytest.raises(GemmInputError, match="block scales"):
        fp8_tma_gemm(a, torch.ones(8, 1), b, torch.ones(1, 2), None, torch.bfloat16, block_scaled=True)


@pytest.mark.parametrize(
    ("m", "n", "block_m"),
    # the fastest per-channel tile in benchmarks/results/sweep-fp8-tma-h200.json (132 SMs on H100 and H200)
    [(512, 6144, 256), (512, 10240, 128), (1024, 6144, 128), (1024, 10240, 128), (1024, 4096, 256),
     (1024, 28672, 256), (4096, 6144, 256), (16384, 10240, 256)],
)  # fmt: skip
def test_tile_choice_follows_the_last_wave(m, n, block_m) -> None:
    """Big tiles are faster per element, but not when they leave most of a wave's SMs idle."""
    assert tma_candidates(m, n, block_scaled=False, sms=132)[0].block_m == block_m
    assert all(c.block_n == 128 for c in tma_candidates(m, n, block_scaled=True, sms=132))


@needs_tma
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("weight_granularity", [G.PER_ROW, G.PER_TENSOR])
def test_w8a8(m, n, k, config, persistent, weight_granularity) -> None:
    _check(*_inputs(m, n, k, seed=m + n), False, weight_granularity, config, persistent)


@needs_tma
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("config", [c for c in CONFIGS if c.block_n == 128], ids=str)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_block_scaled(m, n, k, config, persistent) -> None:
    _check(*_inputs(m, n, k, seed=m + k, spread_groups=True), True, G.BLOCK_128X128, config, persistent)


@needs_tma
def test_block_scaled_tiny_group_stays_finite() -> None:
    """A 1x128 group of activations near 1e-36 has a subnormal scale (combined with the weight's, ~2^-142):
    its contribution must neither blow up nor poison the row (any scheme that divides by the scale, e.g. an
    accumulator rescaled step to step, overflows here)."""
    x, w, bias = _inputs(256, 512, 1024, seed=9)
    x[:4, 128:256] = (torch.randn(4, 128) * 1e-36).to(torch.bfloat16)
    assert x[:4, 128:256].abs().max() > 0
    _check(x, w, bias, True, G.BLOCK_128X128, CONFIGS[1], True)


@needs_tma
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_linear_dispatch_at_large_m(m, n, k) -> None:
    """The Linear dispatchers (which choose TMA at M >= TMA_MIN_M on Hopper) stay within the same bound."""
    x, w, bias = _inputs(m, n, k, seed=3)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    ref = fp8_linear_reference(x, qw.data, qw.scale, bias, "token")
    out = fp8_linear(x.cuda(), qw.data.cuda(), qw.scale.cuda(), bias.cuda(), "token", backend="triton")
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))
    qb = quantize_fp8_reference(w, G.BLOCK_128X128)
    qa = quantize_fp8_reference(x, G.GROUP_1X128)
    ref = fp8_block_gemm_reference(qa.data, qa.scale, qb.data, qb.scale, bias, torch.bfloat16)
    out = fp8_block_linear(x.cuda(), qb.data.cuda(), qb.scale.cuda(), bias.cuda(), backend="triton")
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))


@needs_tma
def test_no_recompile_for_new_m() -> None:
    """M reaches the TMA kernel as a run-time argument and inside the descriptors' shapes: new batch sizes in
    one bucket reuse the compiled kernel, including an M and a program count that Triton would otherwise
    specialize on (divisible by 16)."""
    from mxrun.kernels import fp8_tma_gemm as module
    from mxrun.kernels import fp8_wgmma_gemm as wgmma

    from .test_scaled_gemm import compiled_variants

    def variants() -> int:  # the TMA kernel's and the Gluon one's (Hopper takes the Gluon kernel)
        gluon_caches = getattr(wgmma, "_fp8_wgmma_gemm_kernel", None)
        gluon_caches = getattr(gluon_caches, "device_caches", {}) or {}
        return compiled_variants(module._fp8_tma_gemm_kernel) + sum(len(e[0]) for e in gluon_caches.values())

    x, w, bias = _inputs(1000, 256, 512, seed=4)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    args = (qw.data.cuda(), qw.scale.cuda(), bias.cuda())
    fp8_linear(x[:600].cuda(), *args, "token")
    fp8_linear(x[:601].cuda(), *args, "token")
    before = variants()
    for m in (613, 640, 700, 777, 1000):  # 640 rows: M divisible by 16; 1000: 16 programs
        fp8_linear(x[:m].cuda(), *args, "token")
    assert variants() == before


def test_wgmma_gemm_refuses_what_it_cannot_run() -> None:
    """Operands the Gluon kernel cannot take (here: CPU tensors, odd K, wrong dtype) get a named error, not a
    traceback from deep inside Triton; the dispatcher sees ``wgmma_gemm_usable`` False and falls back."""
    from mxrun.kernels.fp8_wgmma_gemm import fp8_wgmma_gemm, wgmma_gemm_usable

    a = torch.zeros(4, 32, dtype=torch.float8_e4m3fn)
    b = torch.zeros(8, 32, dtype=torch.float8_e4m3fn)
    one = torch.ones(1)
    assert not wgmma_gemm_usable(a, b)
    with pytest.raises(GemmInputError, match="fp8_wgmma_gemm: needs Triton's Gluon, an sm_90"):
        fp8_wgmma_gemm(a, one, b, one, None, torch.bfloat16)
    with pytest.raises(GemmInputError, match="need A \\[M, K\\] and B \\[N, K\\]"):
        fp8_wgmma_gemm(a, one, b[:, :16], one, None, torch.bfloat16)
    with pytest.raises(GemmInputError, match="must be float8_e4m3fn"):
        fp8_wgmma_gemm(a.float(), one, b, one, None, torch.bfloat16)
    if HAS_CUDA and torch.cuda.get_device_capability()[0] == 9:  # shape checks after the usable check
        a, b = a.cuda(), b.cuda()
        with pytest.raises(GemmInputError, match="block scales must be"):
            fp8_wgmma_gemm(a, torch.ones(4, 2, device="cuda"), b, one.cuda(), None, torch.bfloat16,
                           block_scaled=True)  # fmt: skip
        with pytest.raises(GemmInputError, match="128x256 tiles take per-tensor / per-channel scales only"):
            fp8_wgmma_gemm(a, torch.ones(4, 1, device="cuda"), b, torch.ones(1, 1, device="cuda"), None,
                           torch.bfloat16, block_scaled=True, wide=True)  # fmt: skip


@pytest.mark.parametrize(
    ("m", "n", "wide"),
    # 132 SMs (H100): wide tiles where they fill their waves as well as 128x128 ones do, not where fewer,
    # emptier waves of them would lose (M = 1024, N = 10240: 3 waves of 320 wide tiles against 5 of 640)
    [(1024, 10240, False), (1024, 6144, False), (512, 10240, False), (4096, 6144, True), (1024, 4096, True),
     (16384, 10240, True), (4096, 28672, True)],
)  # fmt: skip
def test_wide_tiles_follow_the_waves(m, n, wide) -> None:
    from mxrun.kernels.fp8_wgmma_gemm import wide_tiles_pay

    assert wide_tiles_pay(m, n, sms=132) is wide


needs_wgmma = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="the Gluon wgmma kernel is for sm_90"
)


WGMMA_SHAPES = [
    *SHAPES,
    (512, 256, 128),  # 1, 2 and 3 K steps: no two-step loop, its even and odd tails
    (512, 256, 256),
    (640, 384, 3 * 128),
    (2048, 2176, 2 * 128),  # 272 tiles: persistent programs walk 2-3 tiles with fewer K steps than stages,
    (2048, 2048, 3 * 128),  # so the load stream runs into the next tile and beyond
]


LAUNCHES = [(True, False), (False, False), (True, True)]  # (persistent, 128x256 tiles)


@needs_wgmma
@pytest.mark.parametrize(("persistent", "wide"), LAUNCHES)
@pytest.mark.parametrize(("m", "n", "k"), WGMMA_SHAPES)
@pytest.mark.parametrize(
    ("act_granularity", "weight_granularity"),
    [(G.PER_ROW, G.PER_ROW), (G.PER_ROW, G.PER_TENSOR), (G.PER_TENSOR, G.PER_ROW)],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_wgmma_gemm(m, n, k, act_granularity, weight_granularity, with_bias, persistent, wide) -> None:
    """The Gluon kernel (promotion overlapped with the MMAs) keeps the Triton kernels' bound, for ragged
    M/N/K, odd and even numbers of 128-wide K steps (1, 2, 3, 9, 17, 32: the two-step loop, its tail and no
    loop at all), per-token and per-tensor activations, per-channel and per-tensor weights, with and without
    bias, one program per tile or persistent programs, 128x128 or 128x256 tiles (ragged N leaves the right
    half of a wide tile partly or wholly outside the matrix); it is deterministic (same bits twice)."""
    from mxrun.kernels.fp8_wgmma_gemm import fp8_wgmma_gemm, wgmma_gemm_usable

    x, w, bias = _inputs(m, n, k, seed=7)
    qa = quantize_fp8_reference(x, act_granularity)
    qw = quantize_fp8_reference(w, weight_granularity)
    b = bias if with_bias else None
    ref = fp8_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, b, torch.bfloat16)
    a_dev, w_dev = qa.data.cuda(), qw.data.cuda()
    assert wgmma_gemm_usable(a_dev, w_dev)
    bias_dev = b.cuda() if b is not None else None
    args = (a_dev, qa.scale.cuda(), w_dev, qw.scale.cuda(), bias_dev, torch.bfloat16)
    run = lambda: fp8_wgmma_gemm(*args, persistent=persistent, wide=wide)  # noqa: E731
    out = run()
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))
    assert torch.equal(out, run())


def _k_major(scale: torch.Tensor) -> torch.Tensor:
    """The same scales as a view of a K-major buffer with 16-byte aligned steps (what the quantizer's
    ``scale_k_major`` gives): the Gluon kernel's loader then brings them in by TMA."""
    m, groups = scale.shape
    buffer = torch.full((groups, -(-m // 4) * 4), float("nan"), device=scale.device)
    buffer[:, :m] = scale.t()
    return buffer[:, :m].t()


@needs_wgmma
@pytest.mark.parametrize(
    ("persistent", "k_major"), [(True, False), (False, False), (True, True), (False, True)]
)
@pytest.mark.parametrize(("m", "n", "k"), WGMMA_SHAPES)
def test_wgmma_block_scaled(m, n, k, persistent, k_major) -> None:
    """Block scaling in the Gluon kernel: each step's product times its rows' 1x128 activation scales and the
    tile's weight-block scale (group scales spread over 2^+-12, weight blocks over 2^+-6, all-zero groups,
    so a scale taken from the wrong step, row or block is far off), with bias; deterministic. K-major
    activation scales come by TMA with each step's operands (the padding rows past M are NaN: a box that
    read them into a stored row would show)."""
    from mxrun.kernels.fp8_wgmma_gemm import fp8_wgmma_gemm, k_major_scales

    x, w, bias = _inputs(m, n, k, seed=m + k, spread_groups=True)
    qa = quantize_fp8_reference(x, G.GROUP_1X128)
    qw = quantize_fp8_reference(w, G.BLOCK_128X128)
    ref = fp8_block_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    a_scale = _k_major(qa.scale.cuda()) if k_major else qa.scale.cuda()
    assert k_major_scales(a_scale) is k_major
    args = (qa.data.cuda(), a_scale, qw.data.cuda(), qw.scale.cuda(), bias.cuda(), torch.bfloat16)
    run = lambda: fp8_wgmma_gemm(*args, block_scaled=True, persistent=persistent)  # noqa: E731
    out = run()
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))
    assert torch.equal(out, run())


@needs_wgmma
def test_wgmma_block_scaled_tiny_group_stays_finite() -> None:
    """The TMA kernel's subnormal-scale case (see test_block_scaled_tiny_group_stays_finite) in the Gluon one."""
    from mxrun.kernels.fp8_wgmma_gemm import fp8_wgmma_gemm

    x, w, bias = _inputs(256, 512, 1024, seed=9)
    x[:4, 128:256] = (torch.randn(4, 128) * 1e-36).to(torch.bfloat16)
    qa = quantize_fp8_reference(x, G.GROUP_1X128)
    qw = quantize_fp8_reference(w, G.BLOCK_128X128)
    ref = fp8_block_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    out = fp8_wgmma_gemm(qa.data.cuda(), qa.scale.cuda(), qw.data.cuda(), qw.scale.cuda(), bias.cuda(),
                         torch.bfloat16, block_scaled=True)  # fmt: skip
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))


@pytest.mark.parametrize(
    ("n", "dtype", "tma_store"),
    [(1040, torch.bfloat16, True), (1040, torch.float16, True), (1001, torch.bfloat16, False),
     (1044, torch.bfloat16, False), (1040, torch.float32, False)],
)  # fmt: skip
def test_wgmma_output_store_choice(n, dtype, tma_store) -> None:
    """The epilogue stores through shared memory and TMA only where TMA can write the output: 2-byte
    elements (an fp32 buffer per consumer would not fit beside the 128x256 tiles' slots) and rows whose
    byte stride is a multiple of 16 (1001 and 1044 bf16 columns are not); masked stores otherwise."""
    from mxrun.kernels import fp8_wgmma_gemm as wgmma

    if not wgmma.HAS_GLUON:
        pytest.skip("Triton's Gluon is not installed")
    assert (wgmma.output_descriptor(torch.empty(8, n, dtype=dtype), 128) is not None) is tma_store


@needs_wgmma
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize(
    ("n", "dtype"),
    [(1001, torch.bfloat16), (1040, torch.float16), (1040, torch.float32), (1044, torch.float16)],
)
def test_wgmma_gemm_store_paths(n, dtype, wide) -> None:
    """Both epilogues keep the bound: fp16 through TMA; fp32 outputs and rows TMA cannot address (1001 and
    1044 columns) by masked stores; per-channel and block-scaled, 128x128 and 128x256 tiles, ragged M."""
    from mxrun.kernels.fp8_wgmma_gemm import fp8_wgmma_gemm

    x, w, bias = _inputs(600, n, 1040, seed=n)
    qa, qw = quantize_fp8_reference(x, G.PER_ROW), quantize_fp8_reference(w, G.PER_ROW)
    ref = fp8_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, dtype)
    args = (qa.data.cuda(), qa.scale.cuda(), qw.data.cuda(), qw.scale.cuda(), bias.cuda(), dtype)
    assert_one_ulp(fp8_wgmma_gemm(*args, wide=wide), ref, fp8_mma_slack(x, w))
    if not wide:
        qa, qw = quantize_fp8_reference(x, G.GROUP_1X128), quantize_fp8_reference(w, G.BLOCK_128X128)
        ref = fp8_block_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, dtype)
        args = (qa.data.cuda(), qa.scale.cuda(), qw.data.cuda(), qw.scale.cuda(), bias.cuda(), dtype)
        assert_one_ulp(fp8_wgmma_gemm(*args, block_scaled=True), ref, fp8_mma_slack(x, w))


@needs_wgmma
@pytest.mark.parametrize("n", [512, 472])
@pytest.mark.parametrize("width", [1040, 1044])
@pytest.mark.parametrize("block_scaled", [False, True])
def test_wgmma_gemm_writes_into_out(n, width, block_scaled) -> None:
    """``out`` = columns 128..128+N of a wider output (rows 2080 or 2088 bytes apart: TMA-store and
    masked-store epilogues; N = 472 ends inside a tile, where the store must stop at the view's edge): the
    same bits as a fresh output there, the other columns untouched; a wrong ``out`` is named."""
    from mxrun.kernels.fp8_wgmma_gemm import fp8_wgmma_gemm

    x, w, bias = _inputs(600, n, 1040, seed=5)
    act, weight = (G.GROUP_1X128, G.BLOCK_128X128) if block_scaled else (G.PER_ROW, G.PER_ROW)
    qa, qw = quantize_fp8_reference(x, act), quantize_fp8_reference(w, weight)
    args = (qa.data.cuda(), qa.scale.cuda(), qw.data.cuda(), qw.scale.cuda(), bias.cuda(), torch.bfloat16)
    fresh = fp8_wgmma_gemm(*args, block_scaled=block_scaled)
    wide = torch.full((600, width), 7.0, dtype=torch.bfloat16, device="cuda")
    written = fp8_wgmma_gemm(*args, block_scaled=block_scaled, out=wide[:, 128 : 128 + n])
    assert written.data_ptr() == wide[:, 128:].data_ptr()
    assert torch.equal(wide[:, 128 : 128 + n], fresh)
    assert (wide[:, :128] == 7.0).all() and (wide[:, 128 + n :] == 7.0).all()
    with pytest.raises(GemmInputError, match=f"out must be a \\[600, {n}\\]"):
        fp8_wgmma_gemm(*args, block_scaled=block_scaled, out=wide[:, 128 : 100 + n])


@needs_wgmma
def test_linear_dispatch_takes_wgmma(monkeypatch) -> None:
    """fp8_linear and fp8_block_linear at M >= 512 on Hopper run the Gluon kernel, and keep the bound."""
    from mxrun.kernels import fp8_wgmma_gemm as wgmma

    calls = []
    real = wgmma.fp8_wgmma_gemm
    monkeypatch.setattr(wgmma, "fp8_wgmma_gemm", lambda *args, **kw: calls.append(kw) or real(*args, **kw))
    x, w, bias = _inputs(520, 256, 1024, seed=9)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    ref = fp8_linear_reference(x, qw.data, qw.scale, bias, "token")
    out = fp8_linear(x.cuda(), qw.data.cuda(), qw.scale.cuda(), bias.cuda(), "token", backend="triton")
    assert calls == [{}]
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))
    qb = quantize_fp8_reference(w, G.BLOCK_128X128)
    qa = quantize_fp8_reference(x, G.GROUP_1X128)
    ref = fp8_block_gemm_reference(qa.data, qa.scale, qb.data, qb.scale, bias, torch.bfloat16)
    out = fp8_block_linear(x.cuda(), qb.data.cuda(), qb.scale.cuda(), bias.cuda(), backend="triton")
    assert calls == [{}, {"block_scaled": True, "out": None}]
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))


@needs_wgmma
def test_wgmma_no_recompile_for_new_m() -> None:
    """New batch sizes reuse the Gluon kernel's compiled variant: M is not specialized, in the kernel's
    arguments or in its descriptors (640 rows: M divisible by 16)."""
    from mxrun.kernels import fp8_wgmma_gemm as wgmma

    from .test_scaled_gemm import compiled_variants

    x, w, bias = _inputs(1000, 256, 1024, seed=11)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    args = (qw.data.cuda(), qw.scale.cuda(), bias.cuda())
    fp8_linear(x[:600].cuda(), *args, "token")
    before = compiled_variants(wgmma._fp8_wgmma_gemm_kernel)
    for m in (613, 640, 700, 1000):
        fp8_linear(x[:m].cuda(), *args, "token")
    assert compiled_variants(wgmma._fp8_wgmma_gemm_kernel) == before


def test_block_gemm_out_is_checked_and_filled() -> None:
    """``fp8_block_gemm(out=...)`` (whichever kernel runs: here the pointer kernel, or the interpreter on CPU)
    fills a column slice of a wider output with the bits it would return, leaves the other columns alone, and
    names an ``out`` of the wrong shape or dtype before any launch."""
    from mxrun.kernels.scaled_gemm import fp8_block_gemm

    x, w, bias = _inputs(40, 200, 256, seed=12)
    qa, qw = quantize_fp8_reference(x, G.GROUP_1X128), quantize_fp8_reference(w, G.BLOCK_128X128)
    args = [t.to(KERNEL_DEVICE) for t in (qa.data, qa.scale, qw.data, qw.scale, bias)]
    fresh = fp8_block_gemm(*args, torch.bfloat16)
    wide = torch.full((40, 300), 7.0, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    fp8_block_gemm(*args, torch.bfloat16, wide[:, 50:250])
    assert torch.equal(wide[:, 50:250], fresh)
    assert (wide[:, :50] == 7.0).all() and (wide[:, 250:] == 7.0).all()
    with pytest.raises(GemmInputError, match=r"fp8_block_gemm: out must be a \[40, 200\]"):
        fp8_block_gemm(*args, torch.bfloat16, wide[:, 50:240])
    with pytest.raises(GemmInputError, match="out must be"):
        fp8_block_gemm(*args, torch.bfloat16, wide[:, 50:250].float())
