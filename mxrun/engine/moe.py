"""Quantized MoE experts: the module that replaces a transformers-5 experts module, quantized expert by expert.

transformers 5 MoE blocks (Qwen3-MoE, Mixtral, OLMoE, ...) hold a router (``mlp.gate``) and an experts module
(``mlp.experts``) with fused ``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]`` and ``act_fn``; the
block calls ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
:class:`QuantizedExperts` has that signature, so swapping ``mlp.experts`` keeps the model's own router (its
softmax or sigmoid, its renormalisation, the dtype of its weights) and only the expert GEMMs change.

Life cycle, as for :class:`~mxrun.engine.methods.QuantizedLinear`: the module is created with empty quantized
buffers (:meth:`QuantizedExperts.from_module`), weights are quantized as they arrive, one expert at a time,
and nothing high-precision is kept:

* a fused stack (``load_fused("gate_up_proj", [E, 2I, H])``) is quantized expert by expert (one expert's
  bf16 slice moved to the device at a time);
* per-expert checkpoint tensors (``load_expert_part("gate", e, [I, H])``) are quantized when the expert's
  projection is complete: at once for ``down``, when both halves are there for ``gate_up`` (a 128x128 block or
  a per-tensor scale may span the gate and up rows, so the first half waits, alone, for its partner).

What each scheme does for experts (scheme fields as :func:`~mxrun.engine.methods.method_for` reads them;
shapes the Linear method refuses are refused here too, for both projections):

========================  ==================================  ==============================================
scheme                    weights                             activations (both GEMMs; the down GEMM's are h)
========================  ==================================  ==============================================
``fp8-tensor``            E4M3, one fp32 scale per expert      FP8, one dynamic scale per call (x; all h)
``fp8-channel``           E4M3, one scale per output row       FP8, one dynamic scale per token / pair row
``fp8-block``             E4M3, 128x128 tile scales            FP8, 1x128 groups
``mxfp8``                 MXFP8 (E8M0 per 32 of K)             MXFP8 quantize-dequantize in registers, bf16 MMA
``*-weight-only``         as above                             bf16/fp16 (W8A16: weight decoded in registers)
========================  ==================================  ==============================================

Forward: the Triton grouped GEMMs of :mod:`mxrun.kernels.moe_gemm` on CUDA, the per-expert torch reference on
CPU (the same numerics up to fp32 summation order).
"""

from __future__ import annotations

import torch
from torch import nn

from mxrun.engine.methods import (
    ORIGINAL_DTYPES,
    UnsupportedSchemeError,
    align_mxfp8_into,
    cached_mx_foldable,
    cached_tile_scales,
    method_for,
    quantize_fp8_into,
    quantize_mxfp8_into,
)
from mxrun.engine.schemes import ActivationGranularity, ScaleRule, Scheme, SchemeFamily
from mxrun.kernels.moe_gemm import (
    FP8_WEIGHT_GRANULARITY,
    ExpertActivation,
    ExpertWeightFormat,
    ExpertWeights,
    expert_scale_dtype,
    expert_scale_shape,
    moe_experts,
)
from mxrun.kernels.mxfp8_quantize import MxScaleRule

FUSED_PARAMS = ("gate_up_proj", "down_proj")
"""The fused expert parameters a :class:`QuantizedExperts` replaces, by their transformers-5 names."""
EXPERT_ROLES = ("gate", "up", "down")

_FORMAT = {
    SchemeFamily.FP8_TENSOR: ExpertWeightFormat.FP8_TENSOR,
    SchemeFamily.FP8_CHANNEL: ExpertWeightFormat.FP8_CHANNEL,
    SchemeFamily.FP8_BLOCK: ExpertWeightFormat.FP8_BLOCK,
    SchemeFamily.MXFP8: ExpertWeightFormat.MXFP8,
}
_FP8_ACTIVATION = {
    ActivationGranularity.TENSOR: ExpertActivation.FP8_TENSOR,
    ActivationGranularity.TOKEN: ExpertActivation.FP8_TOKEN,
    ActivationGranularity.GROUP: ExpertActivation.FP8_GROUP,
}


def expert_formats(
    scheme: Scheme, layer_name: str, hidden: int, intermediate: int
) -> tuple[ExpertWeightFormat, ExpertActivation, MxScaleRule]:
    """``(weight format, activation handling, MX weight scale rule)`` for experts under ``scheme``; raises
    :class:`UnsupportedSchemeError` (naming ``layer_name``) where the Linear method would refuse either
    projection."""
    method = method_for(scheme)
    method.check(f"{layer_name}.gate_up_proj", 2 * intermediate, hidden)
    method.check(f"{layer_name}.down_proj", hidden, intermediate)
    fmt = _FORMAT[scheme.family]
    weight_rule = MxScaleRule((scheme.weights.scale_rule or ScaleRule.ROUND_UP).value)
    acts = scheme.activations
    if acts is None:
        return fmt, ExpertActivation.NONE, weight_rule
    if acts.granularity is ActivationGranularity.MX:
        floor = acts.scale_rule is ScaleRule.FLOOR
        return fmt, ExpertActivation.MX_FLOOR if floor else ExpertActivation.MX_ROUND_UP, weight_rule
    return fmt, _FP8_ACTIVATION[acts.granularity], weight_rule


def _is_silu(act_fn: object) -> bool:
    return (
        isinstance(act_fn, nn.SiLU)
        or type(act_fn).__name__ == "SiLUActivation"
        or act_fn is nn.functional.silu
    )


def experts_module_support(module: nn.Module) -> str | None:
    """Why ``module`` is not an experts module :class:`QuantizedExperts` can replace (``None`` when it is).

    Replaceable: fused ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` parameters, K last,
    no biases, SiLU gating with gate rows first, nothing after the down projection (transformers' flags
    ``is_transposed``, ``has_bias``, ``has_gate``, ``has_post_expert_norm``, ``is_concatenated`` say so)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return f"{type(module).__name__} has no fused gate_up_proj/down_proj parameters"
    if gate_up.dim() != 3 or down.dim() != 3:
        return f"fused experts must be 3-D, got gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}"
    if getattr(module, "is_transposed", False):
        return "experts stored transposed ([E, K, N]) are not supported by the MoE kernels yet"
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
        return "experts with biases are not supported by the MoE kernels yet"
    if not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False):
        return "only gated experts (SiLU(gate) * up, then down) are supported"
    if not getattr(module, "is_concatenated", True):
        return "experts with interleaved gate/up rows are not supported"
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return f"{type(module).__name__} has its own gating function; only SiLU(gate) * up is supported"
    if not _is_silu(getattr(module, "act_fn", None)):
        return f"activation {type(getattr(module, 'act_fn', None)).__name__} is not SiLU"
    experts, two_i, hidden = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (experts, hidden, two_i // 2):
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not chain"
    if gate_up.dtype not in ORIGINAL_DTYPES:
        return f"experts in {gate_up.dtype}; the MoE kernels run bfloat16 or float16 models"
    return None


class QuantizedExperts(nn.Module):
    """Drop-in for a transformers-5 experts module: ``forward(hidden_states, top_k_index, top_k_weights)``.

    Buffers (persistent, so ``state_dict`` carries the quantized experts): ``gate_up_proj`` E4M3
    ``[E, 2I, H]``, ``down_proj`` E4M3 ``[E, H, I]``, and their scales ``gate_up_proj_scale`` /
    ``down_proj_scale`` (fp32) or ``..._scale_e8m0`` (uint8, MXFP8), laid out as
    :func:`~mxrun.kernels.moe_gemm.expert_scale_shape` says (expert first, so the stacks shard by expert).
    """

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        scheme: Scheme,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        layer_name: str = "",
    ) -> None:
        super().__init__()
        if dtype not in ORIGINAL_DTYPES:
            raise UnsupportedSchemeError(
                f"{layer_name}: experts in {dtype}; the MoE kernels run bf16/fp16 models"
            )
        self.num_experts = num_experts
        self.hidden_dim = hidden
        self.intermediate_dim = intermediate
        self.scheme = scheme
        self.dtype = dtype
        self.layer_name = layer_name
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.weight_format, self.activation, self.weight_rule = expert_formats(
            scheme, layer_name, hidden, intermediate
        )
        scale_suffix = "_scale_e8m0" if self.weight_format is ExpertWeightFormat.MXFP8 else "_scale"
        self._scale_names = {param: param + scale_suffix for param in FUSED_PARAMS}
        for param, (n, k) in (
            ("gate_up_proj", (2 * intermediate, hidden)),
            ("down_proj", (hidden, intermediate)),
        ):
            data = torch.empty((num_experts, n, k), dtype=torch.float8_e4m3fn, device=self.device)
            scale = torch.empty(
                expert_scale_shape(self.weight_format, num_experts, n, k),
                dtype=expert_scale_dtype(self.weight_format),
                device=self.device,
            )
            self.register_buffer(param, data)
            self.register_buffer(self._scale_names[param], scale)
        self._loaded = {role: [False] * num_experts for role in EXPERT_ROLES}
        self._pending: dict[tuple[int, str], torch.Tensor] = {}
        """Gate or up half of an expert whose other half has not arrived (per-expert checkpoints only)."""

    @classmethod
    def from_module(cls, module: nn.Module, scheme: Scheme, layer_name: str = "") -> QuantizedExperts:
        """Empty quantized twin of a transformers-5 experts module (its weights are not read)."""
        reason = experts_module_support(module)
        if reason is not None:
            raise UnsupportedSchemeError(f"{layer_name}: {reason}")
        experts, two_i, hidden = module.gate_up_proj.shape
        return cls(
            experts, hidden, two_i // 2, scheme, dtype=module.gate_up_proj.dtype,
            device=module.gate_up_proj.device, layer_name=layer_name,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ loading

    def weights(self, param: str) -> ExpertWeights:
        """The quantized stack of ``gate_up_proj`` or ``down_proj``, as the kernels take it."""
        return ExpertWeights(
            getattr(self, param), getattr(self, self._scale_names[param]), self.weight_format
        )

    def _store(self, param: str, expert: int, weight: torch.Tensor) -> None:
        """Quantize one expert's ``[N, K]`` projection straight into its slice of the stacks: the bytes of
        :func:`~mxrun.kernels.moe_gemm.quantize_expert`, with the CPU quantizer's scratch bounded (see
        :func:`~mxrun.engine.methods.quantize_fp8_into`)."""
        weight = weight.detach().to(self.device)  # the only high-precision tensor alive here
        data = getattr(self, param)[expert]
        scale = getattr(self, self._scale_names[param])[expert]
        if self.weight_format is ExpertWeightFormat.MXFP8:
            quantize_mxfp8_into(weight, self.weight_rule, data, scale)
            if self.scheme.weights.tile_aligned:  # the recipe's `tile_aligned: true`, expert by expert
                align_mxfp8_into(data, scale)
        else:
            quantize_fp8_into(weight, FP8_WEIGHT_GRANULARITY[self.weight_format], data, scale)

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"{self.layer_name}: expert {expert} out of range (the layer has {self.num_experts})"
            )

    def load_fused(self, param: str, weight: torch.Tensor) -> None:
        """Quantize a whole fused stack (``gate_up_proj`` ``[E, 2I, H]`` or ``down_proj`` ``[E, H, I]``),
        expert by expert."""
        if param not in FUSED_PARAMS:
            raise ValueError(
                f"{self.layer_name}: unknown expert parameter {param!r} (expected {FUSED_PARAMS})"
            )
        expected = tuple(getattr(self, param).shape)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"{self.layer_name}.{param}: got shape {tuple(weight.shape)}, expected {expected}"
            )
        _check_float(weight, f"{self.layer_name}.{param}")
        with torch.no_grad():
            for expert in range(self.num_experts):
                self._store(param, expert, weight[expert])
        roles = ("gate", "up") if param == "gate_up_proj" else ("down",)
        for role in roles:
            self._loaded[role] = [True] * self.num_experts
        for role in roles:
            for expert in range(self.num_experts):
                self._pending.pop((expert, role), None)

    def load_expert_part(self, role: str, expert: int, weight: torch.Tensor) -> None:
        """Quantize one expert's ``gate`` ``[I, H]``, ``up`` ``[I, H]`` or ``down`` ``[H, I]`` projection
        (``gate`` and ``up`` together, once both have arrived)."""
        self._check_expert(expert)
        name = f"{self.layer_name}.{expert}.{role}"
        expected = (
            (self.hidden_dim, self.intermediate_dim)
            if role == "down"
            else (self.intermediate_dim, self.hidden_dim)
        )
        if role not in EXPERT_ROLES:
            raise ValueError(f"{self.layer_name}: unknown expert projection role {role!r}")
        if tuple(weight.shape) != expected:
            raise ValueError(f"{name}: got shape {tuple(weight.shape)}, expected {expected}")
        _check_float(weight, name)
        with torch.no_grad():
            if role == "down":
                self._store("down_proj", expert, weight)
            else:
                partner = "up" if role == "gate" else "gate"
                other = self._pending.pop((expert, partner), None)
                if other is None:
                    self._pending[(expert, role)] = weight.detach().to(self.device, copy=True)
                    return
                gate, up = (weight, other) if role == "gate" else (other, weight)
                self._store("gate_up_proj", expert, torch.cat([gate.to(self.device), up.to(self.device)]))
                del other
                self._loaded["gate"][expert] = self._loaded["up"][expert] = True
                return
        self._loaded[role][expert] = True

    @property
    def weight_loaded(self) -> bool:
        return not self.missing()

    def missing(self) -> list[str]:
        """``<expert>.<role>`` for every expert projection not quantized yet."""
        return [
            f"{e}.{role}"
            for role in EXPERT_ROLES
            for e in range(self.num_experts)
            if not self._loaded[role][e]
        ]

    def quantized_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"{self.layer_name}: hidden states have {hidden_states.shape[-1]} features, the experts "
                f"{self.hidden_dim}"
            )
        x = hidden_states.reshape(-1, self.hidden_dim)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        acts = self.scheme.activations
        # below the scheme's `min_rows` the activations stay bf16/fp16: weight-only (W8A16)
        quantized = acts is None or acts.quantizes(x.shape[0])
        activation = self.activation if quantized else ExpertActivation.NONE
        tile_scales = None
        if self.scheme.weights.tile_aligned and activation.is_mx and x.is_cuda:
            tile_scales = tuple(
                cached_tile_scales(
                    self, self.weights(p).scale, *getattr(self, p).shape[1:], f"{self.layer_name}.{p}"
                )
                for p in FUSED_PARAMS
            )
        # MXFP8 stacks whose every scale code allows it: the kernels fold the scales into the E4M3 widening
        # (codes read once per loaded value of the stacks, at the first forward after loading)
        foldable = tile_scales is None and self.weight_format is ExpertWeightFormat.MXFP8 and x.is_cuda
        for param in FUSED_PARAMS if foldable else ():
            stack = self.weights(param)
            foldable = foldable and cached_mx_foldable(self, stack.scale, stack.data, param)
        out = moe_experts(
            x,
            top_k_index.reshape(x.shape[0], -1),
            top_k_weights.reshape(x.shape[0], -1),
            self.weights("gate_up_proj"),
            self.weights("down_proj"),
            activation,
            tile_scales=tile_scales,
            mx_scales_foldable=foldable,
        )
        return out.reshape(hidden_states.shape).to(hidden_states.dtype)

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` move the quantized buffers but never cast them (as QuantizedLinear does);
        a cast to bf16/fp16 changes the activation dtype."""
        quantized = {name: self._buffers.pop(name) for name in list(self._buffers)}
        pending = self._pending
        try:
            result = super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=torch.float32, device=self.device))
            for name, tensor in quantized.items():
                self._buffers[name] = tensor.to(probe.device) if tensor is not None else None
            self._pending = {key: t.to(probe.device) for key, t in pending.items()}
        self.device = probe.device
        if probe.dtype in ORIGINAL_DTYPES:
            self.dtype = probe.dtype
        return result

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"dtype={self.dtype}, weights={self.weight_format.value}, activations={self.activation.value}, "
            f"scheme={self.scheme.name}"
        )


def _check_float(weight: torch.Tensor, name: str) -> None:
    if not weight.dtype.is_floating_point or weight.element_size() < 2:
        raise ValueError(f"{name}: the weight must be fp32/bf16/fp16 to quantize, got {weight.dtype}")


def expert_tensor_names(layer_name: str, num_experts: int) -> dict[str, tuple[str, int]]:
    """Checkpoint names of the per-expert tensors of a fused experts layer -> ``(role, expert)``, for plans
    made from a module (whose layers carry no tensor names): both transformers spellings
    (``<experts>.<e>.gate_proj.weight`` and Mixtral's ``w1/w3/w2``), and the stored ``block_sparse_moe`` name
    of a Mixtral-style checkpoint that transformers renames to ``mlp`` on load."""
    from mxrun.engine.inventory import CHECKPOINT_RENAMES
    from mxrun.engine.inventory import EXPERT_ROLES as PROJECTION_ROLES

    container, _, param = layer_name.rpartition(".")
    roles = ("gate", "up") if param == "gate_up_proj" else ("down",)
    containers = {container}
    for renames in CHECKPOINT_RENAMES.values():
        for stored, loaded in renames:
            if loaded in container:
                containers.add(container.replace(loaded, stored))
    names = {}
    for prefix in sorted(containers):
        for projection, role in PROJECTION_ROLES.items():
            if role in roles:
                for expert in range(num_experts):
                    names[f"{prefix}.{expert}.{projection}.weight"] = (role, expert)
    return names


def layer_tensor_roles(param: str, tensors: tuple[str, ...], num_experts: int) -> dict[str, tuple[str, int]]:
    """``Layer.tensors`` of a fused experts layer -> ``(role, expert)``: stacking order ``gate_0, up_0, gate_1,
    up_1, ...`` for ``gate_up_proj`` and ``down_0, down_1, ...`` for ``down_proj`` (see
    :class:`~mxrun.engine.layers.Layer`); a single tensor is the fused stack itself (role ``param``)."""
    if len(tensors) == 1:
        return {tensors[0]: (param, -1)}
    roles = ("gate", "up") if param == "gate_up_proj" else ("down",)
    if len(tensors) != len(roles) * num_experts:
        raise ValueError(
            f"{param}: {len(tensors)} checkpoint tensors for {num_experts} experts (expected "
            f"{len(roles) * num_experts})"
        )
    return {name: (roles[i % len(roles)], i // len(roles)) for i, name in enumerate(tensors)}


__all__ = [
    "FUSED_PARAMS",
    "QuantizedExperts",
    "expert_formats",
    "expert_tensor_names",
    "experts_module_support",
    "layer_tensor_roles",
]
