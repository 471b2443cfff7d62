"""mxrun schemes in the compressed-tensors checkpoint vocabulary (what vLLM and SGLang load).

A compressed-tensors checkpoint carries a ``quantization_config`` in ``config.json``:

* ``quant_method: compressed-tensors``, ``quantization_status: compressed``;
* ``config_groups``: one group per distinct scheme, each with ``targets`` (the checkpoint module names it
  covers: exact names for Linears, one ``re:`` pattern per MoE experts module for its per-expert
  projections), ``weights`` and ``input_activations`` (quantization arguments) and its ``format``;
* ``format``: the groups' format when they share one, else ``mixed-precision``;
* ``ignore``: every Linear (and expert projection) left unquantized, lm_head included, by checkpoint name.

Tensors per quantized module (``<module>.<name>``), as the compressors of compressed-tensors 0.20 read them:

=====================  =============================  ==============================================
mxrun scheme           ``weight``                      ``weight_scale``
=====================  =============================  ==============================================
fp8 tensor             E4M3 ``[N, K]``                 fp32 ``[1]``
fp8 channel            E4M3 ``[N, K]``                 fp32 ``[N, 1]``
fp8 block 128x128      E4M3 ``[N, K]``                 fp32 ``[ceil(N/128), ceil(K/128)]``
mxfp8                  E4M3 ``[N, K]``                 uint8 E8M0 codes ``[N, K/32]`` (2^(c-127))
=====================  =============================  ==============================================

Formats: ``float-quantized`` for FP8 weights with FP8 activations, ``naive-quantized`` for FP8 weight-only,
``mxfp8-quantized`` for MXFP8 with or without activations (the format compressed-tensors itself infers for
each argument set). Activations are always dynamic (no ``input_scale`` is stored).

What compressed-tensors cannot say, mxrun records under the extra key :data:`MXRUN_KEY` of the
``quantization_config`` (compressed-tensors' ``QuantizationConfig`` ignores unknown keys, and vLLM reads only
the keys it knows): the MX scale rule of the dynamic activations (round-up or the spec's floor), the scheme
names and definitions, the resolved recipe with its fingerprint, the mxrun version, and the absolute path
of the source checkpoint (``source``: ``mxrun --model <export>`` compares with it while it is there).
Reloading in mxrun uses that record when present, and falls back to :func:`scheme_from_ct` otherwise.

This module writes plain dicts and never imports compressed-tensors (a test checks the files with it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from mxrun.engine.schemes import (
    MX_BLOCK,
    ActivationGranularity,
    Scheme,
    WeightGranularity,
    build_scheme,
)

QUANT_METHOD = "compressed-tensors"
QUANTIZATION_STATUS = "compressed"
MXRUN_KEY = "mxrun"
"""Extra key of ``quantization_config`` holding mxrun's own record (see the module docstring)."""
MXRUN_RECORD_FORMAT = "mxrun-export"
FP8_BLOCK_STRUCTURE = (128, 128)
E8M0_SCALE_DTYPE = "torch.uint8"
"""How compressed-tensors spells the dtype of MX scales in ``scale_dtype``."""


class CtFormat(str, Enum):
    """compressed-tensors compression formats mxrun writes."""

    FLOAT_QUANTIZED = "float-quantized"
    NAIVE_QUANTIZED = "naive-quantized"
    MXFP8_QUANTIZED = "mxfp8-quantized"
    MIXED_PRECISION = "mixed-precision"


class CtSchemeError(ValueError):
    """A scheme with no compressed-tensors equivalent, or a quantization config mxrun cannot read."""


_CT_WEIGHT_STRATEGY = {
    WeightGranularity.TENSOR: "tensor",
    WeightGranularity.CHANNEL: "channel",
    WeightGranularity.BLOCK: "block",
    WeightGranularity.MX: "group",
}
_CT_ACTIVATION_STRATEGY = {
    ActivationGranularity.TENSOR: "tensor",
    ActivationGranularity.TOKEN: "token",
    ActivationGranularity.GROUP: "group",
    ActivationGranularity.MX: "group",
}


def _fp8_args(strategy: str, *, dynamic: bool) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic}


def weight_args(scheme: Scheme) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` (as JSON) of the scheme's weights."""
    granularity = scheme.weights.granularity
    args = _fp8_args(_CT_WEIGHT_STRATEGY[granularity], dynamic=False)
    if granularity is WeightGranularity.BLOCK:
        block = tuple(scheme.weights.block_size or FP8_BLOCK_STRUCTURE)
        if block != FP8_BLOCK_STRUCTURE:
            raise CtSchemeError(
                f"scheme {scheme.name!r}: {block[0]}x{block[1]} weight blocks; mxrun exports 128x128 only"
            )
        args["block_structure"] = list(block)
    elif granularity is WeightGranularity.MX:
        args["group_size"] = MX_BLOCK
        args["scale_dtype"] = E8M0_SCALE_DTYPE
    return args


def activation_args(scheme: Scheme) -> dict[str, Any] | None:
    """compressed-tensors ``QuantizationArgs`` (as JSON) of the dynamic activations; None for weight-only."""
    acts = scheme.activations
    if acts is None:
        return None
    args = _fp8_args(_CT_ACTIVATION_STRATEGY[acts.granularity], dynamic=True)
    if acts.granularity is ActivationGranularity.GROUP:
        args["group_size"] = acts.group_size or FP8_BLOCK_STRUCTURE[1]
    elif acts.granularity is ActivationGranularity.MX:
        args["group_size"] = MX_BLOCK
        args["scale_dtype"] = E8M0_SCALE_DTYPE
    return args


def ct_format(scheme: Scheme) -> CtFormat:
    """The compression format of a module quantized with ``scheme`` (as compressed-tensors infers it)."""
    if scheme.weights.granularity is WeightGranularity.MX:
        return CtFormat.MXFP8_QUANTIZED
    return CtFormat.NAIVE_QUANTIZED if scheme.weight_only else CtFormat.FLOAT_QUANTIZED


def scheme_to_ct(scheme: Scheme, targets: Sequence[str]) -> dict[str, Any]:
    """One ``config_groups`` entry: ``targets``, ``weights``, ``input_activations``, ``format``."""
    return {
        "targets": list(targets),
        "weights": weight_args(scheme),
        "input_activations": activation_args(scheme),
        "output_activations": None,
        "format": ct_format(scheme).value,
    }


def _mxrun_spec(scheme: Scheme) -> dict[str, Any]:
    """The scheme in the recipe's own vocabulary (what :func:`~mxrun.engine.schemes.build_scheme` reads)."""
    definition = scheme.to_json()
    return {
        "weights": definition["weights"],
        "activations": definition.get("activations"),  # None: weight-only, spelled out for build_scheme
    }


def build_quantization_config(
    groups: Sequence[tuple[Scheme, Sequence[str]]],
    ignore: Sequence[str],
    recipe_record: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``.

    ``groups`` is one ``(scheme, targets)`` per distinct scheme, in plan order; ``ignore`` the checkpoint
    names of every Linear and expert projection left unquantized; ``recipe_record`` what mxrun records about
    the recipe (:func:`mxrun.export.writer.recipe_record`: resolved recipe, fingerprint, version)."""
    config_groups: dict[str, Any] = {}
    schemes: dict[str, Any] = {}
    for index, (scheme, targets) in enumerate(groups):
        name = f"group_{index}"
        config_groups[name] = scheme_to_ct(scheme, targets)
        schemes[name] = {"scheme": scheme.name, **_mxrun_spec(scheme)}
    formats = {group["format"] for group in config_groups.values()}
    fmt = formats.pop() if len(formats) == 1 else CtFormat.MIXED_PRECISION.value
    return {
        "quant_method": QUANT_METHOD,
        "format": fmt,
        "quantization_status": QUANTIZATION_STATUS,
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        MXRUN_KEY: {"format": MXRUN_RECORD_FORMAT, **recipe_record, "groups": schemes},
    }


# ------------------------------------------------------------------------------------------ reading back


def _strategy(args: Mapping[str, Any]) -> str:
    strategy = args.get("strategy")
    if strategy is None:  # compressed-tensors infers it from group_size when absent
        group = args.get("group_size")
        strategy = "tensor" if group is None else ("channel" if group == -1 else "group")
    return str(strategy).lower()


def _check_fp8_args(args: Mapping[str, Any], where: str) -> None:
    if args.get("num_bits", 8) != 8 or str(args.get("type", "int")).lower() != "float":
        raise CtSchemeError(f"{where}: only 8-bit float (FP8 E4M3) quantization is read, got {dict(args)}")
    if not args.get("symmetric", True):
        raise CtSchemeError(f"{where}: asymmetric quantization (zero points) is not supported")


def scheme_from_ct(
    group_name: str, group: Mapping[str, Any], mxrun_spec: Mapping[str, Any] | None = None
) -> Scheme:
    """The mxrun :class:`Scheme` of a ``config_groups`` entry.

    With ``mxrun_spec`` (the group's entry in mxrun's record) the scheme is rebuilt from mxrun's own
    definition, exactly (scale rules included), and checked against the compressed-tensors arguments. Without
    it the scheme is inferred from the arguments; MXFP8 activations then use the round-up rule."""
    where = f"quantization_config.config_groups.{group_name}"
    weights = group.get("weights")
    if not isinstance(weights, Mapping):
        raise CtSchemeError(f"{where}: no weight quantization; mxrun reloads weight-quantized layers only")
    _check_fp8_args(weights, f"{where}.weights")
    acts = group.get("input_activations")
    if acts is not None:
        _check_fp8_args(acts, f"{where}.input_activations")
        if not acts.get("dynamic", False):
            raise CtSchemeError(
                f"{where}.input_activations: static activation scales are not supported (mxrun quantizes "
                "activations dynamically)"
            )
    if group.get("output_activations") is not None:
        raise CtSchemeError(f"{where}: output activation quantization is not supported")

    if mxrun_spec is not None:
        name = str(mxrun_spec.get("scheme", group_name))
        scheme, problems = build_scheme(
            name, {"weights": mxrun_spec.get("weights"), "activations": mxrun_spec.get("activations")}
        )
        if scheme is None:
            raise CtSchemeError(f"{where}: mxrun's record of scheme {name!r} is invalid: {problems}")
        expected = scheme_to_ct(scheme, group.get("targets") or [])
        for key in ("weights", "input_activations"):
            if _normalized(expected[key]) != _normalized(group.get(key)):
                raise CtSchemeError(
                    f"{where}.{key}: does not match mxrun's record of scheme {name!r} (was the config edited?)"
                )
        return scheme

    w_strategy = _strategy(weights)
    if w_strategy == "group" and weights.get("group_size") == MX_BLOCK:
        w_spec: dict[str, Any] = {"granularity": "mx"}
    elif w_strategy == "block":
        w_spec = {"granularity": "block", "block_size": list(weights.get("block_structure") or [128, 128])}
    elif w_strategy in ("tensor", "channel"):
        w_spec = {"granularity": w_strategy}
    else:
        raise CtSchemeError(
            f"{where}.weights: strategy {w_strategy!r} (group {weights.get('group_size')}) "
            "has no mxrun method"
        )
    a_spec: dict[str, Any] | None = None
    if acts is not None:
        a_strategy = _strategy(acts)
        if a_strategy == "group" and acts.get("group_size") == MX_BLOCK:
            a_spec = {"granularity": "mx"}
        elif a_strategy == "group":
            a_spec = {"granularity": "group", "group_size": acts.get("group_size")}
        elif a_strategy in ("tensor", "token"):
            a_spec = {"granularity": a_strategy}
        else:
            raise CtSchemeError(f"{where}.input_activations: strategy {a_strategy!r} has no mxrun method")
    scheme, problems = build_scheme(group_name, {"weights": w_spec, "activations": a_spec})
    if scheme is None:
        raise CtSchemeError(f"{where}: {'; '.join(message for _, message in problems)}")
    return scheme


_ARG_DEFAULTS = {"symmetric": True, "dynamic": False, "group_size": None}


def _normalized(args: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Quantization args with defaults filled and irrelevant keys dropped, for comparison."""
    if args is None:
        return None
    keys = (
        "num_bits",
        "type",
        "symmetric",
        "strategy",
        "dynamic",
        "group_size",
        "block_structure",
        "scale_dtype",
    )
    out = {key: args.get(key, _ARG_DEFAULTS.get(key)) for key in keys}
    out["strategy"] = _strategy(args)
    out["type"] = str(out["type"]).lower()
    return out


__all__ = [
    "MXRUN_KEY",
    "QUANT_METHOD",
    "CtFormat",
    "CtSchemeError",
    "activation_args",
    "build_quantization_config",
    "ct_format",
    "scheme_from_ct",
    "scheme_to_ct",
    "weight_args",
]
