"""Reload an exported (compressed-tensors) checkpoint into mxrun's quantized layers, without requantizing.

:func:`load_exported` builds the transformers model from ``config.json`` (its ``quantization_config`` removed,
so transformers' own compressed-tensors path stays out of the way), then:

* every module with a stored ``weight_scale`` becomes mxrun's quantized layer for the scheme of the config
  group that targets it: a :class:`~mxrun.engine.methods.QuantizedLinear` for a Linear, and, for per-expert
  projections ``<experts>.<e>.gate_proj`` / ``up_proj`` / ``down_proj`` (Mixtral ``w1/w3/w2``) of a
  transformers-5 fused experts module, one :class:`~mxrun.engine.moe.QuantizedExperts` whose stacks are the
  stored experts, gate rows then up rows;
* the stored E4M3 codes and scales are copied into the layers' buffers as they are (fp32 scales, uint8 E8M0
  codes), so the model computes exactly what the model that was exported computed;
* every other stored tensor is set as the model's parameter or buffer (per-expert tensors of unquantized
  experts are stacked into the fused parameters).

The scheme of each group comes from mxrun's record in the config (exact, MX activation scale rule included)
or, for checkpoints written by other tools, from the compressed-tensors arguments
(:func:`~mxrun.export.compressed_tensors.scheme_from_ct`). A tensor the model has no place for, a model
parameter the checkpoint does not provide, a scale without a config group, or a shape that does not fit is a
:class:`ReloadError` naming the tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxrun.engine.empty_init import materialize_meta_parameters, parameters_on_meta, placeholder
from mxrun.engine.inventory import CHECKPOINT_RENAMES, CONFIG_FILE, EXPERT_ROLES
from mxrun.engine.methods import ORIGINAL_DTYPES, QuantizedLinear, UnsupportedSchemeError, method_for
from mxrun.engine.moe import FUSED_PARAMS, QuantizedExperts
from mxrun.engine.schemes import Scheme, WeightGranularity
from mxrun.export.compressed_tensors import MXRUN_KEY, QUANT_METHOD, CtSchemeError, scheme_from_ct
from mxrun.export.writer import ExportError, checkpoint_tensors
from mxrun.kernels.moe_gemm import ExpertWeightFormat

_PER_EXPERT = re.compile(r"^(?P<container>.+)\.(?P<expert>\d+)\.(?P<projection>[^.]+)$")


class ReloadError(ValueError):
    """An exported checkpoint that cannot be reloaded exactly; the message names the file or tensor."""


def _match(name: str, target: str) -> bool:
    """compressed-tensors' target rule: ``re:`` prefixes a regex (``re.match``), anything else is exact."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def _groups(folder: Path, qc: Mapping[str, Any]) -> list[tuple[Scheme, list[str]]]:
    config_groups = qc.get("config_groups")
    if not isinstance(config_groups, Mapping) or not config_groups:
        raise ReloadError(f"{folder / CONFIG_FILE}: quantization_config has no config_groups")
    record = qc.get(MXRUN_KEY) if isinstance(qc.get(MXRUN_KEY), Mapping) else {}
    recorded = record.get("groups") if isinstance(record.get("groups"), Mapping) else {}
    groups = []
    for name, group in config_groups.items():
        if not isinstance(group, Mapping):
            raise ReloadError(f"{folder / CONFIG_FILE}: config_groups.{name} must be an object")
        try:
            scheme = scheme_from_ct(name, group, recorded.get(name))
        except CtSchemeError as exc:
            raise ReloadError(f"{folder / CONFIG_FILE}: {exc}") from exc
        groups.append((scheme, [str(t) for t in group.get("targets") or []]))
    return groups


def _scheme_of(module: str, groups: list[tuple[Scheme, list[str]]], ignore: list[str], where: Path) -> Scheme:
    if any(_match(module, pattern) for pattern in ignore):
        raise ReloadError(f"{where}: {module} has a weight_scale but the ignore list names it")
    for scheme, targets in groups:
        if any(_match(module, target) for target in targets):
            return scheme
    raise ReloadError(f"{where}: {module} has a weight_scale but no config group targets it")


class _Reader:
    """Stored tensors by name, read on demand (one shard open at a time)."""

    def __init__(self, folder: Path) -> None:
        try:
            self.headers = checkpoint_tensors(folder)
        except ExportError as exc:
            raise ReloadError(str(exc)) from exc
        self.used: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        header = self.headers.get(name)
        if header is None:
            raise ReloadError(f"the checkpoint has no tensor {name!r}")
        with safe_open(str(header.file), framework="pt") as stream:
            tensor = stream.get_tensor(name)
        self.used.add(name)
        return tensor


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, *, exact_dtype: bool = True) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        if src.numel() == dst.numel() == 1:
            src = src.reshape(dst.shape)  # a per-tensor scale: [1] on disk, 0-dim or [1, 1] in mxrun
        else:
            raise ReloadError(
                f"{name}: stored shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}"
            )
    if exact_dtype and src.dtype != dst.dtype:
        raise ReloadError(f"{name}: stored as {src.dtype}, the quantized layer holds {dst.dtype}")
    with torch.no_grad():
        dst.copy_(src.to(dst.device))


def _scale_buffer(layer: QuantizedLinear, scheme: Scheme) -> torch.Tensor:
    return (
        layer.weight_scale_e8m0 if scheme.weights.granularity is WeightGranularity.MX else layer.weight_scale
    )


def _load_linear(
    model: nn.Module, module_name: str, stored_prefix: str, scheme: Scheme, reader: _Reader
) -> None:
    parent_name, _, attr = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, attr, None)
    if not isinstance(linear, nn.Linear):
        raise ReloadError(
            f"{stored_prefix}: stored as a quantized Linear, but the model has "
            f"{type(linear).__name__ if linear is not None else 'nothing'} at {module_name}"
        )
    for leaf in ("weight", "bias"):
        if linear._parameters.get(leaf) is not None and linear._parameters[leaf].device.type == "meta":
            linear._parameters[leaf] = placeholder(linear._parameters[leaf], "cpu")
    try:
        layer = QuantizedLinear.from_linear(linear, method_for(scheme), layer_name=module_name)
    except UnsupportedSchemeError as exc:
        raise ReloadError(str(exc)) from exc
    rows = layer.weight_rows()  # the buffer, or a row-major copy of a box-major one
    _copy(rows, reader.get(f"{stored_prefix}.weight"), f"{stored_prefix}.weight")
    if layer.weight_box_major:
        layer.load_weight_rows(rows)
    _copy(
        _scale_buffer(layer, scheme),
        reader.get(f"{stored_prefix}.weight_scale"),
        f"{stored_prefix}.weight_scale",
    )
    if f"{stored_prefix}.bias" in reader.headers:
        if layer.bias is None:
            raise ReloadError(f"{stored_prefix}.bias: the model's {module_name} has no bias")
        _copy(layer.bias, reader.get(f"{stored_prefix}.bias"), f"{stored_prefix}.bias", exact_dtype=False)
    layer.weight_loaded = True
    setattr(parent, attr, layer)


def _load_experts(
    model: nn.Module,
    container: str,
    projections: dict[str, dict[int, str]],
    scheme: Scheme,
    reader: _Reader,
) -> None:
    """Replace the experts module ``container`` by a :class:`QuantizedExperts` holding the stored experts."""
    parent_name, _, attr = container.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, attr)
    for leaf in FUSED_PARAMS:
        if module._parameters.get(leaf) is not None and module._parameters[leaf].device.type == "meta":
            module._parameters[leaf] = placeholder(module._parameters[leaf], "cpu")
    try:
        layer = QuantizedExperts.from_module(module, scheme, layer_name=container)
    except UnsupportedSchemeError as exc:
        raise ReloadError(str(exc)) from exc
    experts, inter = layer.num_experts, layer.intermediate_dim
    for role in ("gate", "up", "down"):
        if sorted(projections.get(role, {})) != list(range(experts)):
            raise ReloadError(
                f"{container}: the checkpoint does not store the {role} projection of all {experts} experts"
            )
    gate_up, down = layer.weights("gate_up_proj"), layer.weights("down_proj")
    fmt = gate_up.format
    if fmt is ExpertWeightFormat.FP8_BLOCK and inter % 128:
        raise ReloadError(f"{container}: 128x128 blocks cannot be split at intermediate size {inter}")
    scale_rows = inter // 128 if fmt is ExpertWeightFormat.FP8_BLOCK else inter
    for e in range(experts):
        gate, up, dn = (projections[role][e] for role in ("gate", "up", "down"))
        _copy(gate_up.data[e, :inter], reader.get(f"{gate}.weight"), f"{gate}.weight")
        _copy(gate_up.data[e, inter:], reader.get(f"{up}.weight"), f"{up}.weight")
        _copy(down.data[e], reader.get(f"{dn}.weight"), f"{dn}.weight")
        gate_scale, up_scale = reader.get(f"{gate}.weight_scale"), reader.get(f"{up}.weight_scale")
        if fmt is ExpertWeightFormat.FP8_TENSOR:
            if not torch.equal(gate_scale, up_scale):
                raise ReloadError(
                    f"{gate}.weight_scale: gate and up have different per-tensor scales; mxrun's experts share "
                    "one scale per expert for both (they would need requantizing)"
                )
            _copy(gate_up.scale[e], gate_scale, f"{gate}.weight_scale")
        else:
            _copy(gate_up.scale[e, :scale_rows], gate_scale, f"{gate}.weight_scale")
            _copy(gate_up.scale[e, scale_rows:], up_scale, f"{up}.weight_scale")
        _copy(down.scale[e], reader.get(f"{dn}.weight_scale"), f"{dn}.weight_scale")
    _mark_loaded(layer)
    setattr(parent, attr, layer)


def _mark_loaded(layer: QuantizedExperts) -> None:
    # QuantizedExperts tracks arrivals for the streaming loader; every expert of this one is filled above.
    layer._loaded = {role: [True] * layer.num_experts for role in layer._loaded}


def _is_experts_module(module: nn.Module | None) -> bool:
    return module is not None and all(
        isinstance(getattr(module, p, None), torch.Tensor) for p in FUSED_PARAMS
    )


def _model_dtype(config: Mapping[str, Any]) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    return dtype if dtype in ORIGINAL_DTYPES else torch.bfloat16


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dev dependency
        raise ReloadError(
            "reloading an exported checkpoint needs transformers (pip install transformers)"
        ) from exc
    config = transformers.AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # mxrun's layers replace transformers' compressed-tensors path
    with parameters_on_meta():  # no bf16 weights: quantized layers get stand-ins, the rest is filled below
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_exported(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """The transformers model of an exported checkpoint folder, its quantized layers filled from the stored
    codes and scales (see the module docstring), on ``device``, in eval mode."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReloadError(f"{config_path}: missing") from None
    except (OSError, ValueError) as exc:
        raise ReloadError(f"{config_path}: cannot read ({exc})") from exc
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != QUANT_METHOD:
        raise ReloadError(f"{config_path}: no quantization_config with quant_method {QUANT_METHOD!r}")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ReloadError(
            f"{config_path}: quantization_status {qc.get('quantization_status')!r}; only "
            "'compressed' checkpoints hold stored codes"
        )
    groups = _groups(folder, qc)
    ignore = [str(name) for name in qc.get("ignore") or []]
    renames = CHECKPOINT_RENAMES.get(str(config.get("model_type", "")), ())

    def loaded(name: str) -> str:
        for stored_part, loaded_part in renames:
            name = name.replace(stored_part, loaded_part)
        return name

    reader = _Reader(folder)
    model = _skeleton(folder, _model_dtype(config))
    modules = dict(model.named_modules())

    # quantized modules: those with a stored weight_scale
    experts: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    expert_schemes: dict[str, Scheme] = {}
    for scale_name in sorted(n for n in reader.headers if n.endswith(".weight_scale")):
        prefix = scale_name.removesuffix(".weight_scale")
        scheme = _scheme_of(prefix, groups, ignore, config_path)
        per_expert = _PER_EXPERT.match(loaded(prefix))
        if (
            per_expert
            and per_expert["projection"] in EXPERT_ROLES
            and _is_experts_module(modules.get(per_expert["container"]))
        ):
            container = per_expert["container"]
            if expert_schemes.setdefault(container, scheme) != scheme:
                raise ReloadError(f"{prefix}: the experts of {container} are stored under different schemes")
            experts[container][EXPERT_ROLES[per_expert["projection"]]][int(per_expert["expert"])] = prefix
        else:
            _load_linear(model, loaded(prefix), prefix, scheme, reader)
    for container, projections in experts.items():
        _load_experts(model, container, projections, expert_schemes[container], reader)

    # everything else: parameters and buffers as stored, into storage allocated only now (the quantized
    # layers are in place, so the model never holds more than its final size plus the tensor being read)
    materialize_meta_parameters(model, "cpu")
    targets = model.state_dict(keep_vars=True)
    filled: set[str] = set()
    for name in reader.headers:
        if name in reader.used:
            continue
        model_name = loaded(name)
        per_expert = _PER_EXPERT.match(model_name.removesuffix(".weight"))
        if model_name in targets:
            _copy(targets[model_name], reader.get(name), name, exact_dtype=False)
            filled.add(model_name)
        elif (
            per_expert
            and name.endswith(".weight")
            and per_expert["projection"] in EXPERT_ROLES
            and _is_experts_module(modules.get(per_expert["container"]))
        ):
            container, expert = per_expert["container"], int(per_expert["expert"])
            module = modules[container]
            role = EXPERT_ROLES[per_expert["projection"]]
            inter = module.down_proj.shape[-1]
            dst = {
                "gate": module.gate_up_proj[expert, :inter],
                "up": module.gate_up_proj[expert, inter:],
                "down": module.down_proj[expert],
            }[role]
            _copy(dst, reader.get(name), name, exact_dtype=False)
            filled.add(f"{container}.{'down_proj' if role == 'down' else 'gate_up_proj'}")
        else:
            raise ReloadError(f"{reader.headers[name].file}: tensor {name!r} has no place in the model")
    quantized = {n for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}
    missing = [
        name
        for name, _ in model.named_parameters()
        if name not in filled and name.rpartition(".")[0] not in quantized
    ]
    if missing:
        raise ReloadError(
            f"{folder}: the checkpoint does not provide {len(missing)} parameter(s) of the model: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return model.to(device).eval()


__all__ = ["ReloadError", "load_exported"]
