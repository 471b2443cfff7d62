"""The quantizable layers of a model, from a live ``nn.Module`` or from a checkpoint's safetensors headers.

Both sources are reduced to the same table, *weight name -> (shape, dtype)* in the names a loaded
transformers-5 model uses, and one classifier turns that table into :class:`~mxrun.engine.layers.Layer`
values. So for the same model :func:`layers_from_module` and :func:`layers_from_checkpoint` return identical
lists (names, kinds, shapes, dtypes, groups, order; only ``Layer.tensors`` differs: empty for a module, the
source tensor names for a checkpoint), and a recipe resolves to the same plan from either.

What is a layer (the classifier, applied to a weight named ``W`` of floating dtype):

- rank 2, ``W = X.weight`` -> LINEAR ``X``, shape ``[out, in]``, unless the leaf of ``X`` names an embedding
  (:data:`EMBEDDING_LEAF`: ``embed_tokens``, ``wte``, ``wpe``, ``word_embeddings``, ``shared``, ...). Norms are
  rank 1 and never match. Routers (``mlp.gate``, ``block_sparse_moe.gate``, ``mlp.router``) are LINEAR:
  transformers 5 implements them as modules with a rank-2 ``weight`` used through ``F.linear``, and recipes
  skip them by name.
- rank 2, ``W = P.experts.<i>.<proj>.weight`` -> MOE_EXPERTS ``P.experts.<i>.<proj>``: one expert's
  projection, when experts are a ModuleList (or a checkpoint's per-expert tensors could not be fused).
- rank 3, ``W = P.experts.<param>`` (or ``P.experts.<param>.weight``) -> MOE_EXPERTS ``P.experts.<param>``
  with shape ``[E, N, K]``. Some models store fused experts transposed, ``[E, K, N]`` (transformers marks
  them ``is_transposed``: gpt-oss, Aria, Llama 4); shapes are normalized to K last, see
  :func:`_experts_are_transposed`.
- anything else (non-float weights, biases, conv kernels, scales) is not a layer.

Module mode adds what only a module knows: ``nn.Embedding`` weights are never layers, and a weight tied to
an embedding (the tied ``lm_head`` of a ``tie_word_embeddings`` model) is not a layer either. That matches
the checkpoint, where transformers 5 does not write the tied ``lm_head.weight`` at all; and quantizing a
tied head would quantize the embedding table with it.

Fused MoE experts. transformers 5 holds the experts of a MoE block as two fused parameters,
``experts.gate_up_proj [E, 2I, H]`` and ``experts.down_proj [E, H, I]``, but ``save_pretrained`` writes
them back per expert (``experts.<i>.gate_proj.weight [I, H]``, ``up_proj``, ``down_proj``; Mixtral
``block_sparse_moe.experts.<i>.w1/w3/w2``) and re-fuses them on load. The checkpoint inventory therefore
fuses per-expert tensors the same way (``gate_up`` = for each expert, gate rows then up rows, stacked over
experts 0..E-1) and lists every source tensor in ``Layer.tensors`` in that order (``gate_0, up_0, gate_1,
up_1, ...``; ``down_0, down_1, ...``). A container is fused only when the set is complete and uniform
(experts exactly ``0..E-1``, the same projections, shapes and dtype for each); otherwise its tensors stay
per-expert layers. Pass ``fuse_experts=False`` for models whose experts really are a ModuleList.

Renames on load. Some transformers-5 models rename checkpoint keys on load (Mixtral:
``.block_sparse_moe.`` -> ``.mlp.``). :data:`CHECKPOINT_RENAMES` mirrors those, keyed by
``config.json``'s ``model_type``; the layer name is the loaded name, ``Layer.tensors`` the stored one.

Groups: layers that serving engines fuse into one matmul must share a scheme, so they carry a group name:
q/k/v projections of one attention block (``q_proj/k_proj/v_proj``, BERT ``query/key/value``, Meta
``wq/wk/wv``) -> ``<block>.qkv``; gate/up of one dense MLP (``gate_proj/up_proj``, ``w1/w3``) ->
``<mlp>.gate_up``; every expert layer of one MoE block -> ``<P>.experts``. A q/k/v or gate/up group needs at
least two members present (a lone ``q_proj`` in MLA attention has no partner to fuse with).

Order: natural sort of the layer name, numeric components compared as integers (``layers.2`` before
``layers.10``); the same in both modes, since a checkpoint's tensor order carries no meaning.

Known differences between modes, by design of a config-independent classifier: a checkpoint cannot tell a
GPT-2 ``Conv1D`` (rank-2 weight stored ``[in, out]``) from a Linear, nor an embedding whose name does not
look like one; models whose loading renames keys other than those in :data:`CHECKPOINT_RENAMES` get the
stored names.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mxrun.engine.layers import Layer, LayerKind
from mxrun.engine.safetensors_headers import DTYPE_TORCH_NAMES, HeaderError, TensorHeader, read_tensor_headers

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

FLOAT_DTYPES = frozenset(
    {
        "float64", "float32", "float16", "bfloat16",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    }
)  # fmt: skip
"""Torch dtype names whose weights can be layers (exactly those with ``torch.dtype.is_floating_point``)."""

EMBEDDING_LEAF = re.compile(
    r"wte|wpe|shared|embed_tokens|embed_positions|embed_in|tok_embeddings|(?:\w+_)?embeddings?"
    r"|relative_attention_bias"
)
"""Module leaf names (full match) whose rank-2 ``weight`` is an embedding table, not a Linear.

Matches ``embed_tokens``, ``word_embeddings``, ``position_embeddings``, ``token_type_embeddings``,
``embedding``, GPT-2 ``wte``/``wpe``, T5 ``shared`` and ``relative_attention_bias``, GPT-NeoX ``embed_in``;
not ``embed_out`` (GPT-NeoX's head is a Linear) nor ``embedding_hidden_mapping_in`` (ALBERT's Linear).
"""

CHECKPOINT_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": ((".block_sparse_moe.", ".mlp."),),
    "minimax": ((".block_sparse_moe.", ".mlp."),),
}
"""``model_type`` -> (stored substring, loaded substring) pairs that transformers 5 applies on load."""

EXPERT_ROLES = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}
"""Per-expert projection names a checkpoint fuses, and their role in the fused parameters."""

_QKV_LEAVES = frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value", "wq", "wk", "wv"})
_GATE_UP_LEAVES = frozenset({"gate_proj", "up_proj", "w1", "w3"})


class InventoryError(Exception):
    """A model source that cannot be inventoried; the message names the file or tensor at fault."""


class _Weight(NamedTuple):
    """One weight as a loaded model names it, before classification (a tuple: a 671B model has 45k)."""

    name: str
    """The loaded parameter name, e.g. ``model.layers.0.self_attn.q_proj.weight``."""
    shape: tuple[int, ...]
    dtype: str
    """Torch dtype name (``bfloat16``)."""
    tensors: tuple[str, ...] = ()
    """Checkpoint tensor names that hold it (empty in module mode)."""
    fused_here: bool = False
    """True for experts fused here from per-expert tensors: ``[E, N, K]`` by construction."""


class _Candidate(NamedTuple):
    """A classified weight: a :class:`Layer` before its group is known."""

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    dtype: str
    tensors: tuple[str, ...]
    layout_known: bool


# --------------------------------------------------------------------------------------------- public API


def layers_from_source(source: Any, *, fuse_experts: bool = True) -> list[Layer]:
    """The layers of ``source``: an ``nn.Module``, or a checkpoint folder / ``.safetensors`` file path."""
    if isinstance(source, (str, os.PathLike)):
        return layers_from_checkpoint(source, fuse_experts=fuse_experts)
    import torch  # not at module level: the CLI plans from checkpoints without paying for torch's import

    if isinstance(source, torch.nn.Module):
        return layers_from_module(source)
    raise TypeError(f"expected an nn.Module or a checkpoint path, got {type(source).__name__}")


def layers_from_module(model: torch.nn.Module) -> list[Layer]:
    """The layers of a live model; reads only parameter shapes and dtypes (works on the meta device)."""
    from torch import nn

    embedding_weight_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.weight is not None
    }
    seen_ids: set[int] = set()
    weights: list[_Weight] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen_ids or id(param) in embedding_weight_ids:
                continue  # a tied weight is inventoried once, and never when an embedding owns it
            seen_ids.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            weights.append(_Weight(name, tuple(param.shape), str(param.dtype).removeprefix("torch.")))
    return _layers_from_weights(weights, hidden_size=_hidden_size(getattr(model, "config", None)))


def layers_from_checkpoint(path: str | os.PathLike[str], *, fuse_experts: bool = True) -> list[Layer]:
    """The layers of a checkpoint, from its safetensors headers only (no tensor data is read).

    ``path`` is a Hugging Face folder (``config.json`` plus ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``) or one ``.safetensors`` file (a ``config.json`` beside it is used when
    present). ``fuse_experts=False`` keeps per-expert tensors as one layer each, for models whose experts
    are a ModuleList. Raises :class:`InventoryError` naming the file for a missing folder, config or shard,
    and for a truncated or corrupt header or index.
    """
    checkpoint = _locate_checkpoint(Path(path))
    stored = _read_all_headers(checkpoint.shards)
    if checkpoint.index_file is not None and checkpoint.weight_map is not None:
        _check_index_matches_shards(checkpoint.index_file, checkpoint.weight_map, stored)

    renames = CHECKPOINT_RENAMES.get(str(checkpoint.config.get("model_type", "")), ())
    weights: list[_Weight] = []
    per_expert: dict[str, dict[str, dict[int, _Weight]]] = defaultdict(lambda: defaultdict(dict))
    for stored_name, (stored_dtype, shape, _) in stored.items():
        dtype = DTYPE_TORCH_NAMES.get(stored_dtype, stored_dtype)
        if dtype not in FLOAT_DTYPES or len(shape) not in (2, 3):
            continue  # never a layer (see _classified); skipped early because most stored tensors are not
        name = stored_name
        for stored_part, loaded_part in renames:
            name = name.replace(stored_part, loaded_part)
        weight = _Weight(name, shape, dtype, (stored_name,))
        if fuse_experts and len(shape) == 2 and "experts." in name and (expert := _per_expert_parts(name)):
            container, index, projection = expert
            per_expert[container][projection][index] = weight
        else:
            weights.append(weight)
    for container, projections in per_expert.items():
        weights.extend(_fuse_container(container, projections))
    return _layers_from_weights(weights, hidden_size=_hidden_size(checkpoint.config))


def without_tensor_names(layers: Iterable[Layer]) -> list[Layer]:
    """``layers`` with ``tensors`` cleared: what must be equal between a module and its checkpoint."""
    return [replace(layer, tensors=()) for layer in layers]


# ------------------------------------------------------------------------------------ checkpoint files


@dataclass(frozen=True)
class _CheckpointFiles:
    """Where a checkpoint's headers are, and what its config and index say."""

    shards: list[Path]
    config: dict[str, Any]
    """Parsed ``config.json`` (``{}`` for a lone ``.safetensors`` file without one beside it)."""
    index_file: Path | None = None
    weight_map: dict[str, str] | None = None
    """The index's tensor name -> shard file name."""


def _locate_checkpoint(path: Path) -> _CheckpointFiles:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InventoryError(
                f"{path}: not a .safetensors file (give the checkpoint folder or a .safetensors file)"
            )
        sibling_config = path.parent / CONFIG_FILE
        return _CheckpointFiles([path], _read_json_object(sibling_config) if sibling_config.is_file() else {})
    if not path.is_dir():
        raise InventoryError(f"{path}: no such checkpoint folder or file")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise InventoryError(
            f"{config_file}: missing; a Hugging Face checkpoint folder needs its config.json"
        )
    config = _read_json_object(config_file)
    index_file = path / INDEX_FILE
    if index_file.is_file():
        weight_map = _read_weight_map(index_file)
        return _CheckpointFiles(_shards_from_index(index_file, weight_map), config, index_file, weight_map)
    if (path / SINGLE_FILE).is_file():
        return _CheckpointFiles([path / SINGLE_FILE], config)
    others = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    hint = f" (found {', '.join(others[:5])}; only safetensors files, sharded with an index, are read)"
    raise InventoryError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint if others else ''}")


def _read_weight_map(index_file: Path) -> dict[str, str]:
    weight_map = _read_json_object(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InventoryError(f"{index_file}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _shards_from_index(index_file: Path, weight_map: dict[str, str]) -> list[Path]:
    """The distinct shard files an index names, in first-mention order; each must exist inside the folder."""
    shards: list[Path] = []
    for shard_name in dict.fromkeys(weight_map.values()):
        if Path(shard_name).name != shard_name or shard_name in {"", ".", ".."}:
            raise InventoryError(
                f"{index_file}: shard {shard_name!r} is not a file name in the checkpoint folder"
            )
        shard = index_file.parent / shard_name
        if not shard.is_file():
            tensor = next(t for t, s in weight_map.items() if s == shard_name)
            raise InventoryError(f"{index_file}: shard {shard_name} (holding {tensor!r}) is missing")
        shards.append(shard)
    return shards


def _read_all_headers(shards: list[Path]) -> dict[str, TensorHeader]:
    """All tensors of all shards by stored name; a name stored twice is an error."""
    stored: dict[str, TensorHeader] = {}
    for shard in shards:
        try:
            shard_tensors = read_tensor_headers(shard)
        except HeaderError as exc:
            raise InventoryError(str(exc)) from exc
        if not stored.keys().isdisjoint(shard_tensors):
            name = next(name for name in shard_tensors if name in stored)
            raise InventoryError(f"{shard}: tensor {name!r} is also stored in {stored[name].file}")
        stored.update(shard_tensors)
    return stored


def _check_index_matches_shards(
    index_file: Path, weight_map: dict[str, str], stored: dict[str, TensorHeader]
) -> None:
    """Every tensor the index lists must be in the shard it names (a stale index breaks loading later).

    Tensors a shard holds beyond the index are kept: loaders read every key of the shards they open.
    """
    for tensor, shard_name in weight_map.items():
        header = stored.get(tensor)
        if header is None or header.file.name != shard_name:
            where = f"it is in {header.file.name}" if header is not None else "no shard holds it"
            raise InventoryError(f"{index_file}: tensor {tensor!r} is listed in {shard_name} but {where}")


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InventoryError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise InventoryError(f"{path}: a JSON object was expected")
    return value


# ------------------------------------------------------------------------------------------ fused experts


def _per_expert_parts(name: str) -> tuple[str, int, str] | None:
    """``(container, index, projection)`` for ``<container>.<index>.<projection>.weight`` where the
    container's leaf is ``experts`` and the projection is one :data:`EXPERT_ROLES` knows; else None.

    Parsed by splitting, not by a regex: this runs for each of the 44k expert tensors of a 671B model.
    """
    parts = name.rsplit(".", 4)
    if (
        len(parts) < 4
        or parts[-1] != "weight"
        or parts[-2] not in EXPERT_ROLES
        or not parts[-3].isdecimal()
        or parts[-4] != "experts"
    ):
        return None
    container = name[: -(len(parts[-1]) + len(parts[-2]) + len(parts[-3]) + 3)]  # drop ".<i>.<proj>.weight"
    return container, int(parts[-3]), parts[-2]


def _fuse_container(container: str, projections: Mapping[str, Mapping[int, _Weight]]) -> list[_Weight]:
    """The fused weights of one experts container, or its per-expert weights unchanged if it cannot fuse."""
    by_role = {EXPERT_ROLES[projection]: experts for projection, experts in projections.items()}
    members = [weight for experts in projections.values() for weight in experts.values()]
    n_experts = len(next(iter(projections.values())))
    every_expert = set(range(n_experts))
    fusable = (
        len(by_role) == len(projections)  # no role named two ways (gate_proj and w1)
        and ("gate" not in by_role or "up" in by_role)
        and all(experts.keys() == every_expert for experts in projections.values())
        and len({weight.dtype for weight in members}) == 1
        and all(len({weight.shape for weight in experts.values()}) == 1 for experts in projections.values())
        and ("gate" not in by_role or by_role["gate"][0].shape == by_role["up"][0].shape)
    )
    if not fusable:
        return members
    dtype = members[0].dtype
    fused: list[_Weight] = []
    if "up" in by_role:
        up = by_role["up"]
        n_out, k = up[0].shape
        if "gate" in by_role:
            gate = by_role["gate"]
            sources = tuple(t for e in range(n_experts) for t in gate[e].tensors + up[e].tensors)
            fused.append(
                _Weight(f"{container}.gate_up_proj", (n_experts, 2 * n_out, k), dtype, sources, True)
            )
        else:
            sources = tuple(t for e in range(n_experts) for t in up[e].tensors)
            fused.append(_Weight(f"{container}.up_proj", (n_experts, n_out, k), dtype, sources, True))
    if "down" in by_role:
        down = by_role["down"]
        sources = tuple(t for e in range(n_experts) for t in down[e].tensors)
        fused.append(_Weight(f"{container}.down_proj", (n_experts, *down[0].shape), dtype, sources, True))
    return fused


def _hidden_size(config: Any) -> int | None:
    """The model width from a config (dict or config object), to tell transposed fused experts apart."""
    for candidate in (config, _field(config, "text_config")):
        for key in ("hidden_size", "d_model", "n_embd"):
            value = _field(candidate, key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _field(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


# ---------------------------------------------------------------------------------------- classification


def _layers_from_weights(weights: Iterable[_Weight], hidden_size: int | None) -> list[Layer]:
    """Classify, put K last in fused experts, assign groups, sort: the half both sources share."""
    candidates = [candidate for weight in weights if (candidate := _classified(weight)) is not None]
    candidates = _with_experts_k_last(candidates, hidden_size)
    groups = _groups(candidates)
    candidates = _sorted_naturally(candidates)
    return [Layer(c.name, c.kind, c.shape, c.dtype, groups.get(c.name), c.tensors) for c in candidates]


def _classified(weight: _Weight) -> _Candidate | None:
    """What a weight is as a layer, or None; the rules are in the module docstring."""
    if weight.dtype not in FLOAT_DTYPES:
        return None
    rank = len(weight.shape)
    parts = weight.name.split(".")
    if rank == 3:
        if parts[-1] == "weight":
            parts = parts[:-1]
        if len(parts) >= 2 and parts[-2] == "experts":
            return _Candidate(
                ".".join(parts), LayerKind.MOE_EXPERTS, weight.shape, weight.dtype, weight.tensors,
                weight.fused_here,
            )  # fmt: skip
        return None
    if rank != 2 or len(parts) < 2 or parts[-1] != "weight" or EMBEDDING_LEAF.fullmatch(parts[-2]):
        return None
    is_one_expert = len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdecimal()
    kind = LayerKind.MOE_EXPERTS if is_one_expert else LayerKind.LINEAR
    return _Candidate(weight.name[: -len(".weight")], kind, weight.shape, weight.dtype, weight.tensors, True)


def _with_experts_k_last(candidates: list[_Candidate], hidden_size: int | None) -> list[_Candidate]:
    """Swap the last two dims of fused experts stored ``[E, K, N]``, so every shape has K last."""
    fused_by_container: dict[str, dict[str, _Candidate]] = defaultdict(dict)
    for candidate in candidates:
        if not candidate.layout_known:
            container, _, param = candidate.name.rpartition(".")
            fused_by_container[container][param] = candidate
    transposed = {
        candidate.name
        for params in fused_by_container.values()
        if _experts_are_transposed(params, hidden_size)
        for candidate in params.values()
    }
    if not transposed:
        return candidates
    return [
        c._replace(shape=(c.shape[0], c.shape[2], c.shape[1]), layout_known=True)
        if c.name in transposed
        else c
        for c in candidates
    ]


def _experts_are_transposed(params: Mapping[str, _Candidate], hidden_size: int | None) -> bool:
    """Whether one container's fused experts are stored ``[E, K, N]`` rather than ``[E, N, K]``.

    The input projection (``gate_up_proj`` / ``up_proj``) has K = hidden size and ``down_proj`` has N =
    hidden size; when the config gives the hidden size, that decides. Without it, gate/up and down must
    chain: ``[E, 2I, H]`` with ``[E, H, I]``, or transposed ``[E, H, 2I]`` with ``[E, I, H]`` (both cannot
    hold). When nothing decides, the layout is taken as stored.
    """
    gate_up, up, down = params.get("gate_up_proj"), params.get("up_proj"), params.get("down_proj")
    into = gate_up or up
    if hidden_size is not None:
        if into is not None and into.shape[2] != into.shape[1]:
            if into.shape[2] == hidden_size:
                return False
            if into.shape[1] == hidden_size:
                return True
        if down is not None and down.shape[2] != down.shape[1]:
            if down.shape[1] == hidden_size:
                return False
            if down.shape[2] == hidden_size:
                return True
    if gate_up is not None and down is not None:
        chains_as_stored = gate_up.shape[2] == down.shape[1] and gate_up.shape[1] == 2 * down.shape[2]
        chains_transposed = gate_up.shape[1] == down.shape[2] and gate_up.shape[2] == 2 * down.shape[1]
        return chains_transposed and not chains_as_stored
    return False


def _groups(candidates: list[_Candidate]) -> dict[str, str]:
    """Layer name -> group name, for q/k/v, dense gate/up and expert layers (see the module docstring)."""
    members: dict[str, list[str]] = defaultdict(list)
    for candidate in candidates:
        prefix, _, leaf = candidate.name.rpartition(".")
        if candidate.kind is LayerKind.MOE_EXPERTS:
            members[_experts_container(candidate.name)].append(candidate.name)
        elif leaf in _QKV_LEAVES:
            members[f"{prefix}.qkv" if prefix else "qkv"].append(candidate.name)
        elif leaf in _GATE_UP_LEAVES:
            members[f"{prefix}.gate_up" if prefix else "gate_up"].append(candidate.name)
    return {
        name: group
        for group, names in members.items()
        if len(names) >= 2 or group.rpartition(".")[2] == "experts"
        for name in names
    }


def _experts_container(name: str) -> str:
    """``P.experts`` for ``P.experts.gate_up_proj`` and for ``P.experts.7.gate_proj``."""
    parts = name.split(".")
    last_experts = len(parts) - 1 - parts[::-1].index("experts")
    return ".".join(parts[: last_experts + 1])


def _sorted_naturally(candidates: list[_Candidate]) -> list[_Candidate]:
    """``candidates`` sorted by name, numeric components compared as integers (``layers.2`` < ``layers.10``).

    A name's key is its parent's key plus one component, memoized per parent: layers share a few thousand
    parents, so a 100k-layer model builds ~100k small tuples instead of re-splitting every name.
    """
    keys: dict[str, tuple[tuple[int, int, str], ...]] = {}

    def key(name: str) -> tuple[tuple[int, int, str], ...]:
        cached = keys.get(name)
        if cached is None:
            parent, _, part = name.rpartition(".")
            own = (0, int(part), "") if part.isdecimal() else (1, 0, part)
            cached = keys[name] = (key(parent) if parent else ()) + (own,)
        return cached

    return sorted(candidates, key=lambda candidate: key(candidate.name))
