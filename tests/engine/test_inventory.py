"""Tests for mxrun.engine.inventory: module and checkpoint inventories of real architectures must be equal.

The decisive property: for the same model, ``layers_from_module(model)`` and
``layers_from_checkpoint(model.save_pretrained(...))`` are identical lists (except ``Layer.tensors``), so a
recipe resolves to the same plan from either. Tiny transformers-5 models come from ``model_zoo``; hostile
and hand-written checkpoints are written byte by byte here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mxrun.engine import safetensors_headers
from mxrun.engine.inventory import (
    FLOAT_DTYPES,
    InventoryError,
    layers_from_checkpoint,
    layers_from_module,
    layers_from_source,
    without_tensor_names,
)
from mxrun.engine.layers import Layer, LayerKind
from mxrun.engine.safetensors_headers import DTYPE_TORCH_NAMES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", minversion="5")

# tests/engine is on sys.path (pytest's rootdir-relative import of this file); after the skip: needs transformers
import model_zoo

LINEAR, EXPERTS = LayerKind.LINEAR, LayerKind.MOE_EXPERTS
BF16 = "bfloat16"
REPO_ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    """Every zoo model, built once for the module (building is seeded, so they never change)."""
    return {name: build() for name, build in model_zoo.ZOO.items()}


def _saved(model: nn.Module, folder: Path, **save_kwargs: object) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return folder


def _summary(layers: list[Layer]) -> list[tuple[str, LayerKind, tuple[int, ...], str | None]]:
    return [(layer.name, layer.kind, layer.shape, layer.group) for layer in layers]


def _write_safetensors(
    path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], data: bytes | None = None
) -> int:
    """A safetensors file with the given ``name: (dtype code, shape)`` entries; returns its header length.

    The data region is zeros unless ``data`` is given (which then must have the right length).
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        numel = 1
        for dim in shape:
            numel *= dim
        size = numel * safetensors_headers.DTYPE_ITEM_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header).encode()
    path.write_bytes(
        struct.pack("<Q", len(header_bytes)) + header_bytes + (data if data is not None else bytes(offset))
    )
    return len(header_bytes)


def _checkpoint_dir(folder: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "test", **config}))
    _write_safetensors(folder / "model.safetensors", tensors)
    return folder


def _synthetic_checkpoint_module():  # type: ignore[no-untyped-def]
    """``benchmarks/synthetic_checkpoint.py`` (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "synthetic_checkpoint", REPO_ROOT / "benchmarks" / "synthetic_checkpoint.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- exact module inventories


def test_llama_layers_are_linears_with_qkv_and_gate_up_groups(zoo: dict[str, nn.Module]) -> None:
    layers = layers_from_module(zoo["llama"])
    expected = [("lm_head", LINEAR, (128, 64), None)]
    for i in range(2):
        p = f"model.layers.{i}"
        expected += [
            (f"{p}.mlp.down_proj", LINEAR, (64, 96), None),
            (f"{p}.mlp.gate_proj", LINEAR, (96, 64), f"{p}.mlp.gate_up"),
            (f"{p}.mlp.up_proj", LINEAR, (96, 64), f"{p}.mlp.gate_up"),
            (f"{p}.self_attn.k_proj", LINEAR, (32, 64), f"{p}.self_attn.qkv"),
            (f"{p}.self_attn.o_proj", LINEAR, (64, 64), None),
            (f"{p}.self_attn.q_proj", LINEAR, (64, 64), f"{p}.self_attn.qkv"),
            (f"{p}.self_attn.v_proj", LINEAR, (32, 64), f"{p}.self_attn.qkv"),
        ]
    assert _summary(layers) == expected
    assert {layer.dtype for layer in layers} == {BF16}
    assert all(layer.tensors == () for layer in layers)


def test_qwen3_moe_has_fused_experts_router_and_dense_layer(zoo: dict[str, nn.Module]) -> None:
    by_name = {layer.name: layer for layer in layers_from_module(zoo["qwen3_moe"])}
    experts = "model.layers.1.mlp.experts"
    assert _summary([by_name[f"{experts}.gate_up_proj"], by_name[f"{experts}.down_proj"]]) == [
        (f"{experts}.gate_up_proj", EXPERTS, (4, 96, 64), experts),  # [E, 2I, H]
        (f"{experts}.down_proj", EXPERTS, (4, 64, 48), experts),  # [E, H, I]
    ]
    assert _summary([by_name["model.layers.1.mlp.gate"]]) == [
        ("model.layers.1.mlp.gate", LINEAR, (4, 64), None)
    ]
    assert (
        by_name["model.layers.0.mlp.gate_proj"].group == "model.layers.0.mlp.gate_up"
    )  # mlp_only_layers=[0]
    assert not any(name.startswith("model.embed_tokens") or "norm" in name for name in by_name)


def test_transposed_fused_experts_are_reported_k_last(zoo: dict[str, nn.Module]) -> None:
    # gpt-oss stores gate_up_proj [E, H, 2I] and down_proj [E, I, H] (transformers: is_transposed=True)
    experts = zoo["gpt_oss"].model.layers[0].mlp.experts
    assert experts.is_transposed and tuple(experts.down_proj.shape) == (4, 48, 64)
    by_name = {layer.name: layer for layer in layers_from_module(zoo["gpt_oss"])}
    assert by_name["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 64)
    assert by_name["model.layers.0.mlp.experts.down_proj"].shape == (4, 64, 48)
    assert by_name["model.layers.0.mlp.router"].kind is LINEAR


def test_bert_query_key_value_form_a_group_and_embeddings_are_not_layers(zoo: dict[str, nn.Module]) -> None:
    layers = layers_from_module(zoo["bert"])
    names = [layer.name for layer in layers]
    assert not any("embeddings" in name for name in names)
    block = "encoder.layer.0.attention.self"
    assert {layer.name for layer in layers if layer.group == f"{block}.qkv"} == {
        f"{block}.query",
        f"{block}.key",
        f"{block}.value",
    }
    assert "pooler.dense" in names


def test_deepseek_v3_mla_has_no_qkv_group_and_shared_experts_are_dense(zoo: dict[str, nn.Module]) -> None:
    model = zoo["deepseek_v3"]
    by_name = {layer.name: layer for layer in layers_from_module(model)}
    assert by_name["model.layers.0.self_attn.q_a_proj"].group is None
    assert (
        by_name["model.layers.1.mlp.shared_experts.up_proj"].group
        == "model.layers.1.mlp.shared_experts.gate_up"
    )
    # The router's dtype is reported as stored (recent transformers keep DeepSeek's router in fp32, older
    # ones cast it with the model), so compare with the parameter rather than a version-dependent constant.
    router_dtype = str(model.get_submodule("model.layers.1.mlp.gate").weight.dtype).removeprefix("torch.")
    assert by_name["model.layers.1.mlp.gate"].dtype == router_dtype


def test_tied_lm_head_is_not_a_layer(zoo: dict[str, nn.Module]) -> None:
    model = zoo["llama_tied"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" not in {layer.name for layer in layers_from_module(model)}


def test_module_on_meta_device_gives_the_same_layers(zoo: dict[str, nn.Module]) -> None:
    with torch.device("meta"):
        meta_model = model_zoo.tiny_qwen3_moe()
    assert next(meta_model.parameters()).is_meta
    assert layers_from_module(meta_model) == layers_from_module(zoo["qwen3_moe"])


# ------------------------------------------------------------------------- module == checkpoint inventory


@pytest.mark.parametrize("name", sorted(model_zoo.ZOO))
def test_checkpoint_inventory_equals_module_inventory(
    zoo: dict[str, nn.Module], name: str, tmp_path: Path
) -> None:
    model = zoo[name]
    from_checkpoint = layers_from_checkpoint(_saved(model, tmp_path / name))
    assert without_tensor_names(from_checkpoint) == layers_from_module(model)
    assert all(layer.tensors for layer in from_checkpoint)


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "mixtral", "olmoe"])
def test_sharded_checkpoint_inventory_equals_module_inventory(
    zoo: dict[str, nn.Module], name: str, tmp_path: Path
) -> None:
    folder = _saved(zoo[name], tmp_path / name, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    assert without_tensor_names(layers_from_checkpoint(folder)) == layers_from_module(zoo[name])


def test_per_expert_tensors_fuse_in_expert_order(zoo: dict[str, nn.Module], tmp_path: Path) -> None:
    # Mixtral on disk: block_sparse_moe.experts.<i>.w1 (gate) / w3 (up) / w2 (down); loaded: mlp.experts.*
    by_name = {layer.name: layer for layer in layers_from_checkpoint(_saved(zoo["mixtral"], tmp_path))}
    stored = "model.layers.0.block_sparse_moe.experts"
    assert by_name["model.layers.0.mlp.experts.gate_up_proj"].tensors == tuple(
        f"{stored}.{e}.{w}.weight" for e in range(4) for w in ("w1", "w3")
    )
    assert by_name["model.layers.0.mlp.experts.down_proj"].tensors == tuple(
        f"{stored}.{e}.w2.weight" for e in range(4)
    )
    assert by_name["model.layers.0.mlp.gate"].tensors == ("model.layers.0.block_sparse_moe.gate.weight",)


def test_single_safetensors_file_with_config_beside_it(zoo: dict[str, nn.Module], tmp_path: Path) -> None:
    folder = _saved(zoo["mixtral"], tmp_path)
    assert layers_from_checkpoint(folder / "model.safetensors") == layers_from_checkpoint(folder)


def test_layers_from_source_dispatches_on_module_and_path(zoo: dict[str, nn.Module], tmp_path: Path) -> None:
    folder = _saved(zoo["llama"], tmp_path)
    assert layers_from_source(zoo["llama"]) == layers_from_module(zoo["llama"])
    assert layers_from_source(folder) == layers_from_source(str(folder)) == layers_from_checkpoint(folder)
    with pytest.raises(TypeError, match=r"nn\.Module or a checkpoint path"):
        layers_from_source(42)


class _ModuleListMoE(nn.Module):
    """A hand-written MoE whose experts are a ModuleList of Linears (not fused on load)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            nn.ModuleDict(
                {"gate_proj": nn.Linear(16, 8, bias=False), "down_proj": nn.Linear(8, 16, bias=False)}
            )
            for _ in range(3)
        )


def test_modulelist_experts_match_an_unfused_checkpoint_inventory(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = _ModuleListMoE()
    module_layers = layers_from_module(model)
    assert _summary(module_layers)[:2] == [
        ("experts.0.down_proj", EXPERTS, (16, 8), "experts"),
        ("experts.0.gate_proj", EXPERTS, (8, 16), "experts"),
    ]
    tmp_path.joinpath("config.json").write_text("{}")
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    assert without_tensor_names(layers_from_checkpoint(tmp_path, fuse_experts=False)) == module_layers


# ------------------------------------------------------------------------------- checkpoint rules by hand


def test_rank2_weights_are_linear_unless_embedding_and_nonfloat_or_rank1_are_skipped(tmp_path: Path) -> None:
    folder = _checkpoint_dir(
        tmp_path,
        {
            "model.embed_tokens.weight": ("BF16", (32, 8)),
            "transformer.wte.weight": ("BF16", (32, 8)),
            "bert.embeddings.word_embeddings.weight": ("BF16", (32, 8)),
            "gpt_neox.embed_out.weight": ("BF16", (32, 8)),  # GPT-NeoX's head: a Linear
            "model.norm.weight": ("BF16", (8,)),
            "model.proj.bias": ("BF16", (8,)),
            "model.quantized.weight": ("I8", (8, 8)),
            "model.packed.weight": ("U8", (8, 4)),
            "model.proj.weight": ("F16", (8, 8)),
            "model.proj.weight_scale_inv": ("F32", (1, 1)),
            "model.conv.weight": ("F32", (8, 4, 3)),  # rank 3, not under experts: a conv kernel
        },
    )
    assert _summary(layers_from_checkpoint(folder)) == [
        ("gpt_neox.embed_out", LINEAR, (32, 8), None),
        ("model.proj", LINEAR, (8, 8), None),
    ]
    assert layers_from_checkpoint(folder)[1].dtype == "float16"


def test_layers_sort_numeric_components_as_integers(tmp_path: Path) -> None:
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": ("BF16", (4, 4)) for i in (10, 2, 1, 0)}
    tensors["lm_head.weight"] = ("BF16", (4, 4))
    names = [layer.name for layer in layers_from_checkpoint(_checkpoint_dir(tmp_path, tensors))]
    assert names == ["lm_head"] + [f"model.layers.{i}.mlp.down_proj" for i in (0, 1, 2, 10)]


def test_incomplete_expert_set_stays_per_expert(tmp_path: Path) -> None:
    tensors = {
        f"model.layers.0.mlp.experts.{e}.{proj}.weight": ("BF16", (8, 16) if proj != "down_proj" else (16, 8))
        for e in range(3)
        for proj in ("gate_proj", "up_proj", "down_proj")
        if (e, proj) != (2, "up_proj")
    }
    layers = layers_from_checkpoint(_checkpoint_dir(tmp_path, tensors))
    assert len(layers) == 8
    assert {(layer.kind, layer.group) for layer in layers} == {(EXPERTS, "model.layers.0.mlp.experts")}
    assert layers[0].name == "model.layers.0.mlp.experts.0.down_proj"


def test_fused_transposed_experts_on_disk_without_config_decided_by_chaining(tmp_path: Path) -> None:
    path = tmp_path / "experts.safetensors"
    _write_safetensors(
        path,
        {"m.experts.gate_up_proj": ("BF16", (4, 64, 96)), "m.experts.down_proj": ("BF16", (4, 48, 64))},
    )
    assert _summary(layers_from_checkpoint(path)) == [
        ("m.experts.down_proj", EXPERTS, (4, 64, 48), "m.experts"),
        ("m.experts.gate_up_proj", EXPERTS, (4, 96, 64), "m.experts"),
    ]


def test_dtype_names_agree_with_torch() -> None:
    for code, torch_name in DTYPE_TORCH_NAMES.items():
        dtype = getattr(torch, torch_name, None)
        assert dtype is not None, code
        assert (torch_name in FLOAT_DTYPES) == dtype.is_floating_point, code
        assert safetensors_headers.DTYPE_ITEM_BYTES[code] == dtype.itemsize, code


# --------------------------------------------------------------------------------- headers only, no data


def test_only_header_bytes_are_read(
    zoo: dict[str, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _saved(zoo["qwen3_moe"], tmp_path, max_shard_size="40KB")
    header_bytes = {}
    for shard in folder.glob("*.safetensors"):
        with shard.open("rb") as stream:
            header_bytes[shard.name] = 8 + struct.unpack("<Q", stream.read(8))[0]
    bytes_read: dict[str, int] = {}
    real_open = open

    class CountingReader:
        def __init__(self, path: Path, mode: str) -> None:
            assert mode == "rb"
            self._file, self._name = real_open(path, mode), Path(path).name

        def __enter__(self) -> CountingReader:
            return self

        def __exit__(self, *exc: object) -> None:
            self._file.close()

        def fileno(self) -> int:
            return self._file.fileno()

        def read(self, size: int) -> bytes:
            data = self._file.read(size)
            bytes_read[self._name] = bytes_read.get(self._name, 0) + len(data)
            return data

    monkeypatch.setattr(safetensors_headers, "open", CountingReader, raising=False)
    layers_from_checkpoint(folder)
    assert bytes_read == header_bytes


def test_garbage_data_region_does_not_matter(zoo: dict[str, nn.Module], tmp_path: Path) -> None:
    folder = _saved(zoo["olmoe"], tmp_path)
    before = layers_from_checkpoint(folder)
    shard = folder / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[data_start:] = b"\xff" * (len(raw) - data_start)
    shard.write_bytes(bytes(raw))
    assert layers_from_checkpoint(folder) == before


def test_synthetic_deepseek_like_checkpoint_resolves_from_sparse_shards(tmp_path: Path) -> None:
    synthetic = _synthetic_checkpoint_module()
    folder = synthetic.write_synthetic_checkpoint(
        tmp_path,
        n_layers=4,
        n_moe_layers=3,
        n_experts=16,
        n_shards=7,
        hidden=256,
        moe_inter=64,
        dense_inter=512,
    )
    assert 1 < len(list(folder.glob("model-*.safetensors"))) <= 7
    layers = layers_from_checkpoint(folder)
    by_name = {layer.name: layer for layer in layers}
    assert len(layers) == 1 + 7 + 3 * (
        4 + 1 + 3 + 2
    )  # lm_head, dense layer, MoE layers (attn, router, shared, experts)
    experts = "model.layers.3.mlp.experts"
    assert _summary([by_name[f"{experts}.gate_up_proj"], by_name[f"{experts}.down_proj"]]) == [
        (f"{experts}.gate_up_proj", EXPERTS, (16, 128, 256), experts),
        (f"{experts}.down_proj", EXPERTS, (16, 256, 64), experts),
    ]
    assert by_name[f"{experts}.gate_up_proj"].tensors[:3] == (
        f"{experts}.0.gate_proj.weight",
        f"{experts}.0.up_proj.weight",
        f"{experts}.1.gate_proj.weight",
    )
    assert by_name["model.layers.3.mlp.gate"].kind is LINEAR
    assert by_name["model.layers.0.mlp.gate_proj"].shape == (512, 256)
    assert by_name["model.layers.1.self_attn.k_proj"].group == "model.layers.1.self_attn.qkv"
    shard = next(folder.glob("model-*.safetensors"))
    assert (
        shard.stat().st_size > 1_000_000 and shard.stat().st_blocks * 512 < 1_000_000
    )  # sparse: headers only


# ------------------------------------------------------------------------------------ broken checkpoints


def _error_for(path: Path) -> str:
    with pytest.raises(InventoryError) as caught:
        layers_from_checkpoint(path)
    return str(caught.value)


def test_missing_folder_and_missing_config(tmp_path: Path) -> None:
    assert str(tmp_path / "absent") in _error_for(tmp_path / "absent")
    tmp_path.joinpath("model.safetensors").write_bytes(b"")
    assert "config.json" in _error_for(tmp_path)


def test_folder_without_safetensors(tmp_path: Path) -> None:
    tmp_path.joinpath("config.json").write_text("{}")
    tmp_path.joinpath("pytorch_model.bin").write_bytes(b"")
    message = _error_for(tmp_path)
    assert "model.safetensors" in message and "pytorch_model.bin" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 2**63) + b"{}", "exceeds"),
        (struct.pack("<Q", 1000) + b"{}", "runs past the end"),
        (struct.pack("<Q", 4) + b"{{{{", "corrupt"),
        (struct.pack("<Q", 2) + b"[]", "JSON object"),
        (struct.pack("<Q", 16) + b'{"a.weight": 3} ', "malformed"),
    ],
    ids=["shorter-than-length", "huge-length", "length-past-eof", "not-json", "not-object", "bad-entry"],
)
def test_corrupt_header_names_the_file(tmp_path: Path, content: bytes, expected: str) -> None:
    shard = tmp_path / "model.safetensors"
    tmp_path.joinpath("config.json").write_text("{}")
    shard.write_bytes(content)
    message = _error_for(tmp_path)
    assert str(shard) in message and expected in message


def test_truncated_data_region_and_wrong_byte_count_name_the_tensor(tmp_path: Path) -> None:
    folder = _checkpoint_dir(tmp_path, {"x.weight": ("BF16", (8, 8))})
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert "'x.weight'" in _error_for(folder) and "truncated" in _error_for(folder)
    header = json.dumps({"x.weight": {"dtype": "BF16", "shape": [8, 8], "data_offsets": [0, 100]}}).encode()
    shard.write_bytes(struct.pack("<Q", len(header)) + header + bytes(100))
    assert "needs 128 bytes" in _error_for(folder)


def test_index_naming_a_missing_shard(zoo: dict[str, nn.Module], tmp_path: Path) -> None:
    folder = _saved(zoo["llama"], tmp_path, max_shard_size="40KB")
    missing = sorted(folder.glob("model-*.safetensors"))[-1]
    missing.unlink()
    message = _error_for(folder)
    assert "model.safetensors.index.json" in message and missing.name in message and "missing" in message


def test_index_that_disagrees_with_the_shards(zoo: dict[str, nn.Module], tmp_path: Path) -> None:
    folder = _saved(zoo["llama"], tmp_path, max_shard_size="40KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    index_file.write_text(json.dumps(index))
    assert "'model.layers.9.mlp.up_proj.weight'" in _error_for(folder)


def test_index_with_a_path_for_a_shard_name(tmp_path: Path) -> None:
    tmp_path.joinpath("config.json").write_text("{}")
    tmp_path.joinpath("model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "../x.safetensors"}})
    )
    assert "not a file name" in _error_for(tmp_path)


def test_tensor_stored_in_two_shards(tmp_path: Path) -> None:
    tmp_path.joinpath("config.json").write_text("{}")
    for shard in ("a.safetensors", "b.safetensors"):
        _write_safetensors(tmp_path / shard, {"x.weight": ("BF16", (2, 2))})
    index = {"weight_map": {"x.weight": "a.safetensors", "y.weight": "b.safetensors"}}
    tmp_path.joinpath("model.safetensors.index.json").write_text(json.dumps(index))
    assert "also stored in" in _error_for(tmp_path)
