"""Quantization kernels: one module per kernel family, each holding the Triton kernel, its launcher and the
plain-torch reference it is tested against."""
