"""Models without their weights: build a transformers model with every parameter on ``meta``, give the layers
about to be quantized one-element stand-ins, and materialize the rest only once the quantized layers are in
place. Both the streaming loader (:mod:`mxrun.job.loading`) and the reload of an exported checkpoint
(:mod:`mxrun.export.reload`) use it, so that neither ever holds a bf16 copy of a weight it quantizes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside moves to ``meta`` at once (its CPU storage, never written, is freed);
    buffers stay real. The same idea as accelerate's ``init_empty_weights(include_buffers=False)``."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            stored = module._parameters[name]
            module._parameters[name] = type(stored)(stored.to("meta"), requires_grad=stored.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def placeholder(like: torch.Tensor, device: torch.device | str) -> nn.Parameter:
    """A parameter that has ``like``'s shape and dtype on ``device`` and holds one element (a quantized layer
    built from it takes its shape, dtype and device, and never reads it)."""
    return nn.Parameter(
        torch.zeros((), dtype=like.dtype, device=device).expand(like.shape), requires_grad=False
    )


def materialize_meta_parameters(model: nn.Module, device: torch.device | str) -> int:
    """Give every parameter still on ``meta`` uninitialised storage on ``device``, keeping tied parameters
    tied (one new tensor per original object). Returns the number of tensors allocated. The caller fills
    them and must check that each one was filled."""
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in fresh:
                fresh[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=device),
                    requires_grad=param.requires_grad,
                )
            module._parameters[name] = fresh[id(param)]
    return len(fresh)


__all__ = ["materialize_meta_parameters", "parameters_on_meta", "placeholder"]
