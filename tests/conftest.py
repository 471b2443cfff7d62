"""Shared test setup.

- Tests never reach the network (transformers/hub stay offline).
- Without a GPU, Triton kernels run under ``TRITON_INTERPRET=1``. Triton reads the variable when a kernel
  is decorated, i.e. when its module is first imported, so it is set here, before any test module imports
  mxrun's kernels. With a GPU the same tests compile and run the kernels for real.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
