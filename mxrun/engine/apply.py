"""Apply a plan to a model: swap each planned ``nn.Linear`` for its :class:`QuantizedLinear`, in place.

Two ways in, one life cycle (:mod:`mxrun.engine.methods`):

* :func:`apply_plan` quantizes a model whose weights are already loaded: for each planned Linear it creates
  the quantized layer, quantizes the existing weight into it, and drops the original (one bf16 weight alive
  at a time beyond the model itself).
* :func:`prepare_online` swaps the planned Linears for *empty* quantized layers and returns an
  :class:`OnlineQuantizer`; a loader that streams checkpoint tensors (shard by shard) hands each one to
  :meth:`OnlineQuantizer.quantize_on_load`, which quantizes the weights of planned layers on arrival and
  tells the loader which tensors it consumed. The bf16 checkpoint weight of a quantized layer is never held
  by the model.

Only dense Linear layers are handled here: MoE expert weights (``kind: moe_experts``) are reported as not yet
supported and left untouched, never a crash.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from mxrun.engine.layers import LayerKind
from mxrun.engine.methods import QuantizedLinear, UnsupportedSchemeError, method_for
from mxrun.engine.plan import Decision, Plan, PlanEntry

MOE_NOT_SUPPORTED = "moe_experts layers are not quantized yet (MoE kernels are a later issue); left unquantized"


class ApplyError(RuntimeError):
    """The plan does not fit the model (a planned layer that is missing or not a Linear, a weight never
    loaded); the message names the layer."""


@dataclass(frozen=True)
class ApplyReport:
    """What :func:`apply_plan` / :func:`prepare_online` did, layer by layer."""

    replaced: tuple[str, ...]
    """Layers now served by a :class:`QuantizedLinear`, in plan order."""
    not_supported: tuple[tuple[str, str], ...]
    """``(layer, reason)`` for planned layers left unquantized (MoE experts, schemes the kernels lack)."""
    untouched: int
    """Plan entries that were not to be quantized (skipped, unmatched, unsupported by the plan)."""
    by_scheme: dict[str, int] = field(default_factory=dict)
    bytes_before: int = 0
    """Bytes of the replaced layers' original weights."""
    bytes_after: int = 0
    """Bytes of their quantized weights and scales."""

    def summary(self) -> str:
        parts = [f"{n} x {s}" for s, n in sorted(self.by_scheme.items())]
        line = f"quantized {len(self.replaced)} Linear layer(s) ({', '.join(parts) or 'none'})"
        if self.not_supported:
            line += f"; {len(self.not_supported)} planned layer(s) left unquantized"
        return line


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        raise ApplyError(f"{name}: the plan names a layer this model does not have") from None
    if not hasattr(parent, attr):
        raise ApplyError(f"{name}: the plan names a layer this model does not have")
    return parent, attr


def _linear_at(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Linear]:
    parent, attr = _parent_and_attr(model, name)
    module = getattr(parent, attr)
    if not isinstance(module, nn.Linear):
        raise ApplyError(
            f"{name}: the plan quantizes it as a Linear but the model has a {type(module).__name__} there "
            "(was the plan resolved against another model, or applied twice?)"
        )
    return parent, attr, module


def _buffer_bytes(layer: QuantizedLinear) -> int:
    return sum(b.numel() * b.element_size() for b in layer.buffers(recurse=False))


def _swap(model: nn.Module, plan: Plan, quantize_now: bool) -> tuple[ApplyReport, dict[str, QuantizedLinear]]:
    replaced: dict[str, QuantizedLinear] = {}
    not_supported: list[tuple[str, str]] = []
    untouched = 0
    by_scheme: Counter[str] = Counter()
    bytes_before = bytes_after = 0
    for entry in plan.entries:  # check the whole plan against the model before changing anything
        if entry.decision is Decision.QUANTIZE and entry.layer.kind is LayerKind.LINEAR:
            _linear_at(model, entry.layer.name)
    for entry in plan.entries:
        if entry.decision is not Decision.QUANTIZE or entry.scheme is None:
            untouched += 1
            continue
        name = entry.layer.name
        if entry.layer.kind is LayerKind.MOE_EXPERTS:
            not_supported.append((name, MOE_NOT_SUPPORTED))
            continue
        parent, attr, linear = _linear_at(model, name)
        try:
            layer = QuantizedLinear.from_linear(linear, method_for(entry.scheme), layer_name=name)
        except UnsupportedSchemeError as error:
            not_supported.append((name, str(error)))
            continue
        bytes_before += linear.weight.numel() * linear.weight.element_size()
        if quantize_now:
            layer.load_weight(linear.weight.data)
        setattr(parent, attr, layer)  # the original Linear (and its weight) is now unreferenced by the model
        del linear
        replaced[name] = layer
        by_scheme[entry.scheme.name] += 1
        bytes_after += _buffer_bytes(layer)
    report = ApplyReport(
        tuple(replaced), tuple(not_supported), untouched, dict(by_scheme), bytes_before, bytes_after
    )
    return report, replaced


def apply_plan(model: nn.Module, plan: Plan) -> ApplyReport:
    """Quantize ``model`` in place: every ``QUANTIZE`` Linear of ``plan`` becomes a :class:`QuantizedLinear`
    (bias, dtype and device kept; the weight quantized from the loaded one, which is then released)."""
    with torch.no_grad():
        report, _ = _swap(model, plan, quantize_now=True)
    return report


class OnlineQuantizer:
    """Feeds streamed checkpoint tensors to the quantized layers that :func:`prepare_online` created.

    ``quantize_on_load(name, tensor)`` accepts a checkpoint tensor name (``...q_proj.weight`` /
    ``...q_proj.bias``) or a module name (meaning its weight); it returns True when it consumed the tensor
    (quantized a planned layer's weight, or set its bias), False for tensors that are not ours, which the
    loader then loads as usual. :meth:`finish` checks that every quantized layer got its weight.
    """

    def __init__(self, layers: dict[str, QuantizedLinear], report: ApplyReport) -> None:
        self.layers = layers
        self.report = report

    def layer_for(self, name: str) -> tuple[QuantizedLinear, str] | None:
        """``(layer, "weight" | "bias")`` for a tensor or module name of a quantized layer, else None."""
        if name in self.layers:
            return self.layers[name], "weight"
        module_name, _, leaf = name.rpartition(".")
        if leaf in ("weight", "bias") and module_name in self.layers:
            return self.layers[module_name], leaf
        return None

    def quantize_on_load(self, name: str, tensor: torch.Tensor) -> bool:
        target = self.layer_for(name)
        if target is None:
            return False
        layer, leaf = target
        if leaf == "weight":
            layer.load_weight(tensor)
        else:
            layer.load_bias(tensor)
        return True

    def missing(self) -> list[str]:
        return [name for name, layer in self.layers.items() if not layer.weight_loaded]

    def finish(self) -> ApplyReport:
        """Raise :class:`ApplyError` naming every quantized layer whose weight never arrived."""
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ApplyError(f"the checkpoint did not provide the weight of {len(missing)} quantized layer(s): "
                             f"{shown} (hint: tied weights, or a checkpoint of another model)")
        return self.report


def prepare_online(model: nn.Module, plan: Plan) -> OnlineQuantizer:
    """Swap every planned Linear for an empty :class:`QuantizedLinear` (same shape, bias, dtype, device) and
    return the :class:`OnlineQuantizer` that a streaming loader calls per tensor."""
    report, layers = _swap(model, plan, quantize_now=False)
    return OnlineQuantizer(layers, report)


def planned_entries(plan: Plan) -> list[PlanEntry]:
    """The entries :func:`apply_plan` turns into quantized Linears (dense, to be quantized)."""
    return [e for e in plan.entries if e.decision is Decision.QUANTIZE and e.layer.kind is LayerKind.LINEAR]


__all__ = [
    "ApplyError",
    "ApplyReport",
    "OnlineQuantizer",
    "apply_plan",
    "planned_entries",
    "prepare_online",
]
