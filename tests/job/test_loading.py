"""Online loading: the model built from config.json and streamed shard by shard, with planned layers quantized
as their tensors arrive, is the model that ``apply_plan`` makes from a normally loaded one, bit for bit.

Bit for bit because both paths hand the quantizer the same bf16 tensors (``from_pretrained`` fuses per-expert
tensors exactly as the loader does: a copy, no arithmetic) and the quantizer is deterministic; so every
buffer (E4M3 bytes, scales) and every logit must be equal, not close.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mxrun.engine.apply import apply_plan
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.plan import resolve_layers
from mxrun.job.loading import _shard_tensors, load_quantized, load_reference, model_bytes, open_checkpoint
from tests.engine import model_zoo
from tests.job.conftest import recipe_file, zoo_checkpoint

CPU = torch.device("cpu")
TOKENS = torch.randint(0, model_zoo.VOCAB, (1, 13), generator=torch.Generator().manual_seed(1))

EVERYTHING_FP8_CHANNEL = """\
rules:
  - {match: '.*', scheme: fp8-channel}
skip: [lm_head, '.*\\.mlp\\.gate']
"""


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A view whose ``torch.equal`` compares bytes (float8 has no CPU equality kernel)."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 and tensor.dtype != torch.uint8 else tensor


def _assert_same_model(online: nn.Module, offline: nn.Module) -> None:
    ours, theirs = online.state_dict(), offline.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        other = theirs[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, name
        assert torch.equal(_bits(tensor), _bits(other)), name
    with torch.no_grad():
        assert torch.equal(online(TOKENS).logits, offline(TOKENS).logits)


@pytest.mark.parametrize(
    ("zoo", "recipe", "shard_kb"),
    [
        ("qwen3_moe", "fp8-channel-all", 40),  # experts quantized, per-expert tensors across shards
        ("mixtral", "fp8-channel-all", None),  # block_sparse_moe -> mlp, w1/w3/w2 fused, one file
        ("llama_tied", "mxfp8", 30),  # tied lm_head absent from the checkpoint, re-tied
        ("qwen3_moe", "mixed-moe", None),  # experts skipped by mxfp8's K % 32 rule: stacks loaded unquantized
    ],
)
def test_online_load_equals_apply_plan(tmp_path: Path, zoo: str, recipe: str, shard_kb: int | None) -> None:
    folder = zoo_checkpoint(tmp_path, zoo, shard_kb)
    reference = recipe_file(tmp_path, EVERYTHING_FP8_CHANNEL) if recipe == "fp8-channel-all" else recipe
    checkpoint = open_checkpoint(folder)
    plan = resolve_layers(load_recipe_or_raise(reference), checkpoint.layers)
    loaded = load_quantized(checkpoint, plan, CPU)

    offline = load_reference(checkpoint, loaded.dtype, CPU)
    offline_report = apply_plan(offline, plan)
    assert loaded.report.replaced == offline_report.replaced and loaded.report.replaced
    assert loaded.report.not_supported == offline_report.not_supported
    _assert_same_model(loaded.model, offline)
    assert loaded.stats.tensors == len(checkpoint.headers) and loaded.stats.shards == len(checkpoint.shards)
    if zoo != "llama_tied":
        assert any("experts" in name for name in loaded.report.replaced) == (recipe != "mixed-moe")


def test_shard_reader_gives_safe_opens_tensors(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.arange(7, dtype=torch.int64),
        "h": torch.randn(2, 2, 2).half(),
        "f": torch.randn(4),
        "e": torch.empty(0, 3),
        "m": torch.tensor([True, False]),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    ours = dict(_shard_tensors(path))
    assert ours.keys() == tensors.keys()
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            theirs = handle.get_tensor(name)
            assert ours[name].dtype == theirs.dtype and torch.equal(ours[name], theirs), name


def test_tied_embedding_is_shared_after_loading(tmp_path: Path) -> None:
    checkpoint = open_checkpoint(zoo_checkpoint(tmp_path, "llama_tied"))
    assert "lm_head.weight" not in checkpoint.headers
    plan = resolve_layers(load_recipe_or_raise("mxfp8"), checkpoint.layers)
    model = load_quantized(checkpoint, plan, CPU).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_no_weight_is_left_on_meta_and_buffers_are_computed(tmp_path: Path) -> None:
    checkpoint = open_checkpoint(zoo_checkpoint(tmp_path, "qwen3_moe"))
    plan = resolve_layers(load_recipe_or_raise("fp8-channel"), checkpoint.layers)
    model = load_quantized(checkpoint, plan, CPU).model
    reference = load_reference(checkpoint, torch.bfloat16, CPU)
    assert all(t.device == CPU for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_model_bytes_counts_each_storage_once(tmp_path: Path) -> None:
    checkpoint = open_checkpoint(zoo_checkpoint(tmp_path, "llama_tied"))
    plan = resolve_layers(load_recipe_or_raise("mxfp8"), checkpoint.layers)
    loaded = load_quantized(checkpoint, plan, CPU)
    expected = sum(
        t.numel() * t.element_size() for t in [*loaded.model.parameters(), *loaded.model.buffers()]
    )
    assert loaded.stats.model_bytes == model_bytes(loaded.model) == expected  # parameters() dedupes the tie
    reference = load_reference(checkpoint, torch.bfloat16, CPU)
    quantized_layers = loaded.report.bytes_before - loaded.report.bytes_after
    assert model_bytes(reference) - loaded.stats.model_bytes == quantized_layers > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_online_load_on_cuda_equals_apply_plan(tmp_path: Path) -> None:
    """On CUDA the quantizers are Triton kernels; both paths use them, so the results are still equal."""
    cuda = torch.device("cuda")
    checkpoint = open_checkpoint(zoo_checkpoint(tmp_path, "qwen3_moe", shard_kb=40))
    plan = resolve_layers(
        load_recipe_or_raise(recipe_file(tmp_path, EVERYTHING_FP8_CHANNEL)), checkpoint.layers
    )
    loaded = load_quantized(checkpoint, plan, cuda)
    offline = load_reference(checkpoint, loaded.dtype, cuda)
    apply_plan(offline, plan)
    assert all(t.device.type == "cuda" for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    ours, theirs = loaded.model.state_dict(), offline.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(_bits(ours[name]), _bits(theirs[name])) for name in ours)
    with torch.no_grad():
        tokens = TOKENS.to(cuda)
        assert torch.equal(loaded.model(tokens).logits, offline(tokens).logits)
    assert loaded.stats.peak.device_bytes is not None
    assert loaded.stats.peak.device_bytes >= 0.9 * loaded.stats.model_bytes
