"""Online loading: build a model's skeleton without weights, then stream its checkpoint tensor by tensor into
it, quantizing each planned layer's weight as it arrives.

The steps, for a Hugging Face causal-LM folder (``config.json`` + ``model.safetensors`` or indexed shards):

1. Headers. :func:`~mxrun.engine.inventory.layers_from_checkpoint` reads every shard's header (missing or
   truncated shards, a wrong index, corrupt headers are refused here, before any weight is read) and tells
   how the stored tensors map onto the loaded model's names: transformers 5 renames some keys on load
   (Mixtral's ``block_sparse_moe`` -> ``mlp``) and fuses per-expert tensors (``experts.<i>.gate_proj.weight``,
   ``up_proj``, ``down_proj``; Mixtral ``w1/w3/w2``) into ``experts.gate_up_proj [E, 2I, H]`` (per expert:
   gate rows, then up rows) and ``experts.down_proj [E, H, I]``.
2. Skeleton. The model is built from ``config.json`` with every *parameter* on the ``meta`` device (no
   bytes) and every *buffer* real: buffers are small and some are computed at construction only (the rotary
   ``inv_freq``), which a checkpoint does not hold.
3. Quantized layers. :func:`~mxrun.engine.apply.prepare_online` swaps each planned layer for an empty
   quantized one. It builds that layer on the device of the weight it replaces, reading only the weight's
   shape and dtype, so each planned weight is first replaced by a zero-stride placeholder on the target
   device: one element, the right shape, dtype and device.
4. Streaming, shard by shard, tensor by tensor (:func:`_shard_tensors` says why not ``safe_open``): each is
   checked (floating point where the model expects it, finite), moved to the device, then either consumed
   by :meth:`~mxrun.engine.apply.OnlineQuantizer.quantize_on_load` (quantized, the original dropped at once)
   or set into the model as its parameter or buffer. A per-expert tensor is offered to the quantizer as it
   is (quantized experts take their tensors one by one); one it does not take (experts left unquantized) is
   copied into a preallocated fused stack, which is set into the model when its last expert arrives.
5. Checks: every quantized layer got its weight, tied weights are re-tied, and no parameter is left on
   ``meta`` (a checkpoint of another model).

So the peak memory is the final quantized model, plus one tensor in flight (one fused expert stack for MoE
layers whose experts are not quantized), plus the quantizer's scratch for it. On CUDA that scratch is the
Triton kernel's output. On CPU the plain-torch reference quantizer makes fp32/int32 temporaries of about
30 bytes per element of what it quantizes, so the online methods feed it slices of the weight
(:data:`~mxrun.engine.methods.SLICE_ELEMENTS`, whole rows or 128x128 blocks) and write the codes straight
into the layer: the scratch stays near 120 KB whatever the weight (it was 1.28-1.63x the final model for
the bundled default unsliced, 1.07-1.13x sliced).

:class:`~mxrun.job.memory.PeakMemory` measures steps 3-5. The skeleton of step 2 is built before, and each
planned scheme quantizes one 128x128 weight before (:func:`_warm_up`): the first construction of a model and
the first quantize call in a process pay one-time costs (transformers imports modules lazily while building
a model, torch sets up thread pools and caches: 8 MB each for the bundled 1 MB example) that do not grow
with the model and are no part of loading its weights.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxrun.engine.apply import ApplyError, ApplyReport, prepare_online
from mxrun.engine.empty_init import parameters_on_meta as _parameters_on_meta
from mxrun.engine.empty_init import placeholder as _placeholder
from mxrun.engine.inventory import (
    CHECKPOINT_RENAMES,
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    InventoryError,
    layers_from_checkpoint,
)
from mxrun.engine.layers import Layer
from mxrun.engine.methods import QuantizedLinear, UnsupportedSchemeError, method_for
from mxrun.engine.plan import Decision, Plan
from mxrun.engine.safetensors_headers import (
    DTYPE_ITEM_BYTES,
    DTYPE_TORCH_NAMES,
    HEADER_LENGTH_BYTES,
    HeaderError,
    TensorHeader,
    read_header_bytes,
    read_tensor_headers,
)
from mxrun.job.errors import JobError
from mxrun.job.memory import PeakMemory, PeakReading, big_allocations_unmapped, host_available_bytes

MODEL_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""Activation dtypes the quantized layers run in; a float32 checkpoint is loaded as bfloat16."""

MEMORY_HEADROOM = 1.15
"""The loader's goal: peak memory under this multiple of the final model (checked against what is free)."""


# ------------------------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder whose headers have been read and checked (no weight bytes read yet)."""

    folder: Path
    config: dict[str, Any]
    shards: tuple[Path, ...]
    headers: dict[str, TensorHeader]
    """Stored tensor name -> header, over all shards."""
    layers: tuple[Layer, ...]

    @property
    def total_bytes(self) -> int:
        return sum(_stored_bytes(h) for h in self.headers.values())

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def _stored_bytes(header: TensorHeader) -> int:
    numel = 1
    for dim in header.shape:
        numel *= dim
    return numel * DTYPE_ITEM_BYTES.get(header.dtype, 1)


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and check the headers of the checkpoint in ``folder``; raises :class:`JobError` naming the file."""
    folder = Path(folder)
    if folder.is_file():
        raise JobError(f"{folder}: the main job needs the checkpoint folder (config.json beside the weights)")
    try:
        layers = layers_from_checkpoint(folder)  # checks config, index, every shard header; names the file
    except InventoryError as exc:
        raise JobError(str(exc)) from None
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = tuple(folder / name for name in dict.fromkeys(weight_map.values()))
    else:
        shards = (folder / SINGLE_FILE,)
    headers: dict[str, TensorHeader] = {}
    for shard in shards:
        try:
            headers.update(read_tensor_headers(shard))
        except HeaderError as exc:  # changed since the inventory read it
            raise JobError(str(exc)) from None
    return Checkpoint(folder, config, shards, headers, tuple(layers))


def model_dtype(plan: Plan) -> torch.dtype:
    """The dtype to load in: that of the planned layers' weights when bf16/fp16, else bfloat16."""
    for entry in plan.entries:
        if entry.decision is Decision.QUANTIZE:
            return MODEL_DTYPES.get(entry.layer.dtype, torch.bfloat16)
    return torch.bfloat16


def estimated_model_bytes(checkpoint: Checkpoint, plan: Plan, dtype: torch.dtype) -> tuple[int, int]:
    """``(reference, quantized)`` bytes of the model's weights in ``dtype``, before loading anything: the
    stored tensors at ``dtype``'s width (non-float ones as stored), with planned layers at their quantized
    size for the second."""
    width = torch.empty((), dtype=dtype).element_size()
    reference = 0
    for header in checkpoint.headers.values():
        is_float = DTYPE_TORCH_NAMES.get(header.dtype, "").startswith(("float", "bfloat"))
        stored = _stored_bytes(header)
        reference += stored // DTYPE_ITEM_BYTES.get(header.dtype, 1) * width if is_float else stored
    quantized = reference
    for entry in plan.quantized():
        quantized += entry.bytes_after - entry.layer.numel * width
    return reference, quantized


def check_memory(needed_bytes: int, device: torch.device, what: str) -> None:
    """Refuse to start when ``device`` has less free memory than ``needed_bytes`` (unknown: no check)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_available_bytes()
    if free is not None and needed_bytes > free:
        raise JobError(
            f"too little memory on {device}: {what} need about {needed_bytes / 2**20:,.0f} MiB, "
            f"{free / 2**20:,.0f} MiB is free (hint: --device, a smaller model, or free memory)"
        )


# ------------------------------------------------------------------------------------------- skeleton


def _quiet_transformers() -> contextlib.AbstractContextManager[None]:
    """transformers' own progress bars and load reports would interleave with ours."""
    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()

    return quiet()


def causal_lm_class(folder: Path) -> tuple[Any, type[nn.Module]]:
    """``(config, model class)`` for the causal LM in ``folder``; importing the class here keeps its import
    out of the measured loading stage."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise JobError(
            f"{folder / CONFIG_FILE}: transformers cannot read it: {exc}".splitlines()[0]
        ) from None
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise JobError(
            f"{folder / CONFIG_FILE}: model_type {config.model_type!r} is not a causal LM that transformers "
            "knows (the main job evaluates next-token prediction)"
        ) from None
    return config, model_class


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _quiet_transformers(), _parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """``(module, attribute)`` that holds the parameter or buffer ``name``, or None if there is none."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    if leaf in module._parameters or leaf in module._buffers:
        return module, leaf
    return None


def _check_names_fit(model: nn.Module, routes: dict[str, _Route], folder: Path) -> None:
    """Refuse a checkpoint none of whose tensors has a place in the model (a base model's checkpoint without
    its LM head, whose names lack the ``base_model_prefix``; another architecture)."""
    if any(_owner(model, route.target) is not None for route in routes.values()):
        return
    example = next(iter(routes), "(none)")
    prefix = getattr(model, "base_model_prefix", "")
    hint = (
        f" (names lack the {prefix!r} prefix: a base model without its LM head?)"
        if prefix and any(_owner(model, f"{prefix}.{route.target}") is not None for route in routes.values())
        else ""
    )
    raise JobError(
        f"{folder}: none of its tensors (e.g. {example!r}) fits the {type(model).__name__} that "
        f"config.json describes{hint}"
    )


def _place_planned(model: nn.Module, plan: Plan, device: torch.device) -> dict[int, nn.Parameter]:
    """Give each planned layer's weight a placeholder on ``device`` (and a real zero bias, which the
    quantized layer copies), so that :func:`prepare_online` builds its quantized layers there. Returns the
    placeholders by id (held, so that no other tensor can take an id), which must all be gone once loading
    is done."""
    placeholders: dict[int, nn.Parameter] = {}
    for entry in plan.quantized():
        name = entry.layer.name
        owner = _owner(model, f"{name}.weight") or _owner(model, name)
        if owner is None:
            continue  # prepare_online names the layer the model lacks
        module, leaf = owner
        module._parameters[leaf] = stand_in = _placeholder(module._parameters[leaf], device)
        placeholders[id(stand_in)] = stand_in
        bias = module._parameters.get("bias") if leaf == "weight" else None
        if bias is not None:
            module._parameters["bias"] = nn.Parameter(
                torch.zeros(bias.shape, dtype=bias.dtype, device=device), requires_grad=False
            )
    return placeholders


# ----------------------------------------------------------------------------------------- name routes


@dataclass(frozen=True)
class _Route:
    """Where a stored tensor goes: the loaded name, and for a per-expert tensor its slot in the fused one."""

    target: str
    slot: int | None = None
    slots: int = 1
    fused_shape: tuple[int, ...] = ()


def _routes(checkpoint: Checkpoint) -> dict[str, _Route]:
    renames = CHECKPOINT_RENAMES.get(checkpoint.model_type, ())

    def renamed(stored: str) -> str:
        for stored_part, loaded_part in renames:
            stored = stored.replace(stored_part, loaded_part)
        return stored

    routes = {stored: _Route(renamed(stored)) for stored in checkpoint.headers}
    for layer in checkpoint.layers:
        stored = layer.tensors
        if len(stored) == 1 and renamed(stored[0]) in (layer.name, f"{layer.name}.weight"):
            continue
        # experts fused from per-expert tensors, in stacking order: gate_0, up_0, gate_1, ... / down_0, ...
        for slot, name in enumerate(stored):
            routes[name] = _Route(layer.name, slot, len(stored), layer.shape)
    return routes


# -------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadStats:
    shards: int
    tensors: int
    checkpoint_bytes: int
    """Bytes of tensor data read from the shards."""
    seconds: float
    model_bytes: int
    """Bytes of the loaded model's parameters and buffers (each storage once) on its device."""
    peak: PeakReading
    """Peak memory of building + streaming, over what the process held before."""

    @property
    def host_ratio(self) -> float | None:
        return None if self.peak.host_bytes is None else self.peak.host_bytes / self.model_bytes

    @property
    def device_ratio(self) -> float | None:
        return None if self.peak.device_bytes is None else self.peak.device_bytes / self.model_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "tensors": self.tensors,
            "checkpoint_bytes": self.checkpoint_bytes,
            "seconds": round(self.seconds, 3),
            "model_bytes": self.model_bytes,
            "host_peak_bytes": self.peak.host_bytes,
            "device_peak_bytes": self.peak.device_bytes,
            "host_peak_ratio": _rounded(self.host_ratio),
            "device_peak_ratio": _rounded(self.device_ratio),
            "goal_ratio": MEMORY_HEADROOM,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class QuantizedModel:
    model: nn.Module
    dtype: torch.dtype
    report: ApplyReport
    stats: LoadStats
    notes: list[str] = field(default_factory=list)


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers, each storage counted once (tied weights share one)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _shard_tensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a ``.safetensors`` file, in file order, read with ``readinto`` into a fresh CPU tensor.

    Not ``safetensors.safe_open``: it memory-maps the file, and every page a tensor was copied from stays in
    the process's resident set until the file is closed, so loading a one-shard checkpoint peaked at the
    final model *plus the whole bf16 file* (measured: 2.4x the final model for a 321 MiB Llama). Reading
    each tensor's bytes straight into its own buffer keeps only that tensor; the page cache that the reads
    go through is the kernel's, reclaimable and not ours. The bytes are the file's exactly (little-endian,
    as the format stores them), so tensors equal ``safe_open``'s bit for bit.
    """
    raw_header = read_header_bytes(shard)  # checked by open_checkpoint: offsets lie inside the file
    header = json.loads(raw_header)
    data_start = HEADER_LENGTH_BYTES + len(raw_header)
    entries = sorted(
        ((name, entry) for name, entry in header.items() if name != "__metadata__"),
        key=lambda item: item[1]["data_offsets"][0],
    )
    with open(shard, "rb", buffering=0) as stream:
        for name, entry in entries:
            dtype_name = DTYPE_TORCH_NAMES.get(entry["dtype"])
            dtype = getattr(torch, dtype_name, None) if dtype_name else None
            if not isinstance(dtype, torch.dtype):
                raise JobError(
                    f"{shard}: tensor {name!r} has dtype {entry['dtype']}, which mxrun cannot load"
                )
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            view = memoryview(raw.numpy())
            stream.seek(data_start + begin)
            done = 0
            while done < len(view):
                got = stream.readinto(view[done:])
                if not got:
                    raise JobError(
                        f"{shard}: tensor {name!r} ends past the end of the file (truncated shard)"
                    )
                done += got
            yield name, raw.view(dtype).reshape(entry["shape"])


class _Streamer:
    """Routes each stored tensor to the quantizer or into the model (step 4 of the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        online: Any,
        routes: dict[str, _Route],
        device: torch.device,
        dtype: torch.dtype,
        plan: Plan,
    ) -> None:
        self.model = model
        self.planned = {name for entry in plan.quantized() for name in entry.layer.tensors}
        self.planned |= {f"{entry.layer.name}.weight" for entry in plan.quantized()}
        self.online = online
        self.routes = routes
        self.device = device
        self.dtype = dtype
        self.pending: dict[str, tuple[torch.Tensor, set[int], _Route]] = {}
        self.unexpected: list[str] = []

    def take(self, shard: Path, stored: str, tensor: torch.Tensor) -> None:
        route = self.routes[stored]
        where = f"{shard}: tensor {stored!r}"
        planned = bool({stored, route.target} & self.planned)
        if not tensor.is_floating_point() and (planned or self._expects_float(route.target)):
            raise JobError(
                f"{where} is {_dtype_name(tensor.dtype)}, the model expects floating point there (not a "
                "checkpoint of this model, or one quantized already)"
            )
        tensor = tensor.to(self.device)
        if tensor.is_floating_point() and not _all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            of = " of a planned layer" if planned else ""
            raise JobError(
                f"{where}: {bad} NaN/Inf value(s) in the weight{of} (a corrupt checkpoint; quantizing it "
                "would give garbage scales)"
            )
        if planned and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)  # what the reference model holds, so both start from the same bits
        if route.slot is None:
            if not self._offer(route.target, tensor, where):
                self._set(route.target, tensor, where)
            return
        if self._offer(stored, tensor, where):  # quantized experts take their tensors one by one
            return
        fused, seen, _ = self.pending.setdefault(
            route.target,
            (torch.empty(route.fused_shape, dtype=self.dtype, device=self.device), set(), route),
        )
        if fused.numel() != route.slots * tensor.numel():
            raise JobError(
                f"{where}: shape {list(tensor.shape)} does not fit {route.target} "
                f"{list(route.fused_shape)} ({route.slots} pieces)"
            )
        fused.view(route.slots, *tensor.shape)[route.slot].copy_(tensor)
        seen.add(route.slot)
        if len(seen) == route.slots:
            del self.pending[route.target]
            if not self._offer(route.target, fused, where):
                self._set(route.target, fused, where)

    def _expects_float(self, name: str) -> bool:
        target = _owner(self.model, name)
        if target is None:
            return False
        module, leaf = target
        expected = module._parameters.get(leaf, module._buffers.get(leaf))
        return expected is not None and expected.is_floating_point()

    def _offer(self, name: str, tensor: torch.Tensor, where: str) -> bool:
        """Hand ``tensor`` to the quantizer under ``name``; True if it took it."""
        try:
            return self.online.quantize_on_load(name, tensor)
        except (ValueError, TypeError, ApplyError) as exc:
            raise JobError(f"{where}: cannot quantize it into {name}: {exc}") from None

    def _set(self, name: str, tensor: torch.Tensor, where: str) -> None:
        """Set ``tensor`` as the model's parameter or buffer ``name`` (cast to the dtype the model built)."""
        target = _owner(self.model, name)
        if target is None:
            self.unexpected.append(name)
            return
        module, leaf = target
        is_param = leaf in module._parameters
        expected = module._parameters[leaf] if is_param else module._buffers[leaf]
        if expected is not None and tuple(expected.shape) != tuple(tensor.shape):
            raise JobError(
                f"{where}: shape {list(tensor.shape)}, but the model built from config.json has "
                f"{name} {list(expected.shape)} (config.json of another model?)"
            )
        if expected is not None and expected.dtype != tensor.dtype and tensor.is_floating_point():
            tensor = tensor.to(expected.dtype)
        if is_param:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[leaf] = tensor

    def finish(self) -> None:
        if self.pending:
            name, (_, seen, route) = next(iter(self.pending.items()))
            raise JobError(
                f"the checkpoint holds {len(seen)} of the {route.slots} per-expert tensors of {name} "
                f"(and {len(self.pending) - 1} more incomplete expert stack(s)): a missing shard or "
                "tensor"
            )


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: max and min reductions propagate NaN, and an Inf is the max or the min.

    Two reductions and no temporary: ``torch.isfinite(tensor).all()`` on bf16 makes temporaries of about
    2.5x the input (measured: 156 MB for a 62.5 MB embedding), which was the load's peak.
    """
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.amax())) and bool(torch.isfinite(tensor.amin()))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the buffers the skeleton computed on the CPU (rotary ``inv_freq``; no checkpoint holds them) to
    ``device``; buffers that came from the checkpoint are there already."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def _missing(model: nn.Module, placeholders: dict[int, nn.Parameter]) -> list[str]:
    names = []
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if tensor.device.type == "meta" or id(tensor) in placeholders:
            names.append(name)
    return names


@contextlib.contextmanager
def _progress(total_bytes: int, label: str, enabled: bool) -> Iterator[Any]:
    """A rich progress bar over bytes on stderr, when enabled and stderr is a terminal (a log gets no bar);
    yields ``advance(nbytes)``."""
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda _: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total_bytes)
        yield lambda n: progress.advance(task, n)


WARM_UP_FEATURES = 128
"""Width of the square weight :func:`_warm_up` quantizes per scheme: every scheme can serve it (K % 128)."""


def _warm_up(plan: Plan, dtype: torch.dtype, device: torch.device) -> None:
    """Quantize one small random weight with each planned scheme, and run the NaN check once, before the
    load's memory is measured.

    The first call of torch's CPU kernels in a process sets up thread pools and caches: about 8 MB in a
    fresh process (measured: 7.7 MB for quantizing one 32x32 MXFP8 weight, nothing for the second), the same
    for a 1 MB model as for a 100 GB one. Paid here, it is part of what the process held before loading, as
    the imports are, and the measured peak is what loading the weights costs.
    """
    schemes = {entry.scheme.name: entry.scheme for entry in plan.quantized() if entry.scheme is not None}
    generator = torch.Generator().manual_seed(0)
    for scheme in schemes.values():
        weight = torch.randn(WARM_UP_FEATURES, WARM_UP_FEATURES, generator=generator).to(dtype)
        _all_finite(weight)
        try:
            layer = QuantizedLinear(
                WARM_UP_FEATURES,
                WARM_UP_FEATURES,
                method_for(scheme),
                bias=False,
                dtype=dtype,
                device=device,
                layer_name="warm-up",
            )
        except UnsupportedSchemeError:
            continue  # a scheme no method serves: prepare_online reports its layers
        layer.load_weight(weight)


def load_quantized(
    checkpoint: Checkpoint, plan: Plan, device: torch.device, *, progress: bool = False
) -> QuantizedModel:
    """Build the model of ``checkpoint`` with ``plan``'s layers quantized as their tensors stream in.

    Raises :class:`JobError` (one line, naming the file, tensor or layer) for a plan that quantizes nothing,
    a checkpoint of another model, non-float or non-finite weights, missing tensors.
    """
    if not plan.quantized():
        summary = plan.summary()["by_scheme"]
        raise JobError(
            f"recipe {plan.recipe.name} quantizes no layer of {checkpoint.folder} "
            f"({', '.join(f'{k}: {v}' for k, v in summary.items()) or 'no layers'}); "
            "nothing to do (hint: `mxrun explain` shows why a layer is not matched)"
        )
    dtype = model_dtype(plan)
    notes = []
    if any(e.layer.dtype not in MODEL_DTYPES for e in plan.quantized()):
        notes.append(
            f"the checkpoint's planned weights are not all bf16/fp16; the model is loaded in {dtype}"
        )
    config, _ = causal_lm_class(checkpoint.folder)
    routes = _routes(checkpoint)
    started = time.perf_counter()
    model = _skeleton(config, dtype)
    _warm_up(plan, dtype, device)
    with big_allocations_unmapped(), PeakMemory(device) as peak:
        _check_names_fit(model, routes, checkpoint.folder)
        placeholders = _place_planned(model, plan, device)
        try:
            online = prepare_online(model, plan)
        except ApplyError as exc:
            raise JobError(f"{checkpoint.folder}: {exc}") from None
        if not online.report.replaced:
            reasons = "; ".join(f"{name}: {why}" for name, why in online.report.not_supported[:3])
            raise JobError(
                f"none of the {len(plan.quantized())} planned layer(s) of {checkpoint.folder} can be "
                f"quantized yet ({reasons})"
            )
        streamer = _Streamer(model, online, routes, device, dtype, plan)
        tensors = 0
        label = f"loading {checkpoint.folder.name}"
        with _progress(checkpoint.total_bytes, label, progress) as advance:
            for shard in checkpoint.shards:
                for stored, tensor in _shard_tensors(shard):
                    streamer.take(shard, stored, tensor)
                    del tensor
                    tensors += 1
                    advance(_stored_bytes(checkpoint.headers[stored]))
        streamer.finish()
        try:
            report = online.finish()
        except ApplyError as exc:
            raise JobError(f"{checkpoint.folder}: {exc}") from None
        model.tie_weights()
        _buffers_to(model, device)
        missing = _missing(model, placeholders)
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise JobError(
                f"{checkpoint.folder}: the checkpoint has no tensor for {len(missing)} weight(s) of "
                f"the model that config.json describes: {shown}"
            )
        model.eval()
    if streamer.unexpected:
        shown = ", ".join(streamer.unexpected[:4])
        notes.append(
            f"{len(streamer.unexpected)} checkpoint tensor(s) have no place in the model and were "
            f"ignored: {shown}"
        )
    stats = LoadStats(
        len(checkpoint.shards),
        tensors,
        checkpoint.total_bytes,
        time.perf_counter() - started,
        model_bytes(model),
        peak.reading,
    )
    return QuantizedModel(model, dtype, report, stats, notes)


def load_reference(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The unquantized model, loaded the ordinary way (``from_pretrained``), for the side-by-side evaluation."""
    _, model_class = causal_lm_class(checkpoint.folder)
    with _quiet_transformers():
        model = model_class.from_pretrained(checkpoint.folder, dtype=dtype)  # type: ignore[attr-defined]
    return model.to(device).eval()
