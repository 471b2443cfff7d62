"""Quantization schemes: what a rule asks for, as frozen values, plus the built-in presets.

A scheme says how the weight is quantized (element format, scale granularity, MX scale rule) and how the
activations are quantized on the fly (or not at all: weight-only). Presets are complete schemes with names;
a recipe scheme starts from a preset and overrides fields, or spells everything out.

The family of a scheme (:class:`SchemeFamily`) is what later stages dispatch on (one online method class per
family); it follows from the weight granularity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mxrun.engine.layers import Layer


class ElementFormat(str, Enum):
    FP8_E4M3 = "fp8_e4m3"
    """OCP FP8 E4M3 (``torch.float8_e4m3fn``): max 448, no infinities."""


class WeightGranularity(str, Enum):
    TENSOR = "tensor"
    """One fp32 scale for the whole weight (for fused experts: one per expert)."""
    CHANNEL = "channel"
    """One fp32 scale per output row."""
    BLOCK = "block"
    """One fp32 scale per ``block_size`` tile (128x128 by default)."""
    MX = "mx"
    """OCP MX: one E8M0 power-of-two scale per 32 consecutive elements along K."""


class ActivationGranularity(str, Enum):
    TENSOR = "tensor"
    """One dynamic scale per activation tensor."""
    TOKEN = "token"
    """One dynamic scale per row (token)."""
    GROUP = "group"
    """One dynamic scale per ``group_size`` elements of a row (1x128 for block FP8)."""
    MX = "mx"
    """MXFP8 activations: one E8M0 scale per 32 elements of a row."""


class ScaleRule(str, Enum):
    ROUND_UP = "round_up"
    """Smallest power of two with amax / scale <= 448: no element clips (what serving engines use)."""
    FLOOR = "floor"
    """OCP MX v1.0: exponent = floor(log2(amax)) - 8; the largest elements may saturate to 448."""


class UnsupportedPolicy(str, Enum):
    SKIP = "skip"
    """Leave the layer unquantized and warn, listing it."""
    ERROR = "error"
    """Refuse the plan."""


class PartialBlocks(str, Enum):
    ALLOW = "allow"
    """Edge blocks may be partial (scales cover ceil(N/128) x ceil(K/128) tiles)."""
    UNSUPPORTED = "unsupported"
    """A weight whose N or K is not a multiple of the block is a layer the scheme cannot serve."""


class SchemeFamily(str, Enum):
    FP8_TENSOR = "fp8_tensor"
    FP8_CHANNEL = "fp8_channel"
    FP8_BLOCK = "fp8_block"
    MXFP8 = "mxfp8"


MX_BLOCK = 32
"""Elements per E8M0 scale in OCP MX formats (fixed by the spec)."""


@dataclass(frozen=True)
class WeightQuant:
    format: ElementFormat
    granularity: WeightGranularity
    block_size: tuple[int, int] | None = None
    """(rows, cols) of a scale tile; only for ``block``."""
    scale_rule: ScaleRule | None = None
    """Only for ``mx``."""
    partial_blocks: PartialBlocks | None = None
    """Only for ``block``."""
    tile_aligned: bool | None = None
    """Only for ``mx``: True holds the weight with each 128x128 tile at one E8M0 scale (see
    :mod:`mxrun.kernels.mx_regroup`); None is the default, the scale rule's exact bits."""

    def to_json(self) -> dict[str, Any]:
        return _drop_none(
            {
                "format": self.format.value,
                "granularity": self.granularity.value,
                "block_size": list(self.block_size) if self.block_size else None,
                "scale_rule": self.scale_rule.value if self.scale_rule else None,
                "partial_blocks": self.partial_blocks.value if self.partial_blocks else None,
                "tile_aligned": self.tile_aligned,
            }
        )


@dataclass(frozen=True)
class ActivationQuant:
    format: ElementFormat
    granularity: ActivationGranularity
    group_size: int | None = None
    """Elements per scale along K; only for ``group`` (default 128) and ``mx`` (always 32)."""
    scale_rule: ScaleRule | None = None
    """Only for ``mx``."""
    min_rows: int | None = None
    """Calls with fewer rows keep their activations unquantized (the scheme's weight-only method serves them,
    W8A16); None (the default, and what ``min_rows: 1`` resolves to) quantizes every call."""

    def to_json(self) -> dict[str, Any]:
        return _drop_none(
            {
                "format": self.format.value,
                "granularity": self.granularity.value,
                "group_size": self.group_size,
                "scale_rule": self.scale_rule.value if self.scale_rule else None,
                "min_rows": self.min_rows,
            }
        )

    def quantizes(self, rows: int) -> bool:
        """Whether a call with ``rows`` rows (tokens) quantizes its activations (``min_rows``)."""
        return self.min_rows is None or rows >= self.min_rows


@dataclass(frozen=True)
class Scheme:
    """A fully resolved scheme. ``activations is None`` means weight-only (activations stay bf16/fp16)."""

    name: str
    weights: WeightQuant
    activations: ActivationQuant | None
    on_unsupported: UnsupportedPolicy | None = None
    """Overrides the recipe's policy for this scheme when set."""
    preset: str | None = None
    description: str | None = None

    @property
    def family(self) -> SchemeFamily:
        return _FAMILY[self.weights.granularity]

    @property
    def weight_only(self) -> bool:
        return self.activations is None

    def describe(self) -> str:
        """One line on what the scheme computes (``mxrun explain``): the weight and activation scales, and where
        ``min_rows`` switches to weight-only."""
        w = self.weights
        if w.granularity is WeightGranularity.MX:
            extra = ", tile-aligned" if w.tile_aligned else ""
            weights = f"MXFP8 weights (E8M0 per 32, {(w.scale_rule or ScaleRule.ROUND_UP).value}{extra})"
        elif w.granularity is WeightGranularity.BLOCK:
            rows, cols = w.block_size or (128, 128)
            weights = f"FP8 weights, one scale per {rows}x{cols} block"
        else:
            weights = f"FP8 weights, one scale per {'tensor' if w.granularity is WeightGranularity.TENSOR else 'output channel'}"
        acts = self.activations
        if acts is None:
            return f"{weights}; activations stay bf16/fp16 (weight-only)"
        if acts.granularity is ActivationGranularity.MX:
            activations = f"MXFP8 activations ({(acts.scale_rule or ScaleRule.ROUND_UP).value})"
        elif acts.granularity is ActivationGranularity.GROUP:
            activations = f"FP8 activations, one scale per 1x{acts.group_size or 128} group"
        else:
            activations = f"FP8 activations, one scale per {acts.granularity.value}"
        if acts.min_rows:
            activations += f", from {acts.min_rows} rows (fewer rows run weight-only)"
        return f"{weights}; {activations}"

    def cannot_serve(self, layer: Layer) -> str | None:
        """Why this scheme cannot quantize ``layer`` (``None`` when it can)."""
        n, k = layer.out_features, layer.in_features
        if self.weights.granularity is WeightGranularity.MX and k % MX_BLOCK:
            return f"in_features {k} is not a multiple of {MX_BLOCK} (MX scales cover 32 elements of K)"
        if self.activations is not None and self.activations.granularity is ActivationGranularity.GROUP:
            group = self.activations.group_size or 128
            if k % group:
                return f"in_features {k} is not a multiple of the activation group {group}"
        if (
            self.weights.granularity is WeightGranularity.BLOCK
            and self.weights.partial_blocks is PartialBlocks.UNSUPPORTED
        ):
            rows, cols = self.weights.block_size or (128, 128)
            if n % rows or k % cols:
                return f"weight {n}x{k} is not a multiple of the {rows}x{cols} block"
        return None

    def to_json(self) -> dict[str, Any]:
        """The fields that define the numerics (what the fingerprint covers)."""
        return _drop_none(
            {
                "family": self.family.value,
                "weights": self.weights.to_json(),
                "activations": self.activations.to_json() if self.activations else None,
                "on_unsupported": self.on_unsupported.value if self.on_unsupported else None,
            }
        )


_FAMILY = {
    WeightGranularity.TENSOR: SchemeFamily.FP8_TENSOR,
    WeightGranularity.CHANNEL: SchemeFamily.FP8_CHANNEL,
    WeightGranularity.BLOCK: SchemeFamily.FP8_BLOCK,
    WeightGranularity.MX: SchemeFamily.MXFP8,
}


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


# Presets are written in the recipe's own YAML vocabulary, so that a preset and a user scheme go through the
# same resolution code (and the README table can be generated from this dict).
_W_TENSOR = {"format": "fp8_e4m3", "granularity": "tensor"}
_W_CHANNEL = {"format": "fp8_e4m3", "granularity": "channel"}
_W_BLOCK = {"format": "fp8_e4m3", "granularity": "block", "block_size": [128, 128], "partial_blocks": "allow"}
_W_MX = {"format": "fp8_e4m3", "granularity": "mx", "scale_rule": "round_up"}

PRESETS: Mapping[str, Mapping[str, Any]] = {
    "fp8-tensor": {
        "description": "FP8 E4M3, one scale per weight tensor, dynamic per-tensor activations",
        "weights": _W_TENSOR,
        "activations": {"format": "fp8_e4m3", "granularity": "tensor"},
    },
    "fp8-channel": {
        "description": "FP8 E4M3, per-output-channel weight scales, dynamic per-token activations",
        "weights": _W_CHANNEL,
        "activations": {"format": "fp8_e4m3", "granularity": "token"},
    },
    "fp8-block": {
        "description": "FP8 E4M3, 128x128 weight blocks, dynamic 1x128 activation groups",
        "weights": _W_BLOCK,
        "activations": {"format": "fp8_e4m3", "granularity": "group", "group_size": 128},
    },
    "mxfp8": {
        "description": "MXFP8 (OCP MX v1.0): E4M3 elements, one E8M0 scale per 32 along K, weights and activations",
        "weights": _W_MX,
        "activations": {
            "format": "fp8_e4m3",
            "granularity": "mx",
            "group_size": 32,
            "scale_rule": "round_up",
        },
    },
    "fp8-tensor-weight-only": {
        "description": "FP8 E4M3 per-tensor weights; activations stay in bf16/fp16",
        "weights": _W_TENSOR,
        "activations": None,
    },
    "fp8-channel-weight-only": {
        "description": "FP8 E4M3 per-channel weights; activations stay in bf16/fp16",
        "weights": _W_CHANNEL,
        "activations": None,
    },
    "fp8-block-weight-only": {
        "description": "FP8 E4M3 128x128 block weights; activations stay in bf16/fp16",
        "weights": _W_BLOCK,
        "activations": None,
    },
    "mxfp8-weight-only": {
        "description": "MXFP8 weights (E8M0 per 32 along K); activations stay in bf16/fp16 (W8A16)",
        "weights": _W_MX,
        "activations": None,
    },
}
"""Built-in schemes by name. A rule may name a preset directly; a recipe scheme may start from one."""


def build_scheme(
    name: str, spec: Mapping[str, Any]
) -> tuple[Scheme | None, list[tuple[tuple[str, ...], str]]]:
    """Resolve a (schema-valid) scheme mapping into a :class:`Scheme`.

    ``spec`` may name a ``preset``; its ``weights``/``activations`` mappings then override the preset's field
    by field, and ``activations: null`` makes it weight-only. Returns the scheme (or ``None``) and a list of
    ``(path within spec, message)`` problems, so the caller can attach source positions.
    """
    problems: list[tuple[tuple[str, ...], str]] = []
    preset_name = spec.get("preset")
    base: Mapping[str, Any] = {}
    if preset_name is not None:
        if preset_name not in PRESETS:
            problems.append((("preset",), f"unknown preset {preset_name!r}"))
            return None, problems
        base = PRESETS[preset_name]
    weights = {**(base.get("weights") or {}), **(spec.get("weights") or {})}
    if ("activations" in spec and spec["activations"] is None) or (
        base and base.get("activations") is None and "activations" not in spec
    ):
        activations = None
    else:
        activations = {**(base.get("activations") or {}), **(spec.get("activations") or {})}
    if not weights.get("granularity"):
        problems.append(
            (
                ("weights",),
                "the scheme sets no weight granularity; name a `preset` or set `weights.granularity`",
            )
        )
        return None, problems

    w_gran = WeightGranularity(weights["granularity"])
    w_fields = {
        "format": ElementFormat(weights.get("format", "fp8_e4m3")),
        "granularity": w_gran,
    }
    for key, allowed in (
        ("block_size", WeightGranularity.BLOCK),
        ("partial_blocks", WeightGranularity.BLOCK),
        ("scale_rule", WeightGranularity.MX),
        ("tile_aligned", WeightGranularity.MX),
    ):
        if key in (spec.get("weights") or {}) and w_gran is not allowed:
            problems.append((("weights", key), f"`{key}` applies only to `{allowed.value}` weights"))
    if w_gran is WeightGranularity.BLOCK:
        block = weights.get("block_size", [128, 128])
        w_fields["block_size"] = (int(block[0]), int(block[1]))
        w_fields["partial_blocks"] = PartialBlocks(weights.get("partial_blocks", "allow"))
    if w_gran is WeightGranularity.MX:
        w_fields["scale_rule"] = ScaleRule(weights.get("scale_rule", "round_up"))
        if weights.get("tile_aligned"):
            w_fields["tile_aligned"] = True  # false is the default: kept out of plans and fingerprints
    weight_quant = WeightQuant(**w_fields)

    act_quant = None
    if activations is not None:
        if not activations.get("granularity"):
            problems.append(
                (
                    ("activations",),
                    "activations need a `granularity` (or `activations: null` for weight-only)",
                )
            )
            return None, problems
        a_gran = ActivationGranularity(activations["granularity"])
        group_size = activations.get("group_size")
        scale_rule = None
        if a_gran is ActivationGranularity.GROUP:
            group_size = group_size or 128
            if (
                w_gran is WeightGranularity.BLOCK
                and weight_quant.block_size
                and group_size != weight_quant.block_size[1]
            ):
                problems.append(
                    (
                        ("activations", "group_size"),
                        f"activation group {group_size} must equal the weight block's K size "
                        f"{weight_quant.block_size[1]} (scales are applied per K block)",
                    )
                )
        elif a_gran is ActivationGranularity.MX:
            if group_size not in (None, MX_BLOCK):
                problems.append(
                    (("activations", "group_size"), f"MX activation groups are always {MX_BLOCK}")
                )
            group_size = MX_BLOCK
            scale_rule = ScaleRule(activations.get("scale_rule", "round_up"))
        else:
            if "group_size" in (spec.get("activations") or {}):
                problems.append(
                    (
                        ("activations", "group_size"),
                        "`group_size` applies only to `group` and `mx` activations",
                    )
                )
            group_size = None
        if "scale_rule" in (spec.get("activations") or {}) and a_gran is not ActivationGranularity.MX:
            problems.append((("activations", "scale_rule"), "`scale_rule` applies only to `mx` activations"))
        if (a_gran is ActivationGranularity.MX) != (w_gran is WeightGranularity.MX):
            problems.append(
                (
                    ("activations", "granularity"),
                    "MX activations go with MX weights only (the GEMM applies both 1x32 scales "
                    "per K chunk); use `activations: null` for MXFP8 weight-only",
                )
            )
        act_quant = ActivationQuant(
            format=ElementFormat(activations.get("format", "fp8_e4m3")),
            granularity=a_gran,
            group_size=group_size,
            scale_rule=scale_rule,
            # 1 is the default (every call quantized): kept out of plans and fingerprints
            min_rows=int(activations["min_rows"]) if activations.get("min_rows", 1) > 1 else None,
        )

    policy = spec.get("on_unsupported")
    scheme = Scheme(
        name=name,
        weights=weight_quant,
        activations=act_quant,
        on_unsupported=UnsupportedPolicy(policy) if policy else None,
        preset=preset_name,
        description=spec.get("description") or (base.get("description") if base else None),
    )
    return (None if problems else scheme), problems


def preset_scheme(name: str) -> Scheme:
    """A preset as a :class:`Scheme` (raises ``KeyError`` for an unknown name)."""
    scheme, problems = build_scheme(name, {"preset": name})
    if scheme is None:  # pragma: no cover - presets are checked by the tests
        raise KeyError(f"preset {name!r} is invalid: {problems}")
    return scheme


def quantized_weight_bytes(scheme: Scheme, shape: tuple[int, ...]) -> int:
    """Bytes of the quantized weight plus its scales (fp32 scales, or one uint8 E8M0 per MX block)."""
    *batch, n, k = shape
    experts = 1
    for d in batch:
        experts *= d
    granularity = scheme.weights.granularity
    if granularity is WeightGranularity.TENSOR:
        scales = 4
    elif granularity is WeightGranularity.CHANNEL:
        scales = 4 * n
    elif granularity is WeightGranularity.BLOCK:
        rows, cols = scheme.weights.block_size or (128, 128)
        scales = 4 * (-(-n // rows)) * (-(-k // cols))
    else:
        scales = n * (-(-k // MX_BLOCK))
    return experts * (n * k + scales)
