"""The main job on a checkpoint that ``mxrun export`` wrote: ``mxrun [--recipe R] --model EXPORT``.

An exported folder is recognised by its ``config.json``: ``quantization_config.quant_method`` is
``compressed-tensors``. It is not streamed and quantized again: :func:`~mxrun.export.reload.load_exported`
fills mxrun's quantized layers with the stored E4M3 codes and scales as they are, so the model computes
exactly what the online path computes for the same recipe and source (same layers, same bytes).

- Recipe: the resolved recipe that mxrun recorded in the export (``quantization_config.mxrun``), rebuilt
  here with its fingerprint checked. A ``--recipe`` given as well must have that fingerprint (the export
  holds the numerics of one recipe; another cannot be applied without the source).
- Plan: the recipe resolved against the export's own headers, with each stored E4M3 weight counted in the
  model's dtype, so it is the plan the source checkpoint gives (same layers, shapes, decisions).
- Reference: ``--reference DIR`` when given, else the source checkpoint the export recorded (``source`` in
  the record, an absolute path) when that folder is still there. Without one, the quantized model's own
  metrics are reported and every reference column says it is unavailable.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mxrun.engine.apply import ApplyReport
from mxrun.engine.diagnostics import Position
from mxrun.engine.inventory import CONFIG_FILE, InventoryError, layers_from_checkpoint
from mxrun.engine.layers import Layer, LayerKind
from mxrun.engine.methods import QuantizedLinear
from mxrun.engine.moe import QuantizedExperts
from mxrun.engine.plan import Plan, resolve_layers
from mxrun.engine.recipe import Recipe, Rule, SkipRule
from mxrun.engine.schemes import UnsupportedPolicy, build_scheme
from mxrun.job.errors import JobError
from mxrun.job.loading import (
    Checkpoint,
    LoadStats,
    QuantizedModel,
    _skeleton,
    causal_lm_class,
    model_bytes,
)
from mxrun.job.memory import PeakMemory, big_allocations_unmapped

QUANT_METHOD = "compressed-tensors"
MXRUN_KEY = "mxrun"
STORED_QUANTIZED_DTYPES = ("float8_e4m3fn",)
"""Dtypes of the stored quantized weights: such a layer is planned as the model dtype it was exported from."""
LOAD_PATH_ONLINE = "online"
LOAD_PATH_EXPORTED = "exported"


@dataclass(frozen=True)
class ExportedCheckpoint:
    """A folder whose ``config.json`` has a compressed-tensors ``quantization_config`` (not read further)."""

    folder: Path
    config: dict[str, Any]

    @property
    def quantization_config(self) -> Mapping[str, Any]:
        return self.config["quantization_config"]

    @property
    def record(self) -> Mapping[str, Any] | None:
        """mxrun's record (resolved recipe, fingerprint, source); None for a checkpoint of another tool."""
        record = self.quantization_config.get(MXRUN_KEY)
        return record if isinstance(record, Mapping) else None

    @property
    def fingerprint(self) -> str | None:
        value = (self.record or {}).get("fingerprint")
        return value if isinstance(value, str) else None

    @property
    def source(self) -> Path | None:
        """The source checkpoint folder the export recorded (None for exports older than the record)."""
        value = (self.record or {}).get("source")
        return Path(value) if isinstance(value, str) and value else None

    @property
    def dtype_name(self) -> str:
        name = str(self.config.get("dtype") or self.config.get("torch_dtype") or "bfloat16")
        return name.removeprefix("torch.")


def open_exported(folder: str | Path) -> ExportedCheckpoint | None:
    """The exported checkpoint in ``folder``, or None when it is not one (no config.json, no compressed-tensors
    ``quantization_config``): such a folder goes the online way, which reports its own errors."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, Mapping) or qc.get("quant_method") != QUANT_METHOD:
        return None
    return ExportedCheckpoint(Path(folder), config)


# ------------------------------------------------------------------------------------------------ recipe


def recipe_from_record(exported: ExportedCheckpoint) -> Recipe:
    """The recipe the export was made with, rebuilt from mxrun's record (schemes, rules and skips in order,
    each rule with the ``FILE:LINE`` it was written at); its fingerprint must be the recorded one."""
    where = f"{exported.folder / CONFIG_FILE}: quantization_config.{MXRUN_KEY}"
    record = exported.record
    if record is None:
        raise JobError(
            f"{exported.folder / CONFIG_FILE}: a compressed-tensors checkpoint without mxrun's record (not "
            "written by `mxrun export`); mxrun runs the checkpoints it exported"
        )
    try:
        return _rebuild(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise JobError(f"{where}: the recorded recipe cannot be read ({exc})") from None


def _rebuild(record: Mapping[str, Any]) -> Recipe:
    described, resolved = record["recipe"], record["recipe"]["resolved"]
    schemes = {}
    for name, spec in resolved["schemes"].items():
        scheme, problems = build_scheme(name, spec)
        if scheme is None:
            raise ValueError(f"scheme {name!r}: {'; '.join(message for _, message in problems)}")
        schemes[name] = scheme
    rules = tuple(
        Rule(
            name=str(rule.get("name") or f"rules[{index}]"),
            pattern=str(rule["match"]),
            scheme=str(rule["scheme"]),
            kinds=_kinds(rule.get("kind")),
            origin=Position(str(rule.get("source") or "<export record>")),
        )
        for index, rule in enumerate(described["rules"])
    )
    skips = tuple(
        SkipRule(
            pattern=str(skip["match"]),
            kinds=_kinds(skip.get("kind")),
            reason=skip.get("reason"),
            origin=Position(str(skip.get("source") or "<export record>")),
        )
        for skip in described["skip"]
    )
    recipe = Recipe(
        version=int(resolved["version"]),
        name=str(described["name"]),
        description=str(described.get("description") or ""),
        schemes=schemes,
        rules=rules,
        skips=skips,
        on_unsupported=UnsupportedPolicy(resolved["on_unsupported"]),
        owner=described.get("owner"),
        tags=tuple(described.get("tags") or ()),
        files=tuple(described.get("files") or ()),
    )
    if recipe.fingerprint != record["fingerprint"]:
        raise ValueError(
            f"it rebuilds to {recipe.fingerprint}, the record says {record['fingerprint']} (was it edited?)"
        )
    return recipe


def _kinds(value: Any) -> frozenset[LayerKind] | None:
    return None if value is None else frozenset(LayerKind(kind) for kind in value)


def exported_recipe(exported: ExportedCheckpoint, given: Recipe | None) -> Recipe:
    """The recorded recipe; ``given`` (``--recipe``) is accepted only when its fingerprint is the recorded
    one (then it is used as given, with its own file positions)."""
    recorded = recipe_from_record(exported)
    if given is None:
        return recorded
    if given.fingerprint != recorded.fingerprint:
        raise JobError(
            f"{exported.folder}: exported with recipe {recorded.name} ({recorded.fingerprint}); --recipe "
            f"{given.name} has fingerprint {given.fingerprint} (hint: leave out --recipe, or export again "
            "with this recipe)"
        )
    return given


# -------------------------------------------------------------------------------------------------- plan


def exported_layers(exported: ExportedCheckpoint) -> list[Layer]:
    """The export's layers from its headers, each stored E4M3 weight given the model's dtype: the layers of
    the source checkpoint, so resolving a recipe gives the source's plan."""
    try:
        layers = layers_from_checkpoint(exported.folder)
    except InventoryError as exc:
        raise JobError(str(exc)) from None
    return [
        dataclasses.replace(layer, dtype=exported.dtype_name)
        if layer.dtype in STORED_QUANTIZED_DTYPES
        else layer
        for layer in layers
    ]


def exported_plan(exported: ExportedCheckpoint, given: Recipe | None = None) -> Plan:
    """The plan of ``mxrun [--recipe R] --model EXPORT`` (see the module docstring)."""
    return resolve_layers(exported_recipe(exported, given), exported_layers(exported))


# -------------------------------------------------------------------------------------------------- load


def load_exported_model(
    exported: ExportedCheckpoint, checkpoint: Checkpoint, plan: Plan, device: torch.device
) -> QuantizedModel:
    """Reload the export into mxrun's quantized layers (no requantization), with the load's peak memory
    measured as the online load's is; raises :class:`JobError` for a checkpoint it cannot reload exactly."""
    from mxrun.export.reload import ReloadError, load_exported

    _warm_up(exported)
    started = time.perf_counter()
    with big_allocations_unmapped(), PeakMemory(device) as peak:
        try:
            model = load_exported(exported.folder, device)
        except (ReloadError, OSError, ValueError) as exc:
            raise JobError(f"{exported.folder}: cannot reload the exported checkpoint: {exc}") from None
    seconds = time.perf_counter() - started
    dtype = next(
        (p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), torch.bfloat16
    )
    stats = LoadStats(
        len(checkpoint.shards),
        len(checkpoint.headers),
        checkpoint.total_bytes,
        seconds,
        model_bytes(model),
        peak.reading,
    )
    notes = [
        f"loaded the exported checkpoint {exported.folder} (compressed-tensors, recipe "
        f"{exported.fingerprint}) with its stored codes and scales: no requantization",
        "the reload reads each stored tensor whole (safetensors, one at a time) into a model built without "
        "weights; its peak is reported beside the online load's goal of 1.15x, which it is not held to",
    ]
    return QuantizedModel(model, dtype, _report(model, plan), stats, notes)


def _warm_up(exported: ExportedCheckpoint) -> None:
    """Build the model's skeleton once (parameters on ``meta``) before the reload is measured: transformers
    imports the model's module and sets up lazily on the first construction in a process (tens of MB, the
    same for any model size), which is no part of loading the checkpoint."""
    config, _ = causal_lm_class(exported.folder)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # as load_exported does: mxrun's layers, not transformers'
    _skeleton(config, torch.bfloat16)


def _report(model: torch.nn.Module, plan: Plan) -> ApplyReport:
    """What the export holds quantized, in the terms of the online path's :class:`ApplyReport`."""
    modules = dict(model.named_modules())
    replaced: list[str] = []
    not_supported: list[tuple[str, str]] = []
    by_scheme: dict[str, int] = {}
    experts: dict[str, None] = {}
    for entry in plan.quantized():
        name = entry.layer.name
        container = name.rpartition(".")[0]
        if isinstance(modules.get(name), QuantizedLinear):
            pass
        elif entry.layer.kind is LayerKind.MOE_EXPERTS and isinstance(
            modules.get(container), QuantizedExperts
        ):
            experts[container] = None
        else:
            not_supported.append((name, "stored unquantized in the export"))
            continue
        replaced.append(name)
        scheme = entry.scheme.name if entry.scheme is not None else "?"
        by_scheme[scheme] = by_scheme.get(scheme, 0) + 1
    return ApplyReport(
        replaced=tuple(replaced),
        not_supported=tuple(not_supported),
        untouched=len(plan.entries) - len(plan.quantized()),
        by_scheme=by_scheme,
        experts_modules=tuple(experts),
    )


# --------------------------------------------------------------------------------------------- reference


def reference_folder(exported: ExportedCheckpoint, explicit: Path | None) -> tuple[Path | None, str | None]:
    """``(folder to compare with, note)``: ``explicit`` (``--reference``), else the recorded source when it
    is still there; None with a note saying why the reference columns are unavailable."""
    if explicit is not None:
        return explicit, None
    source = exported.source
    if source is None:
        return None, (
            "no reference: the export does not record its source checkpoint (hint: --reference DIR); "
            "reference columns are unavailable"
        )
    if not (source / CONFIG_FILE).is_file():
        return None, (
            f"no reference: the source checkpoint the export records ({source}) is not there (hint: "
            "--reference DIR); reference columns are unavailable"
        )
    return source, None


__all__ = [
    "LOAD_PATH_EXPORTED",
    "LOAD_PATH_ONLINE",
    "ExportedCheckpoint",
    "exported_layers",
    "exported_plan",
    "exported_recipe",
    "load_exported_model",
    "open_exported",
    "recipe_from_record",
    "reference_folder",
]
