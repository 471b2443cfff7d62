"""What issue 5 asks of every quantized Linear on the GPU beyond its numbers: a forward never synchronizes with
the host, and a new batch size M compiles nothing as long as it falls in a size class already seen.

The size classes, by design: the small-M split-K kernel takes tiles of 16, 32 or 64 rows (``block_m_for``),
the tile kernels take ``m_bucket(M)``, and Triton itself compiles one variant for an integer argument equal to 1
and one for a multiple of 16 (its specialization) unless the kernel opts out. The warm-up runs one M of each
kind in each class; the second round's M are new, in the same classes, and must find every kernel compiled.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from torch import nn

import mxrun.kernels
from mxrun.engine.methods import QuantizedLinear, method_for
from mxrun.engine.schemes import PRESETS, Scheme, build_scheme, preset_scheme

from .device_cases import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]

K, N = 512, 384
# warm-up: per size class one M equal to 1 (split-K), one a multiple of 16 and one not
WARM_M = (1, 16, 3, 32, 17, 64, 33, 208, 200, 1024, 600, 4096, 3000)
# new M in the same classes: split-K 16-row (5, 11), 32-row (29), 64-row (50); m_bucket 256 (250),
# 1024 (700, 1000), 4096 (4000)
NEW_M = (5, 11, 29, 50, 250, 700, 1000, 4000)


def _jit_kernels() -> list:
    """Every Triton / Gluon kernel defined in ``mxrun.kernels`` (objects that keep per-device caches)."""
    kernels = []
    for info in pkgutil.iter_modules(mxrun.kernels.__path__):
        module = importlib.import_module(f"mxrun.kernels.{info.name}")
        kernels += [obj for obj in vars(module).values() if hasattr(obj, "device_caches")]
    return kernels


def _compiled(kernels: list) -> int:
    return sum(len(entry[0]) for kernel in kernels for entry in kernel.device_caches.values())


def _forward_without_sync(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return out


# beside the presets, MXFP8 with `activations: {min_rows: 65}` (weight-only below 65 rows, W8A8 from 65)
SCHEMES = [*sorted(PRESETS), "mxfp8:min_rows=65"]


def _scheme(name: str) -> Scheme:
    if name == "mxfp8:min_rows=65":
        scheme, problems = build_scheme("mxfp8-decode", {"preset": "mxfp8", "activations": {"min_rows": 65}})
        assert not problems
        return scheme
    return preset_scheme(name)


def _layer(linear: nn.Linear, scheme_name: str) -> QuantizedLinear:
    layer = QuantizedLinear.from_linear(linear, method_for(_scheme(scheme_name)), layer_name="t.proj")
    layer.load_weight(linear.weight.data)
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_no_host_sync_and_no_recompile_within_a_size_class(scheme_name: str, dtype: torch.dtype) -> None:
    """Also checks each new M's output against the CPU reference path on the same weights: the kernels and
    the reference quantize to the same codes, so they differ only by fp32 summation order, the output's
    rounding and, for default MXFP8 above 64 rows, the aligned path's regrouping (at most 2^-17.8 of a tile's
    largest magnitude per operand element); 2^-8 of the output's norm bounds all of these, while a wrong
    scale or decode (an fp16 fold off by a power of two) moves the output by far more."""
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(K, N, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
    linear = linear.to(dtype)
    reference = _layer(linear, scheme_name)
    layer = _layer(linear.to("cuda"), scheme_name)
    x_cpu = torch.randn(max(WARM_M + NEW_M), K, generator=g).to(dtype)
    x = x_cpu.to("cuda")
    kernels = _jit_kernels()
    assert kernels, "no Triton kernels found in mxrun.kernels"

    for m in WARM_M:
        out = _forward_without_sync(layer, x[:m])
        assert out.shape == (m, N) and bool(torch.isfinite(out).all())
    before = _compiled(kernels)
    assert before > 0, "the warm-up compiled nothing that this count sees"
    outputs = {}
    for m in NEW_M:
        outputs[m] = _forward_without_sync(layer, x[:m])
        assert outputs[m].shape == (m, N) and outputs[m].dtype == dtype
    assert _compiled(kernels) == before, f"{scheme_name}: a new M in a seen size class compiled a kernel"
    for m, out in outputs.items():
        expected = reference(x_cpu[:m]).float()
        relative = ((out.cpu().float() - expected).norm() / expected.norm()).item()
        assert relative <= 2.0**-8, f"{scheme_name} {dtype} M={m}: {relative:.2e} from the CPU reference"
