"""Apply a plan to a model: swap each planned ``nn.Linear`` for its :class:`QuantizedLinear` and each planned
MoE experts module for a :class:`~mxrun.engine.moe.QuantizedExperts`, in place.

Two ways in, one life cycle (:mod:`mxrun.engine.methods`):

* :func:`apply_plan` quantizes a model whose weights are already loaded: for each planned Linear it creates
  the quantized layer, quantizes the existing weight into it, and drops the original (one bf16 weight alive
  at a time beyond the model itself).
* :func:`prepare_online` swaps the planned Linears for *empty* quantized layers and returns an
  :class:`OnlineQuantizer`; a loader that streams checkpoint tensors (shard by shard) hands each one to
  :meth:`OnlineQuantizer.quantize_on_load`, which quantizes the weights of planned layers on arrival and
  tells the loader which tensors it consumed. The bf16 checkpoint weight of a quantized layer is never held
  by the model.

MoE experts (``kind: moe_experts``). A transformers-5 experts module (``...mlp.experts`` holding the fused
``gate_up_proj`` / ``down_proj`` the plan lists as two layers) is replaced as a whole by a
:class:`~mxrun.engine.moe.QuantizedExperts` when the plan quantizes both of its layers with one scheme; the
model's router stays. Online, it takes the fused tensors under their layer names, or the per-expert
checkpoint tensors that ``Layer.tensors`` lists (for a plan made from a module, which lists none, the usual
``<experts>.<e>.gate_proj.weight`` / ``w1`` names, stored or renamed). Experts held as a ModuleList of
``nn.Linear`` (the inventory lists them as per-expert ``moe_experts`` layers, ``...experts.<e>.w1``) go through
the Linear path, one :class:`QuantizedLinear` each. Experts the kernels cannot serve (transposed, with biases,
another activation) are reported in ``not_supported`` and left untouched, never a crash.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from mxrun.engine.layers import LayerKind
from mxrun.engine.methods import QuantizedLinear, UnsupportedSchemeError, method_for
from mxrun.engine.moe import (
    FUSED_PARAMS,
    QuantizedExperts,
    expert_tensor_names,
    layer_tensor_roles,
)
from mxrun.engine.plan import Decision, Plan, PlanEntry

MOE_PARTLY_PLANNED = (
    "the experts of one MoE block are quantized together; the plan quantizes only some of its expert "
    "layers (or with different schemes), so none is quantized"
)


class ApplyError(RuntimeError):
    """The plan does not fit the model (a planned layer that is missing or not a Linear, a weight never
    loaded); the message names the layer."""


@dataclass(frozen=True)
class ApplyReport:
    """What :func:`apply_plan` / :func:`prepare_online` did, layer by layer."""

    replaced: tuple[str, ...]
    """Layers now served by a :class:`QuantizedLinear` or a :class:`QuantizedExperts` (both fused expert
    layers of one), in plan order."""
    not_supported: tuple[tuple[str, str], ...]
    """``(layer, reason)`` for planned layers left unquantized (experts the MoE kernels cannot serve, schemes
    the kernels lack)."""
    untouched: int
    """Plan entries that were not to be quantized (skipped, unmatched, unsupported by the plan)."""
    by_scheme: dict[str, int] = field(default_factory=dict)
    bytes_before: int = 0
    """Bytes of the replaced layers' original weights (expert stacks included)."""
    bytes_after: int = 0
    """Bytes of their quantized weights and scales (expert stacks included)."""
    experts_modules: tuple[str, ...] = ()
    """Experts modules now served by a :class:`QuantizedExperts` (``...mlp.experts``), in plan order."""

    def summary(self) -> str:
        parts = [f"{n} x {s}" for s, n in sorted(self.by_scheme.items())]
        line = f"quantized {len(self.replaced)} layer(s) ({', '.join(parts) or 'none'})"
        if self.experts_modules:
            line += f", {len(self.experts_modules)} of them MoE experts module(s)"
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


def _buffer_bytes(layer: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in layer.buffers(recurse=False))


def _is_per_expert_linear(model: nn.Module, entry: PlanEntry) -> bool:
    """A ``moe_experts`` entry naming one expert's ``nn.Linear`` (experts held as a ModuleList)."""
    if len(entry.layer.shape) != 2:
        return False
    try:
        return isinstance(model.get_submodule(entry.layer.name), nn.Linear)
    except AttributeError:
        return False


@dataclass
class _Swapped:
    """What :func:`_swap` put in the model, for the online quantizer."""

    linears: dict[str, QuantizedLinear] = field(default_factory=dict)
    experts: dict[str, QuantizedExperts] = field(default_factory=dict)
    """Experts module name (``...mlp.experts``) -> its quantized replacement."""
    expert_tensors: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    """Checkpoint tensor name -> ``(experts module, role, expert)``; role ``gate_up_proj`` / ``down_proj``
    with expert -1 for a fused stack, else ``gate`` / ``up`` / ``down`` of one expert."""


def _experts_groups(model: nn.Module, plan: Plan) -> dict[str, list[PlanEntry]]:
    """Planned fused-expert entries by experts module name, in plan order (per-expert Linears excluded)."""
    groups: dict[str, list[PlanEntry]] = {}
    for entry in plan.entries:
        if entry.decision is not Decision.QUANTIZE or entry.scheme is None:
            continue
        if entry.layer.kind is LayerKind.MOE_EXPERTS and not _is_per_expert_linear(model, entry):
            container = entry.layer.name.rpartition(".")[0]
            groups.setdefault(container, []).append(entry)
    return groups


def _experts_problem(model: nn.Module, container: str, entries: list[PlanEntry]) -> str | None:
    """Why the planned experts of ``container`` cannot be swapped (``None``: they can). Raises
    :class:`ApplyError` where the plan does not fit the model at all."""
    if any(len(entry.layer.shape) != 3 for entry in entries):
        return (
            "per-expert layers are quantized one by one only where each is an nn.Linear; these experts are "
            "not (hint: the checkpoint's per-expert tensors could not be fused into gate_up_proj/down_proj)"
        )
    try:
        module = model.get_submodule(container)
    except AttributeError:
        raise ApplyError(
            f"{entries[0].layer.name}: the plan names experts this model does not have"
        ) from None
    if isinstance(module, QuantizedExperts):
        raise ApplyError(f"{container}: the experts are quantized already (was the plan applied twice?)")
    params = {entry.layer.name.rpartition(".")[2] for entry in entries}
    if not params <= set(FUSED_PARAMS) or any(not hasattr(module, p) for p in params):
        missing = sorted(p for p in params if not hasattr(module, p))
        if missing:
            raise ApplyError(f"{container}.{missing[0]}: the plan names experts this model does not have")
        return f"expert layers {sorted(params)} are not the fused gate_up_proj/down_proj the MoE kernels take"
    if params != set(FUSED_PARAMS) or len({entry.scheme for entry in entries}) != 1:
        return MOE_PARTLY_PLANNED
    return None


def _swap(model: nn.Module, plan: Plan, quantize_now: bool) -> tuple[ApplyReport, _Swapped]:
    swapped = _Swapped()
    not_supported: list[tuple[str, str]] = []
    untouched = 0
    by_scheme: Counter[str] = Counter()
    bytes_before = bytes_after = 0
    experts_groups = _experts_groups(model, plan)
    # check the whole plan against the model before changing anything
    problems = {
        container: _experts_problem(model, container, entries)
        for container, entries in experts_groups.items()
    }
    for entry in plan.entries:
        if entry.decision is Decision.QUANTIZE and entry.layer.kind is LayerKind.LINEAR:
            _linear_at(model, entry.layer.name)
    done_experts: set[str] = set()
    for entry in plan.entries:
        if entry.decision is not Decision.QUANTIZE or entry.scheme is None:
            untouched += 1
            continue
        name = entry.layer.name
        if entry.layer.kind is LayerKind.MOE_EXPERTS and not _is_per_expert_linear(model, entry):
            container = name.rpartition(".")[0]
            if container in done_experts:
                continue
            done_experts.add(container)
            entries = experts_groups[container]
            problem = problems[container]
            if problem is None:
                try:
                    quantized = _swap_experts(model, container, entries, quantize_now, swapped)
                except UnsupportedSchemeError as error:
                    problem = str(error)
            if problem is not None:
                not_supported.extend((e.layer.name, problem) for e in entries)
                continue
            before, after = quantized
            bytes_before += before
            bytes_after += after
            by_scheme[entry.scheme.name] += len(entries)
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
        swapped.linears[name] = layer
        by_scheme[entry.scheme.name] += 1
        bytes_after += _buffer_bytes(layer)
    replaced_names = set(swapped.linears) | {
        e.layer.name for container in swapped.experts for e in experts_groups[container]
    }
    replaced = tuple(e.layer.name for e in plan.entries if e.layer.name in replaced_names)
    report = ApplyReport(
        replaced, tuple(not_supported), untouched, dict(by_scheme), bytes_before, bytes_after,
        tuple(swapped.experts),
    )  # fmt: skip
    return report, swapped


def _swap_experts(
    model: nn.Module, container: str, entries: list[PlanEntry], quantize_now: bool, swapped: _Swapped
) -> tuple[int, int]:
    """Replace the experts module ``container`` by a :class:`QuantizedExperts`; ``(bytes before, after)``."""
    parent, attr = _parent_and_attr(model, container)
    module = getattr(parent, attr)
    layer = QuantizedExperts.from_module(module, entries[0].scheme, layer_name=container)
    before = sum(getattr(module, p).numel() * getattr(module, p).element_size() for p in FUSED_PARAMS)
    if quantize_now:
        for param in FUSED_PARAMS:
            layer.load_fused(param, getattr(module, param).data)
    setattr(parent, attr, layer)  # the bf16 experts module is now unreferenced by the model
    del module
    swapped.experts[container] = layer
    for entry in entries:
        param = entry.layer.name.rpartition(".")[2]
        names = {entry.layer.name: (param, -1), f"{entry.layer.name}.weight": (param, -1)}
        if entry.layer.tensors:
            names.update(layer_tensor_roles(param, entry.layer.tensors, layer.num_experts))
        else:
            names.update(expert_tensor_names(entry.layer.name, layer.num_experts))
        for tensor_name, (role, expert) in names.items():
            swapped.expert_tensors[tensor_name] = (container, role, expert)
    return before, _buffer_bytes(layer)


def apply_plan(model: nn.Module, plan: Plan) -> ApplyReport:
    """Quantize ``model`` in place: every ``QUANTIZE`` Linear of ``plan`` becomes a :class:`QuantizedLinear`
    (bias, dtype and device kept; the weight quantized from the loaded one, which is then released), every
    planned experts module a :class:`QuantizedExperts` (quantized expert by expert, the bf16 module released)."""
    with torch.no_grad():
        report, _ = _swap(model, plan, quantize_now=True)
    return report


class OnlineQuantizer:
    """Feeds streamed checkpoint tensors to the quantized layers that :func:`prepare_online` created.

    ``quantize_on_load(name, tensor)`` accepts a checkpoint tensor name (``...q_proj.weight`` /
    ``...q_proj.bias``) or a module name (meaning its weight), a fused expert stack
    (``...experts.gate_up_proj``, ``...experts.down_proj``) or one expert's projection
    (``...experts.3.gate_proj.weight``, names as ``Layer.tensors`` lists them); it returns True when it
    consumed the tensor (quantized it into a planned layer, or set its bias), False for tensors that are not
    ours, which the loader then loads as usual. :meth:`finish` checks that every quantized layer got its weight.
    """

    def __init__(
        self,
        layers: dict[str, QuantizedLinear],
        report: ApplyReport,
        experts: dict[str, QuantizedExperts] | None = None,
        expert_tensors: dict[str, tuple[str, str, int]] | None = None,
    ) -> None:
        self.layers = layers
        self.report = report
        self.experts = experts or {}
        self.expert_tensors = expert_tensors or {}

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
            return self._expert_on_load(name, tensor)
        layer, leaf = target
        if leaf == "weight":
            layer.load_weight(tensor)
        else:
            layer.load_bias(tensor)
        return True

    def _expert_on_load(self, name: str, tensor: torch.Tensor) -> bool:
        target = self.expert_tensors.get(name)
        if target is None:
            return False
        container, role, expert = target
        if expert < 0:
            self.experts[container].load_fused(role, tensor)
        else:
            self.experts[container].load_expert_part(role, expert, tensor)
        return True

    def missing(self) -> list[str]:
        missing = [name for name, layer in self.layers.items() if not layer.weight_loaded]
        for container, experts in self.experts.items():
            parts = experts.missing()
            if parts:
                missing.append(
                    f"{container} (experts {', '.join(parts[:4])}{' ...' if len(parts) > 4 else ''})"
                )
        return missing

    def finish(self) -> ApplyReport:
        """Raise :class:`ApplyError` naming every quantized layer whose weight never arrived."""
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ApplyError(
                f"the checkpoint did not provide the weight of {len(missing)} quantized layer(s): "
                f"{shown} (hint: tied weights, or a checkpoint of another model)"
            )
        return self.report


def prepare_online(model: nn.Module, plan: Plan) -> OnlineQuantizer:
    """Swap every planned Linear for an empty :class:`QuantizedLinear` (same shape, bias, dtype, device) and
    every planned experts module for an empty :class:`QuantizedExperts`, and return the
    :class:`OnlineQuantizer` that a streaming loader calls per tensor."""
    report, swapped = _swap(model, plan, quantize_now=False)
    return OnlineQuantizer(swapped.linears, report, swapped.experts, swapped.expert_tensors)


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
