"""Kernel tests run the Triton kernels on the GPU when there is one, else under ``TRITON_INTERPRET=1`` on CPU.

The variable is set by ``tests/conftest.py`` before any test module imports a kernel (Triton reads it when a
kernel is decorated); this file only fails loudly if that order is ever broken, instead of letting CPU runs
silently try to compile kernels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("kernel tests on CPU need TRITON_INTERPRET=1 before mxrun.kernels is imported")
