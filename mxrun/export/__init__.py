"""Export a quantized model as a compressed-tensors checkpoint (vLLM, SGLang) and reload it into mxrun.

* :mod:`mxrun.export.compressed_tensors`: mxrun schemes as compressed-tensors quantization arguments, and the
  ``quantization_config`` of ``config.json``;
* :mod:`mxrun.export.writer`: :func:`export_checkpoint`, the atomic folder writer;
* :mod:`mxrun.export.reload`: :func:`load_exported`, the stored codes and scales back into mxrun's layers;
* :mod:`mxrun.export.cli`: the ``mxrun export`` command.
"""
