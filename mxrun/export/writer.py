"""Write a quantized model as a compressed-tensors checkpoint folder, atomically.

What is written (tensor names are the *checkpoint* names of the source, so serving engines find them):

* every quantized Linear: ``<module>.weight`` (E4M3), ``<module>.weight_scale`` (fp32, or uint8 E8M0 codes
  for MXFP8) and its bias, from the model's quantized buffers, never requantized;
* every quantized MoE experts module (:class:`~mxrun.engine.moe.QuantizedExperts`, fused ``[E, 2I, H]`` /
  ``[E, H, I]`` stacks in the model): per expert, as the source stores them and as vLLM/SGLang load them,
  ``<experts>.<e>.gate_proj.weight`` ``[I, H]``, ``up_proj`` and ``down_proj`` (Mixtral: ``w1/w3/w2``) with a
  ``weight_scale`` each, sliced from the fused stacks (a per-tensor scale shared by gate and up is written to
  both; 128x128 blocks need I % 128 == 0 to split between gate and up);
* every other tensor of the source checkpoint, as stored (same name and bytes; cast to the model's dtype only
  where the model holds that tensor in another float dtype, e.g. an fp32 checkpoint run in bf16);
* ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of
  its own) and ``model.safetensors.index.json``; ``config.json`` (the source's, plus ``quantization_config``
  from :mod:`mxrun.export.compressed_tensors`, with ``dtype`` set to the model's); the tokenizer and
  generation files of the source.

Everything goes to a temporary folder beside ``out_dir`` (same file system, so the final rename is atomic),
which is renamed into place only when complete; on any error it is removed, and an existing ``out_dir`` that
``force`` was replacing is put back. The source folder is never written to.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxrun import __version__
from mxrun.engine.inventory import CHECKPOINT_RENAMES, CONFIG_FILE, EXPERT_ROLES, INDEX_FILE, SINGLE_FILE
from mxrun.engine.layers import LayerKind
from mxrun.engine.methods import QuantizedLinear
from mxrun.engine.moe import QuantizedExperts
from mxrun.engine.plan import Plan, PlanEntry
from mxrun.engine.recipe import Recipe
from mxrun.engine.safetensors_headers import DTYPE_ITEM_BYTES, HeaderError, TensorHeader, read_tensor_headers
from mxrun.engine.schemes import Scheme, WeightGranularity
from mxrun.export.compressed_tensors import CtSchemeError, build_quantization_config
from mxrun.kernels.moe_gemm import ExpertWeightFormat

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
"""Shard size, as transformers' ``save_pretrained`` defaults to (5 GB)."""

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)
"""Files of the source folder copied as they are (those that exist)."""

_EXPERT_ROLE_ORDER = ("gate", "up", "down")


class ExportError(RuntimeError):
    """The export cannot be done (target folder, source checkpoint, a layer it cannot write); the message
    names the file or layer. Nothing is left behind when it is raised."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    out_dir: Path
    shards: tuple[str, ...]
    total_bytes: int
    """Bytes of tensor data over all shards."""
    quantized: dict[str, int]
    """Scheme name -> number of quantized plan layers (a fused experts module counts as its two layers)."""
    ignored: tuple[str, ...]
    format: str
    fingerprint: str
    quantization_config: dict[str, Any] = field(repr=False, default_factory=dict)

    def summary(self) -> str:
        schemes = ", ".join(f"{n} x {s}" for s, n in sorted(self.quantized.items())) or "none"
        return (
            f"wrote {self.out_dir}: {len(self.shards)} shard(s), {self.total_bytes / 1e6:.1f} MB of tensors; "
            f"format {self.format}; quantized {schemes}; {len(self.ignored)} module(s) left unquantized "
            f"(ignore list); recipe {self.fingerprint}"
        )


def recipe_record(recipe: Recipe, source_dir: Path | None = None) -> dict[str, Any]:
    """What mxrun records about the recipe in an exported config (under ``quantization_config.mxrun``), and
    the absolute path of the source checkpoint (``source``), which ``mxrun --model <export>`` compares with
    when it is still there."""
    record = {"mxrun_version": __version__, "fingerprint": recipe.fingerprint, "recipe": recipe.to_json()}
    if source_dir is not None:
        record["source"] = str(Path(source_dir).resolve())
    return record


# ------------------------------------------------------------------------------------------ source files


def checkpoint_tensors(folder: Path) -> dict[str, TensorHeader]:
    """Every stored tensor of a checkpoint folder (``model.safetensors`` or indexed shards), by name."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shard_names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ExportError(f"{index}: not a valid safetensors index ({exc})") from exc
        shards = [folder / name for name in shard_names]
    elif (folder / SINGLE_FILE).is_file():
        shards = [folder / SINGLE_FILE]
    else:
        raise ExportError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    tensors: dict[str, TensorHeader] = {}
    for shard in shards:
        if not shard.is_file():
            raise ExportError(f"{index}: shard {shard.name} is missing")
        try:
            tensors.update(read_tensor_headers(shard))
        except HeaderError as exc:
            raise ExportError(str(exc)) from exc
    return tensors


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing; the source must be a Hugging Face checkpoint folder") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(config, dict):
        raise ExportError(f"{path}: a JSON object was expected")
    return config


# ------------------------------------------------------------------------------------------ the layout


@dataclass
class _Planned:
    """One tensor to write: its size and how to produce it (on the CPU, contiguous) when its shard is written."""

    name: str
    nbytes: int
    produce: Callable[[], torch.Tensor]


@dataclass
class _Layout:
    tensors: dict[str, _Planned] = field(default_factory=dict)
    groups: dict[Scheme, list[str]] = field(default_factory=dict)
    """Scheme -> checkpoint targets, in plan order."""
    counts: dict[str, int] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    """Source tensor names replaced by quantized ones (not copied)."""

    def add(self, name: str, produce: Callable[[], torch.Tensor], nbytes: int) -> None:
        if name in self.tensors:
            raise ExportError(f"{name}: two tensors of the export have this name")
        self.tensors[name] = _Planned(name, nbytes, produce)

    def target(self, scheme: Scheme, name: str) -> None:
        self.groups.setdefault(scheme, []).append(name)
        self.counts[scheme.name] = self.counts.get(scheme.name, 0) + 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _cpu(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    # a copy: slices of one expert stack (and a per-tensor scale shared by gate and up) share storage, which
    # safetensors refuses to write
    return lambda: t.detach().to("cpu", copy=True).contiguous()


class _Names:
    """Model module names <-> source checkpoint names (transformers renames some keys on load)."""

    def __init__(self, config: dict[str, Any], plan: Plan, stored: dict[str, TensorHeader]) -> None:
        self.renames = CHECKPOINT_RENAMES.get(str(config.get("model_type", "")), ())
        self.entries = {entry.layer.name: entry for entry in plan.entries}
        self.stored = stored

    def to_stored(self, name: str) -> str:
        for stored_part, loaded_part in self.renames:
            name = name.replace(loaded_part, stored_part)
        return name

    def to_loaded(self, name: str) -> str:
        for stored_part, loaded_part in self.renames:
            name = name.replace(stored_part, loaded_part)
        return name

    def linear(self, module_name: str) -> str:
        """The checkpoint module name of a Linear (its weight's stored name without ``.weight``)."""
        entry = self.entries.get(module_name)
        if entry is not None and len(entry.layer.tensors) == 1 and entry.layer.tensors[0].endswith(".weight"):
            return entry.layer.tensors[0].removesuffix(".weight")
        return self.to_stored(module_name)

    def experts(self, container: str, num_experts: int) -> dict[str, list[str]]:
        """Role (gate/up/down) -> the checkpoint module name of that projection for each expert."""
        stored = self.to_stored(container)
        projections: dict[str, list[str]] = {}
        for projection, role in EXPERT_ROLES.items():
            names = [f"{stored}.{e}.{projection}" for e in range(num_experts)]
            if all(f"{n}.weight" in self.stored for n in names):
                projections.setdefault(role, names)
        if set(projections) != set(_EXPERT_ROLE_ORDER):
            if any(f"{stored}.{p}" in self.stored for p in ("gate_up_proj", "down_proj")):
                raise ExportError(
                    f"{container}: the source stores the experts as fused stacks; mxrun exports per-expert "
                    "projections only (the layout serving engines load)"
                )
            # a source without the per-expert tensors (e.g. a plan made from a module): transformers' names
            projections = {
                role: [f"{stored}.{e}.{role}_proj" for e in range(num_experts)] for role in _EXPERT_ROLE_ORDER
            }
        return projections


def _scale_for_ct(scheme: Scheme, layer: QuantizedLinear) -> torch.Tensor:
    if scheme.weights.granularity is WeightGranularity.MX:
        return layer.weight_scale_e8m0
    if scheme.weights.granularity is WeightGranularity.TENSOR:
        return layer.weight_scale.reshape(1)  # compressed-tensors stores a per-tensor scale as [1]
    return layer.weight_scale


def _add_linear(layout: _Layout, names: _Names, module_name: str, layer: QuantizedLinear) -> None:
    scheme = layer.method.scheme
    prefix = names.linear(module_name)
    scale = _scale_for_ct(scheme, layer)
    # [N, K] row-major however the layer holds it; read when written (a box-major layer's copy made only then)
    weight_bytes = layer.out_features * layer.in_features * layer.weight.element_size()
    layout.add(f"{prefix}.weight", lambda: _cpu(layer.weight_rows())(), weight_bytes)
    layout.add(f"{prefix}.weight_scale", _cpu(scale), _nbytes(scale))
    if layer.bias is not None:
        layout.add(f"{prefix}.bias", _cpu(layer.bias), _nbytes(layer.bias))
    layout.consumed.update({f"{prefix}.weight", f"{prefix}.bias"})
    layout.target(scheme, prefix)


def _expert_slices(
    module: QuantizedExperts, container: str
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Role -> per expert ``(E4M3 [N, K], scale in the compressed-tensors layout)``, views of the stacks."""
    inter = module.intermediate_dim
    gate_up, down = module.weights("gate_up_proj"), module.weights("down_proj")
    fmt = gate_up.format
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {role: [] for role in _EXPERT_ROLE_ORDER}
    if fmt is ExpertWeightFormat.FP8_BLOCK and inter % 128:
        raise ExportError(
            f"{container}: 128x128 weight blocks span the gate and up rows (intermediate size {inter} is not a "
            "multiple of 128), so they cannot be written as separate gate_proj/up_proj tensors"
        )
    scale_rows = inter // 128 if fmt is ExpertWeightFormat.FP8_BLOCK else inter
    for e in range(module.num_experts):
        data, scale = gate_up.data[e], gate_up.scale[e]
        if fmt is ExpertWeightFormat.FP8_TENSOR:
            shared = scale.reshape(1)
            out["gate"].append((data[:inter], shared))
            out["up"].append((data[inter:], shared))
        else:
            out["gate"].append((data[:inter], scale[:scale_rows]))
            out["up"].append((data[inter:], scale[scale_rows:]))
        down_scale = down.scale[e]
        out["down"].append(
            (down.data[e], down_scale.reshape(1) if fmt is ExpertWeightFormat.FP8_TENSOR else down_scale)
        )
    return out


def _add_experts(layout: _Layout, names: _Names, container: str, module: QuantizedExperts) -> None:
    projections = names.experts(container, module.num_experts)
    slices = _expert_slices(module, container)
    escaped = re.escape(names.to_stored(container))
    for role in _EXPERT_ROLE_ORDER:
        for prefix, (data, scale) in zip(projections[role], slices[role], strict=True):
            layout.add(f"{prefix}.weight", _cpu(data), _nbytes(data))
            layout.add(f"{prefix}.weight_scale", _cpu(scale), _nbytes(scale))
            layout.consumed.add(f"{prefix}.weight")
    # the plan's two layers (gate_up_proj, down_proj), as ApplyReport.by_scheme counts them
    layout.counts[module.scheme.name] = layout.counts.get(module.scheme.name, 0) + 2
    # one pattern per experts module: every projection of every expert (vLLM probes `<experts>.0.gate_proj`)
    layout.groups.setdefault(module.scheme, []).append(rf"re:{escaped}\.\d+\.[^.]+$")


def _unquantized_names(names: _Names, entry: PlanEntry) -> list[str]:
    """Checkpoint module names of a plan entry left unquantized (for the ignore list)."""
    layer = entry.layer
    if layer.kind is LayerKind.MOE_EXPERTS and len(layer.shape) == 3:
        container, _, param = layer.name.rpartition(".")
        roles = ("gate", "up") if param == "gate_up_proj" else ("down",)
        projections = names.experts(container, layer.shape[0])
        return [name for role in roles for name in projections[role]]
    return [names.linear(layer.name)]


def _layout(model: nn.Module, plan: Plan, names: _Names) -> _Layout:
    layout = _Layout()
    modules = dict(model.named_modules())
    done: set[str] = set()
    for entry in plan.entries:
        name = entry.layer.name
        container = name.rpartition(".")[0]
        module = modules.get(name)
        if isinstance(module, QuantizedLinear) and name not in done:
            _add_linear(layout, names, name, module)
            done.add(name)
        elif (
            isinstance(modules.get(container), QuantizedExperts) and entry.layer.kind is LayerKind.MOE_EXPERTS
        ):
            if container not in done:
                _add_experts(layout, names, container, modules[container])
                done.add(container)
        else:
            layout.ignore.extend(_unquantized_names(names, entry))
    # quantized modules the plan does not list, and Linears it does not list (a tied lm_head)
    for name, module in modules.items():
        if isinstance(module, QuantizedLinear) and name not in done:
            _add_linear(layout, names, name, module)
            done.add(name)
        elif isinstance(module, QuantizedExperts) and name not in done:
            _add_experts(layout, names, name, module)
            done.add(name)
        elif isinstance(module, nn.Linear) and name not in names.entries:
            layout.ignore.append(names.linear(name))
    layout.ignore = list(dict.fromkeys(layout.ignore))
    return layout


def _source_copies(layout: _Layout, names: _Names, model: nn.Module, stored: dict[str, TensorHeader]) -> None:
    model_dtypes = {name: t.dtype for name, t in model.state_dict(keep_vars=True).items()}
    for name, header in stored.items():
        if name in layout.consumed:
            continue
        dtype = model_dtypes.get(names.to_loaded(name))
        nbytes = _stored_bytes(header)
        if dtype is not None and dtype.is_floating_point and dtype.itemsize < 8:
            nbytes = nbytes // max(DTYPE_ITEM_BYTES.get(header.dtype, 1), 1) * dtype.itemsize
        layout.add(name, _from_source(header.file, name, dtype), nbytes)


def _stored_bytes(header: TensorHeader) -> int:
    numel = 1
    for d in header.shape:
        numel *= d
    return numel * DTYPE_ITEM_BYTES.get(header.dtype, 1)


def _from_source(file: Path, name: str, dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as stream:
            tensor = stream.get_tensor(name)
        if (
            dtype is not None
            and tensor.dtype.is_floating_point
            and dtype.is_floating_point
            and tensor.dtype != dtype
        ):
            tensor = tensor.to(dtype)
        return tensor.contiguous()

    return produce


# ------------------------------------------------------------------------------------------ writing


def _natural_key(name: str) -> list[Any]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _shard(tensors: Sequence[_Planned], max_shard_bytes: int) -> list[list[_Planned]]:
    shards: list[list[_Planned]] = [[]]
    size = 0
    for planned in tensors:
        if shards[-1] and size + planned.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += planned.nbytes
    return shards


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(_file_mode())  # safetensors creates its files owner-only; the rest of the folder is not


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_tensors(layout: _Layout, folder: Path, max_shard_bytes: int) -> tuple[list[str], int]:
    ordered = [layout.tensors[name] for name in sorted(layout.tensors, key=_natural_key)]
    shards = _shard(ordered, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    for file, shard in zip(files, shards, strict=True):
        tensors = {planned.name: planned.produce() for planned in shard}
        total += sum(_nbytes(t) for t in tensors.values())
        _save_shard(tensors, folder / file)
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files, total


def _same_or_inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_target(source_dir: Path, out_dir: Path, force: bool) -> None:
    """Refuse to write over the source, a folder holding it, a file, or a non-empty folder without ``force``."""
    if _same_or_inside(source_dir, out_dir):
        raise ExportError(f"{out_dir}: is the source checkpoint folder (or holds it); choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir}: exists and is not empty (hint: --force replaces it)")


@contextlib.contextmanager
def _atomic_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``out_dir``, renamed to ``out_dir`` when the block completes; removed (and
    an ``out_dir`` that was being replaced restored) when it raises."""
    token = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.mxrun-tmp-{token}"
    old = out_dir.parent / f".{out_dir.name}.mxrun-old-{token}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old.exists():
                os.replace(old, out_dir)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    model: nn.Module,
    plan: Plan,
    recipe: Recipe,
    source_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ExportResult:
    """Write ``model`` (quantized in place by :func:`~mxrun.engine.apply.apply_plan` with ``plan``, loaded from
    ``source_dir``) as a compressed-tensors checkpoint folder ``out_dir``; see the module docstring.

    Refuses (:class:`ExportError`) to write into the source folder, or into a non-empty ``out_dir`` unless
    ``force`` (which replaces it atomically). Nothing is left behind on error."""
    source, out = Path(source_dir), Path(out_dir)
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    check_target(source, out, force)
    config = _read_config(source)
    stored = checkpoint_tensors(source)
    names = _Names(config, plan, stored)
    layout = _layout(model, plan, names)
    if not layout.groups:
        raise ExportError(
            f"{source}: the model has no quantized layer (the recipe matched nothing, or apply_plan was not run)"
        )
    _source_copies(layout, names, model, stored)
    try:
        quantization_config = build_quantization_config(
            list(layout.groups.items()), layout.ignore, recipe_record(recipe, source)
        )
    except CtSchemeError as exc:
        raise ExportError(str(exc)) from exc
    dtype = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
    out_config = {**config, "quantization_config": quantization_config}
    if dtype is not None:
        out_config["dtype"] = str(dtype).removeprefix("torch.")
        out_config.pop("torch_dtype", None)

    with _atomic_folder(out) as folder:
        files, total = _write_tensors(layout, folder, max_shard_bytes)
        (folder / CONFIG_FILE).write_text(json.dumps(out_config, indent=2) + "\n", encoding="utf-8")
        for side in SIDE_FILES:
            if (source / side).is_file():
                shutil.copy2(source / side, folder / side)
    return ExportResult(
        out_dir=out,
        shards=tuple(files),
        total_bytes=total,
        quantized=dict(layout.counts),
        ignored=tuple(layout.ignore),
        format=quantization_config["format"],
        fingerprint=recipe.fingerprint,
        quantization_config=quantization_config,
    )


__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ExportError",
    "ExportResult",
    "check_target",
    "checkpoint_tensors",
    "export_checkpoint",
    "recipe_record",
]
