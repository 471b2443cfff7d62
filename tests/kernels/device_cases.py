"""Where kernel tests run, and the inputs they share.

The Triton kernels run on the GPU when there is one, else under TRITON_INTERPRET=1 on CPU (set by
conftest.py) with small shapes only: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Where the Triton kernels run: the GPU, or the CPU interpreter (small shapes only: it is slow).
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
# Where the torch references run: always the CPU, and the GPU too when there is one (its casts must agree).
REFERENCE_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
# Element encodings the kernels are tested with: integer arithmetic everywhere, the hardware cast on GPU.
KERNEL_CASTS = ["software", "hardware"] if HAS_CUDA else ["software"]

gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="large shapes need a GPU (the interpreter is too slow)")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of an fp8/uint8 tensor, on CPU, for bit-exact comparison."""
    return t.view(torch.uint8).cpu()


def assert_same_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 tensors equal bit for bit, except that any NaN matches any NaN (payloads are not specified)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.float().cpu(), expected.float().cpu()
    same_nan = torch.isnan(a) == torch.isnan(e)
    assert bool(same_nan.all()), "NaN positions differ"
    finite_a = torch.where(torch.isnan(a), torch.zeros_like(a), a).view(torch.int32)
    finite_e = torch.where(torch.isnan(e), torch.zeros_like(e), e).view(torch.int32)
    mismatches = (finite_a != finite_e).sum().item()
    assert mismatches == 0, f"{mismatches} fp32 values differ in their bits"


_SUBNORMAL_MAGNITUDE = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 1e-6}


def make_input(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, specials: bool = True, device: str = "cpu"
) -> torch.Tensor:
    """Random values over a wide dynamic range (magnitudes 2^-20..2^20 varying per row and column), with,
    when ``specials``, an all-zero run, a negative zero, subnormals of ``dtype``, NaN and +-Inf sprinkled in."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator)
    row_exponent = torch.randint(-20, 21, (*shape[:-1], 1), generator=generator).float()
    element_exponent = torch.randint(-4, 5, shape, generator=generator).float()
    values = values * torch.exp2(row_exponent + element_exponent)
    if dtype == torch.float16:
        values = values.clamp(-60000.0, 60000.0)
    values = values.to(dtype)
    if specials and values.numel() >= 64:
        flat = values.view(-1)
        n = flat.numel()
        picks = torch.randperm(n, generator=generator)
        flat[:32] = 0.0  # a whole zero block (MX) when K >= 32
        flat[1] = -0.0
        tiny = _SUBNORMAL_MAGNITUDE[dtype]
        flat[picks[:4]] = torch.tensor([tiny, -tiny, 3 * tiny, -7 * tiny], dtype=torch.float32).to(dtype)
        flat[picks[4]] = float("nan")
        flat[picks[5]] = float("inf")
        flat[picks[6]] = float("-inf")
    return values.to(device)
