"""Export -> compressed-tensors files -> (their reader | mxrun's reload), for each built-in recipe family.

Exactness: the stored codes and scales are the online model's buffers, so compressed-tensors' decompression
must give our dequantized weights bit for bit (FP8: E4M3 x fp32 scale in fp32 on both sides; MXFP8: E4M3 x
2^e, exact in bf16, which compressed-tensors computes in, and in fp32, which we do), and the reloaded model
must compute the online model's logits bit for bit (same codes, same kernels).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mxrun import __version__
from mxrun.engine.methods import QuantizedLinear
from mxrun.engine.moe import QuantizedExperts
from mxrun.engine.plan import Decision
from mxrun.engine.schemes import WeightGranularity
from mxrun.export.reload import load_exported
from mxrun.kernels.fp8_quantize import Fp8Granularity, dequantize_fp8
from mxrun.kernels.moe_gemm import dequantize_experts
from mxrun.kernels.mxfp8_quantize import dequantize_mxfp8

from .conftest import RECIPES, SIDE_FILES, TOKENS, Exported, export

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: E402
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

FORMAT = {
    "fp8-dynamic": "float-quantized",
    "fp8-channel": "float-quantized",
    "fp8-block": "float-quantized",
    "mxfp8": "mxfp8-quantized",
}
STRATEGY = {
    "fp8-dynamic": ("tensor", "tensor"),
    "fp8-channel": ("channel", "token"),
    "fp8-block": ("block", "group"),
    "mxfp8": ("group", "group"),
}


def our_dequantized(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 weights of every quantized module of ``model`` by checkpoint tensor name, from mxrun's buffers."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            granularity = module.method.scheme.weights.granularity
            if granularity is WeightGranularity.MX:
                value = dequantize_mxfp8(module.weight, module.weight_scale_e8m0)
            elif granularity is WeightGranularity.BLOCK:
                value = dequantize_fp8(module.weight, module.weight_scale, Fp8Granularity.BLOCK_128X128)
            else:
                value = module.weight.float() * module.weight_scale
            out[f"{name}.weight"] = value
        elif isinstance(module, QuantizedExperts):
            inter = module.intermediate_dim
            gate_up = dequantize_experts(module.weights("gate_up_proj"))
            down = dequantize_experts(module.weights("down_proj"))
            for e in range(module.num_experts):
                out[f"{name}.{e}.gate_proj.weight"] = gate_up[e, :inter]
                out[f"{name}.{e}.up_proj.weight"] = gate_up[e, inter:]
                out[f"{name}.{e}.down_proj.weight"] = down[e]
    return out


def stored(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / shard))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.mark.parametrize("recipe", RECIPES)
def test_compressed_tensors_reader_gives_our_dequantized_weights(
    exported: dict[str, Exported], recipe: str
) -> None:
    case = exported[recipe]
    reader = CompressedTensorsDequantizer(case.out, dtype=torch.float32)
    # validate() decompresses every targeted module and fails on any scale no group targets
    decompressed = reader.validate(stored(case.out))
    ours = our_dequantized(case.model)
    assert len(ours) == 8 + 2 * 3 * 4  # 2 layers x (q, k, v, o) + 2 layers x 4 experts x (gate, up, down)
    for name, value in ours.items():
        assert decompressed[name].dtype == torch.float32
        assert torch.equal(decompressed[name], value), name
    assert not any(name.endswith("weight_scale") for name in decompressed)


@pytest.mark.parametrize("recipe", RECIPES)
def test_reload_gives_the_online_logits_bit_for_bit(exported: dict[str, Exported], recipe: str) -> None:
    case = exported[recipe]
    reloaded = load_exported(case.out)
    online_modules = {n: type(m) for n, m in case.model.named_modules()}
    reloaded_modules = {n: type(m) for n, m in reloaded.named_modules()}
    assert reloaded_modules == online_modules
    for (name, a), (_, b) in zip(case.model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(
            a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        ), name
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, case.model(TOKENS).logits)


@pytest.mark.parametrize("recipe", RECIPES)
def test_config(exported: dict[str, Exported], recipe: str) -> None:
    case = exported[recipe]
    config = json.loads((case.out / "config.json").read_text())
    source_config = json.loads((case.source / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source_config
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["quantization_status"] == "compressed"
    assert qc["format"] == FORMAT[recipe]
    # the ignore list names every Linear-like layer left unquantized (the routers are transformers' own
    # router modules, planned as Linears), and nothing else
    unquantized = sorted(
        {n for n, m in case.model.named_modules() if isinstance(m, nn.Linear)}
        | {e.layer.name for e in case.plan.entries if e.decision is not Decision.QUANTIZE}
    )
    assert (
        sorted(qc["ignore"])
        == unquantized
        == ["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    )
    (group,) = qc["config_groups"].values()
    assert (group["weights"]["strategy"], group["input_activations"]["strategy"]) == STRATEGY[recipe]
    assert group["input_activations"]["dynamic"] is True
    assert group["format"] == FORMAT[recipe]
    record = qc["mxrun"]
    assert record["fingerprint"] == case.recipe.fingerprint == case.result.fingerprint
    assert record["recipe"]["resolved"] == case.recipe.canonical()
    assert record["mxrun_version"] == __version__
    # compressed-tensors parses it (the mxrun key is ignored) and infers the format we wrote
    parsed = QuantizationConfig.model_validate(qc)
    for scheme in parsed.config_groups.values():
        assert infer_module_format(nn.Linear, scheme).value == FORMAT[recipe]
    # the side files travel, the index covers several shards
    for name, text in SIDE_FILES.items():
        assert (case.out / name).read_text() == text
    assert len(case.result.shards) > 1
    assert case.result.quantized == {case.plan.quantized()[0].scheme.name: 12}


def test_weight_only_partial_blocks_and_tied_head(tmp_path: Path) -> None:
    """FP8 128x128 weight-only on a model whose dims are not multiples of 128 (partial edge blocks), with an
    lm_head tied to the embedding (a Linear the checkpoint does not store): naive-quantized, lm_head ignored."""
    from tests.engine import model_zoo

    source = tmp_path / "llama"
    model_zoo.tiny_llama(tie_word_embeddings=True).save_pretrained(source)
    recipe = tmp_path / "w8a16.yaml"
    recipe.write_text(
        "version: 1\nname: w8a16\ndescription: test\nrules:\n  - match: '.*'\n    scheme: fp8-block-weight-only\n"
    )
    case = export(str(recipe), source, tmp_path / "out")
    qc = json.loads((case.out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "naive-quantized"
    assert qc["ignore"] == ["lm_head"]
    decompressed = CompressedTensorsDequantizer(case.out, dtype=torch.float32).validate(stored(case.out))
    ours = our_dequantized(case.model)
    assert len(ours) == 2 * 7
    for name, value in ours.items():
        assert torch.equal(decompressed[name], value), name
    reloaded = load_exported(case.out)
    tokens = TOKENS % model_zoo.VOCAB
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, case.model(tokens).logits)


def test_mixed_recipe_writes_one_group_per_scheme(source: Path, tmp_path: Path) -> None:
    """mixed-moe: attention FP8 per-channel (float-quantized), experts MXFP8 (mxfp8-quantized)."""
    case = export("mixed-moe", source, tmp_path / "mixed")
    qc = json.loads((case.out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    groups = {g["format"]: g["targets"] for g in qc["config_groups"].values()}
    assert sorted(groups) == ["float-quantized", "mxfp8-quantized"]
    assert all(t.startswith("re:") for t in groups["mxfp8-quantized"])
    assert all(".self_attn." in t for t in groups["float-quantized"])
    decompressed = CompressedTensorsDequantizer(case.out, dtype=torch.float32).validate(stored(case.out))
    for name, value in our_dequantized(case.model).items():
        assert torch.equal(decompressed[name], value), name
    with torch.no_grad():
        assert torch.equal(load_exported(case.out)(TOKENS).logits, case.model(TOKENS).logits)


def test_box_major_mx_layers_export_and_reload_row_major(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose MXFP8 Linears hold their weights box-major (``MX_WEIGHT_BOX_MAJOR``) exports the very bytes
    a row-major model does, and its export reloads into either layout with the same logits bit for bit."""
    from mxrun.engine import methods

    recipe = next(name for name in RECIPES if "mx" in name)
    monkeypatch.setattr(methods, "MX_WEIGHT_BOX_MAJOR", False)
    rows_case = export(recipe, source, tmp_path / "rows")
    monkeypatch.setattr(methods, "MX_WEIGHT_BOX_MAJOR", True)
    boxes_case = export(recipe, source, tmp_path / "boxes")
    held = [m for m in boxes_case.model.modules() if isinstance(m, QuantizedLinear)]
    assert held and all(m.weight_box_major for m in held)
    rows_stored, boxes_stored = stored(rows_case.out), stored(boxes_case.out)
    assert set(rows_stored) == set(boxes_stored)
    for name, tensor in rows_stored.items():
        assert torch.equal(tensor.view(torch.uint8), boxes_stored[name].view(torch.uint8)), name
    with torch.no_grad():
        expected = rows_case.model(TOKENS).logits
        reloaded = load_exported(boxes_case.out)
        assert all(m.weight_box_major for m in reloaded.modules() if isinstance(m, QuantizedLinear))
        assert torch.equal(reloaded(TOKENS).logits, expected)
        monkeypatch.setattr(methods, "MX_WEIGHT_BOX_MAJOR", False)
        reloaded = load_exported(boxes_case.out)
        assert not any(m.weight_box_major for m in reloaded.modules() if isinstance(m, QuantizedLinear))
        assert torch.equal(reloaded(TOKENS).logits, expected)
