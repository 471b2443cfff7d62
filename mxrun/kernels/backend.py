"""Which implementation runs a quantize call: the Triton kernel or the plain-torch reference.

Triton is optional (pyproject installs it on Linux x86-64 only), so this module is the one place that imports
it; kernel modules take ``triton``/``tl`` from here. Without Triton, ``@triton.jit`` becomes a decorator that
keeps the function but refuses to launch it, so every kernel module still imports and the torch path works.
"""

from __future__ import annotations

import enum
import functools
import os
from typing import Any

import torch

try:  # pragma: no cover - exercised by whichever platform runs the tests
    import triton
    import triton.language as tl

    HAS_TRITON = True
    try:  # programmatic dependent launch (sm_90+): Triton 3.4 and later
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_GDC = True
    except ImportError:  # pragma: no cover - older Triton: kernels still name them, pdl_usable says no
        HAS_GDC = False

        @triton.jit
        def gdc_wait():
            pass

        @triton.jit
        def gdc_launch_dependents():
            pass

except ImportError:  # pragma: no cover
    HAS_TRITON = HAS_GDC = False

    class _MissingTriton:
        """Stand-in so ``@triton.jit`` and ``tl.constexpr`` annotations still evaluate without Triton."""

        @staticmethod
        def jit(fn: Any = None, **_: Any) -> Any:
            if fn is None:
                return lambda f: f
            return fn

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (n - 1).bit_length())

    class _MissingTritonLanguage:
        @staticmethod
        def constexpr(value: Any = None) -> Any:
            return value

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingTritonLanguage()  # type: ignore[assignment]

    def gdc_wait() -> None:
        """Stand-in: without Triton no kernel launches."""

    def gdc_launch_dependents() -> None:
        """Stand-in: without Triton no kernel launches."""


class Backend(enum.Enum):
    """``AUTO`` runs the Triton kernel on CUDA tensors and the torch reference everywhere else."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


class BackendError(RuntimeError):
    """A backend was asked for that cannot run the given tensor here."""


# Read once, at import: Triton also reads it once, when a kernel is decorated (on import of its module).
_TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _capability_of(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def cuda_major(device: torch.device) -> int:
    """The compute capability major of a CUDA device (9: Hopper, 10: Blackwell), cached per device: kernel
    dispatchers ask it on every call. 0 for any other device."""
    if device.type != "cuda":
        return 0
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())[0]


@functools.cache
def _name_of(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def device_name(device: torch.device) -> str:
    """The CUDA device's name (``NVIDIA H100 80GB HBM3``, ``NVIDIA H200``), cached per device: the few settings
    measured to differ between chips of one compute capability are looked up by it. ``""`` for any other
    device."""
    if device.type != "cuda":
        return ""
    return _name_of(device.index if device.index is not None else torch.cuda.current_device())


# MXRUN_PDL=0 turns programmatic dependent launches off (read once, at import): an escape hatch, should a driver
# refuse them (e.g. inside CUDA graph capture).
_PDL_ALLOWED = os.environ.get("MXRUN_PDL", "1") not in ("", "0")


def pdl_usable(device: torch.device) -> bool:
    """Whether a kernel on ``device`` can be launched as a programmatic dependent launch (``launch_pdl``) and
    use ``griddepcontrol`` (sm_90+, compiled, a Triton that has it, not turned off with ``MXRUN_PDL=0``)."""
    return _PDL_ALLOWED and HAS_GDC and not _TRITON_INTERPRETING and cuda_major(device) >= 9


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors through Triton's numpy interpreter.

    Triton reads the variable when a kernel is decorated, so it must be set before mxrun.kernels is imported.
    """
    return _TRITON_INTERPRETING


def resolve_backend(backend: Backend | str, x: torch.Tensor) -> Backend:
    """Turn ``AUTO`` into a concrete backend for ``x`` and refuse a Triton request that cannot launch."""
    chosen = Backend(backend)
    if chosen is Backend.AUTO:
        return Backend.TRITON if HAS_TRITON and x.is_cuda else Backend.TORCH
    if chosen is Backend.TRITON:
        if not HAS_TRITON:
            raise BackendError("backend='triton' needs the triton package; use backend='torch' or 'auto'")
        if not x.is_cuda and not triton_interpreting():
            raise BackendError(
                f"backend='triton' got a tensor on {x.device}; Triton kernels run on CUDA tensors, or on CPU "
                "with TRITON_INTERPRET=1 set before mxrun.kernels is imported. Use backend='auto' for the "
                "torch reference."
            )
    return chosen
