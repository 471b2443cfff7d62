"""Applying a plan to tiny transformers models on CPU: every planned Linear replaced in place (bias, dtype,
device kept), skipped and unplanned layers untouched, MoE experts swapped, logits close to the bf16 model,
and online quantization from a checkpoint streamed tensor by tensor giving the same model.

Logit tolerance: each quantized Linear adds a relative error of at most ~0.05 (W8A8: sqrt(2/3) 2^-4, see
test_methods) that the next RMSNorm does not amplify; through 2 decoder layers (7 Linears each, about
4 in series per layer) the errors add in quadrature to ~0.1 relative in the worst seeds; measured 0.04-0.05.
We assert 0.15 relative (Frobenius) for W8A8 and 0.1 for weight-only, and that the quantized model is not
the bf16 one (error > 0), so the test cannot pass with nothing quantized.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import model_zoo
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mxrun.engine.apply import ApplyError, apply_plan, prepare_online
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.methods import QuantizedLinear
from mxrun.engine.plan import Decision, resolve

pytest.importorskip("transformers")

TOKENS = torch.randint(0, model_zoo.VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def _recipe(tmp_path: Path, scheme: str):
    path = tmp_path / f"{scheme}.yaml"
    path.write_text(
        dedent(f"""\
        version: 1
        name: t-{scheme}
        description: every Linear but lm_head
        rules:
          - match: '.*'
            kind: linear
            scheme: {scheme}
        skip: [lm_head]
        """)
    )
    return load_recipe_or_raise(path)


def _llama(hidden: int = model_zoo.HIDDEN, bias: bool = False, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=model_zoo.VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    ("scheme", "hidden", "tolerance"),
    [
        ("fp8-tensor", 64, 0.15),
        ("fp8-channel", 64, 0.15),
        ("mxfp8", 64, 0.15),
        ("fp8-block", 128, 0.15),  # 1x128 activation groups need hidden % 128 == 0
        ("fp8-channel-weight-only", 64, 0.1),
        ("mxfp8-weight-only", 64, 0.1),
        ("fp8-block-weight-only", 64, 0.1),  # partial 128x128 blocks
    ],
)
def test_apply_plan_replaces_planned_linears(
    tmp_path: Path, scheme: str, hidden: int, tolerance: float
) -> None:
    model = _llama(hidden, bias=True)
    reference = _logits(model)
    before = dict(model.named_modules())
    plan = resolve(_recipe(tmp_path, scheme), model)
    report = apply_plan(model, plan)

    planned = [e.layer.name for e in plan.entries if e.decision is Decision.QUANTIZE]
    assert report.replaced == tuple(planned) and len(planned) == 14
    assert report.by_scheme == {scheme: 14} and report.not_supported == ()
    assert report.bytes_after < report.bytes_before
    for name in planned:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedLinear) and layer.weight_loaded
        original = before[name]
        assert layer.dtype == torch.bfloat16 and layer.weight.device == original.weight.device
        assert layer.bias is not None and torch.equal(layer.bias, original.bias)
    assert model.lm_head is before["lm_head"] and isinstance(model.lm_head, nn.Linear)
    logits = _logits(model)
    assert 0 < _rel(logits, reference) < tolerance


def test_fp16_model(tmp_path: Path) -> None:
    model = _llama().half()
    reference = _logits(model)
    report = apply_plan(model, resolve(_recipe(tmp_path, "mxfp8"), model))
    assert len(report.replaced) == 14
    assert all(model.get_submodule(n).dtype == torch.float16 for n in report.replaced)
    logits = model(TOKENS).logits
    assert logits.dtype == torch.float16
    assert 0 < _rel(logits.float(), reference) < 0.15


def test_builtin_recipe_on_zoo_llama_skips_lm_head() -> None:
    model = model_zoo.tiny_llama()
    reference = _logits(model)
    plan = resolve(load_recipe_or_raise("fp8-channel"), model)
    report = apply_plan(model, plan)
    assert "lm_head" not in report.replaced and isinstance(model.lm_head, nn.Linear)
    assert report.untouched == sum(e.decision is not Decision.QUANTIZE for e in plan.entries) >= 1
    assert 0 < _rel(_logits(model), reference) < 0.15


def test_moe_experts_are_quantized_with_the_linears() -> None:
    """The MoE details are in test_moe.py; here: a built-in recipe swaps the experts module of the zoo's
    Qwen3-MoE (whose dense layer 0 stays a Linear MLP) and counts its bytes in the report."""
    from mxrun.engine.moe import QuantizedExperts

    model = model_zoo.tiny_qwen3_moe()
    router = model.model.layers[1].mlp.gate
    plan = resolve(load_recipe_or_raise("fp8-channel"), model)
    report = apply_plan(model, plan)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, QuantizedExperts) and model.model.layers[1].mlp.gate is router
    assert report.experts_modules == ("model.layers.1.mlp.experts",) and report.not_supported == ()
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= set(
        report.replaced
    )
    expert_bytes_bf16 = 2 * (4 * 96 * 64 + 4 * 64 * 48)  # gate_up [4, 96, 64] and down [4, 64, 48], bf16
    linear_bytes_bf16 = sum(
        2 * e.layer.numel
        for e in plan.entries
        if e.layer.name in report.replaced and "experts" not in e.layer.name
    )
    assert report.bytes_before == expert_bytes_bf16 + linear_bytes_bf16
    assert report.bytes_after < 0.6 * report.bytes_before
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuantizedLinear)
    assert torch.isfinite(_logits(model)).all()


def test_plan_for_another_model_is_refused(tmp_path: Path) -> None:
    plan = resolve(_recipe(tmp_path, "fp8-channel"), _llama())
    model = _llama()
    apply_plan(model, plan)
    with pytest.raises(ApplyError, match=r"model\.layers\.0\.mlp\.down_proj.*QuantizedLinear"):
        apply_plan(model, plan)  # applied twice


@pytest.mark.parametrize("scheme", ["mxfp8", "fp8-channel"])
def test_online_quantization_from_a_streamed_checkpoint(tmp_path: Path, scheme: str) -> None:
    source = _llama(bias=True, seed=0)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    recipe = _recipe(tmp_path, scheme)

    offline = _llama(bias=True, seed=0)
    apply_plan(offline, resolve(recipe, offline))

    fresh = _llama(bias=True, seed=123)  # different random weights: everything must come from the checkpoint
    online = prepare_online(fresh, resolve(recipe, fresh))
    assert len(online.missing()) == 14
    consumed = model_zoo.stream_checkpoint(path, fresh, online)
    report = online.finish()
    assert len(report.replaced) == 14 and len(consumed) == 28  # weight + bias of each
    assert torch.equal(_logits(fresh), _logits(offline))


def test_online_quantization_names_missing_weights(tmp_path: Path) -> None:
    model = _llama()
    online = prepare_online(model, resolve(_recipe(tmp_path, "fp8-tensor"), model))
    assert online.quantize_on_load(
        "model.layers.0.self_attn.q_proj", torch.randn(64, 64, dtype=torch.bfloat16)
    )
    assert "model.layers.0.self_attn.q_proj" not in online.missing()
    assert not online.quantize_on_load("model.embed_tokens.weight", torch.zeros(1))
    with pytest.raises(ApplyError, match=r"13 quantized layer\(s\): model\.layers\.0\.mlp\.down_proj"):
        online.finish()
