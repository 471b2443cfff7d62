"""mxrun: declarative quantization recipes (FP8, MXFP8) for PyTorch models.

The pipeline is one-way: YAML recipe -> validated :class:`~mxrun.engine.recipe.Recipe` -> per-layer plan ->
quantized model -> kernels. Each stage lives in its own module under :mod:`mxrun.engine` or
:mod:`mxrun.kernels`.
"""

__version__ = "0.1.0"
