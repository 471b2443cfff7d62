"""Quantized MoE experts inside real transformers-5 models (Qwen3-MoE, Mixtral, OLMoE), on CPU.

The models are built from configs with hidden = I = 128 so that every scheme can serve both expert GEMMs
(MXFP8 needs K % 32, FP8 1x128 activation groups K % 128); only the experts are quantized, so what the
logits show is the experts' error.

Bounds:

* **Against a fake-quantized bf16 model** (weight-only schemes): the same model with each expert weight
  replaced by its dequantized value. Both compute the same function of the same weights; they differ in
  rounding only (transformers rounds the gate/up product to bf16 before the SiLU, we round after the SiLU
  product; transformers rounds each pair's output, weighted, in bf16 and adds them in bf16), i.e. a few bf16
  ulps (2^-8 .. 2^-7 relative each) per MoE output, carried through 2 layers and the final norm; measured
  0.008-0.012 relative. We assert 0.03: a wrong expert, routing weight, or gate/up order is 0.3 or more.
* **Against the bf16 model.** E4M3 rounding is uniform-ish within +-2^-4 relative (3 mantissa bits), so one
  quantized weight or activation contributes ~2^-4 / sqrt(3) ~ 0.036 relative RMS error per GEMM. Weight-only:
  two GEMMs in series per MoE layer, ~0.05 on the MoE output; two MoE layers in series, ~0.07 on the logits.
  W8A8 adds activation quantization in quadrature, ~0.1. With the random tiny models the MoE output dominates
  the residual stream, so nothing dilutes it; measured 0.06-0.11 (weight-only) and 0.09-0.14 (W8A8). We
  assert 0.15 and 0.2, and that the error is not 0 (something was quantized).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from textwrap import dedent

import model_zoo
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mxrun.engine.apply import MOE_PARTLY_PLANNED, ApplyError, apply_plan, prepare_online
from mxrun.engine.inventory import layers_from_module
from mxrun.engine.layers import LayerKind
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.methods import QuantizedLinear
from mxrun.engine.moe import QuantizedExperts
from mxrun.engine.plan import Decision, resolve
from mxrun.kernels.moe_gemm import ExpertWeights, dequantize_experts
from mxrun.kernels.moe_routing import RouterScore, route_topk

transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).parents[2] / "mxrun" / "examples" / "tiny-moe"
TOKENS = torch.randint(0, model_zoo.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
HIDDEN = 128
INTER = 128


def _config(arch: str):
    common = dict(
        vocab_size=model_zoo.VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2,
    )  # fmt: skip
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, head_dim=32, moe_intermediate_size=INTER, intermediate_size=256, num_experts=4,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        )  # fmt: skip
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=INTER, num_local_experts=4)
    return transformers.OlmoeConfig(
        **common, intermediate_size=INTER, num_experts=4, pad_token_id=0, eos_token_id=1, bos_token_id=2
    )


def _model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            # decisive routers: with the default init (std 0.02) router logits nearly tie, and the ~4%
            # quantization error of the hidden states flips top-k picks of the next layer, which swamps the
            # experts' own error (measured: up to 0.24 relative on the logits instead of 0.1)
            layer.mlp.gate.weight.normal_(0, 0.5)
            layer.mlp.experts.gate_up_proj.normal_(0, 0.05)
            layer.mlp.experts.down_proj.normal_(0, 0.05)
    return model


def _recipe(tmp_path: Path, scheme: str, match: str = r".*\.experts(\..*)?"):
    path = tmp_path / f"{scheme}.yaml"
    path.write_text(
        dedent(f"""\
        version: 1
        name: experts-{scheme}
        description: experts only
        rules:
          - match: '{match}'
            kind: moe_experts
            scheme: {scheme}
        """)
    )
    return load_recipe_or_raise(path)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _experts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith("mlp.experts")}


# ------------------------------------------------------------------------------------------------ routing


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_route_topk_matches_the_model_router(arch: str) -> None:
    model = _model(arch)
    block = model.model.layers[0].mlp
    x = torch.randn(13, HIDDEN).to(torch.bfloat16)
    with torch.no_grad():
        logits, weights, index = block.gate(x)
        renormalize = getattr(block.gate, "norm_topk_prob", True)
        ours_w, ours_i = route_topk(
            logits, 2, score=RouterScore.SOFTMAX, renormalize=renormalize, weights_dtype=weights.dtype
        )
    assert torch.equal(ours_i, index) and torch.equal(ours_w, weights)


# ------------------------------------------------------------------------------------------------ accuracy


def _fake_quantized(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """``model`` with every expert weight replaced by the dequantized weight of ``quantized``."""
    for name, module in _experts(model).items():
        q = quantized.get_submodule(name)
        with torch.no_grad():
            for param in ("gate_up_proj", "down_proj"):
                values = dequantize_experts(q.weights(param)).to(torch.bfloat16)
                getattr(module, param).copy_(values)
    return model


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
@pytest.mark.parametrize(
    ("scheme", "tolerance"),
    [
        ("fp8-channel", 0.2),
        ("fp8-block", 0.2),
        ("mxfp8", 0.2),
        ("fp8-channel-weight-only", 0.15),
        ("fp8-block-weight-only", 0.15),
        ("mxfp8-weight-only", 0.15),
    ],
)
def test_quantized_experts_logits(tmp_path: Path, arch: str, scheme: str, tolerance: float) -> None:
    model = _model(arch)
    reference = _logits(model)
    routers = {name: m.mlp.gate for name, m in model.model.layers.named_children()}
    plan = resolve(_recipe(tmp_path, scheme), model)
    report = apply_plan(model, plan)
    experts = _experts(model)
    assert len(experts) == 2 and all(isinstance(m, QuantizedExperts) for m in experts.values())
    assert report.experts_modules == tuple(experts) and report.not_supported == ()
    assert len(report.replaced) == 4 and report.by_scheme == {scheme: 4}
    assert report.bytes_after < 0.6 * report.bytes_before  # 1 byte per weight plus scales, from 2
    assert all(m.mlp.gate is routers[n] for n, m in model.model.layers.named_children())  # own router kept
    logits = _logits(model)
    assert 0 < _rel(logits, reference) < tolerance
    if scheme.endswith("weight-only"):
        fake = _fake_quantized(_model(arch), model)
        assert _rel(logits, _logits(fake)) < 0.03


# ---------------------------------------------------------------------------------------- online loading


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b for name, b in model.named_buffers() if "experts" in name}


def _assert_same_quantized(a: nn.Module, b: nn.Module) -> None:
    ours, theirs = _buffers(a), _buffers(b)
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for name, tensor in ours.items():
        assert torch.equal(tensor.view(torch.uint8), theirs[name].view(torch.uint8)), name


@pytest.mark.parametrize("scheme", ["mxfp8", "fp8-block", "fp8-channel-weight-only"])
def test_online_per_expert_checkpoint_equals_apply_plan(tmp_path: Path, scheme: str) -> None:
    """The bundled tiny-moe checkpoint stores experts per expert (``experts.<e>.gate_proj.weight``)."""
    recipe = _recipe(tmp_path, scheme)
    offline = transformers.AutoModelForCausalLM.from_pretrained(EXAMPLE, dtype=torch.bfloat16).eval()
    apply_plan(offline, resolve(recipe, offline))

    config = transformers.AutoConfig.from_pretrained(EXAMPLE)
    torch.manual_seed(123)  # other random weights: everything must come from the checkpoint
    fresh = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    online = prepare_online(fresh, resolve(recipe, EXAMPLE))  # planned from the checkpoint: Layer.tensors
    assert len(online.missing()) == 2
    consumed = model_zoo.stream_checkpoint(EXAMPLE / "model.safetensors", fresh, online)
    online.finish()
    assert len(consumed) == 2 * 4 * 3  # 2 layers x 4 experts x gate/up/down
    assert all(not m._pending for m in _experts(fresh).values())  # no bf16 half left waiting
    _assert_same_quantized(fresh, offline)
    assert torch.equal(_logits(fresh), _logits(offline))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_online_fused_and_per_expert_names_from_a_module_plan(tmp_path: Path, arch: str) -> None:
    """A plan made from the module lists no tensor names; the quantizer takes the fused stacks under their
    own names, and per-expert tensors under the names transformers writes (Mixtral: stored
    ``block_sparse_moe.experts.<e>.w1``, renamed to ``mlp`` on load)."""
    recipe = _recipe(tmp_path, "fp8-channel")
    source = _model(arch, seed=0)
    offline = _model(arch, seed=0)
    apply_plan(offline, resolve(recipe, offline))

    fused = tmp_path / "fused.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(fused))
    per_expert = tmp_path / "per_expert.safetensors"
    tensors, rename = {}, {}
    for name, value in source.state_dict().items():
        container, _, param = name.rpartition(".")
        if not container.endswith("experts"):
            stored = name.replace(".mlp.", ".block_sparse_moe.") if arch == "mixtral" else name
            tensors[stored], rename[stored] = value.contiguous(), name
            continue
        stored_container = (
            container.replace(".mlp.", ".block_sparse_moe.") if arch == "mixtral" else container
        )
        names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(value.shape[0]):
            if param == "gate_up_proj":
                gate, up = value[e].chunk(2)
                tensors[f"{stored_container}.{e}.{names[0]}.weight"] = gate.contiguous()
                tensors[f"{stored_container}.{e}.{names[1]}.weight"] = up.contiguous()
            else:
                tensors[f"{stored_container}.{e}.{names[2]}.weight"] = value[e].contiguous()
    save_file(tensors, str(per_expert))

    for path in (fused, per_expert):
        fresh = _model(arch, seed=123)
        online = prepare_online(fresh, resolve(recipe, fresh))
        consumed = model_zoo.stream_checkpoint(path, fresh, online, rename)
        online.finish()
        assert len(consumed) == (4 if path is fused else 2 * 4 * 3)
        _assert_same_quantized(fresh, offline)
        assert torch.equal(_logits(fresh), _logits(offline))


def test_online_names_missing_experts(tmp_path: Path) -> None:
    model = _model("qwen3_moe")
    online = prepare_online(model, resolve(_recipe(tmp_path, "fp8-channel"), model))
    gate = torch.randn(INTER, HIDDEN, dtype=torch.bfloat16)
    assert online.quantize_on_load("model.layers.0.mlp.experts.1.gate_proj.weight", gate)
    assert not online.quantize_on_load("model.layers.0.mlp.gate.weight", torch.zeros(4, HIDDEN))
    with pytest.raises(ApplyError, match=r"model\.layers\.0\.mlp\.experts \(experts 0\.gate, 1\.gate"):
        online.finish()  # expert 1's gate waits for its up half: not quantized yet


# ------------------------------------------------------------------------------------------ memory, edges


def test_apply_plan_frees_the_bf16_experts(tmp_path: Path) -> None:
    model = _model("qwen3_moe")
    originals = [weakref.ref(m.gate_up_proj) for m in _experts(model).values()]
    originals += [weakref.ref(m.down_proj) for m in _experts(model).values()]
    apply_plan(model, resolve(_recipe(tmp_path, "mxfp8"), model))
    gc.collect()
    assert all(ref() is None for ref in originals)
    assert not any(p.dim() == 3 for p in model.parameters())  # no bf16 expert stack left in the model
    for experts in _experts(model).values():
        assert all(t.dtype in (torch.float8_e4m3fn, torch.uint8) for t in experts.buffers())


def test_unsupported_experts_are_reported_and_left_alone(tmp_path: Path) -> None:
    model = _model("olmoe")
    model.model.layers[0].mlp.experts.act_fn = nn.GELU()
    report = apply_plan(model, resolve(_recipe(tmp_path, "fp8-channel"), model))
    reasons = dict(report.not_supported)
    assert set(reasons) == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"}
    assert all("not SiLU" in r for r in reasons.values())
    assert not isinstance(model.model.layers[0].mlp.experts, QuantizedExperts)
    assert isinstance(model.model.layers[1].mlp.experts, QuantizedExperts)
    assert torch.isfinite(_logits(model)).all()


def test_half_planned_experts_are_reported(tmp_path: Path) -> None:
    model = _model("qwen3_moe")
    recipe = _recipe(tmp_path, "fp8-channel", match=r".*\.experts\.gate_up_proj")
    plan = resolve(recipe, model)
    report = apply_plan(model, plan)
    assert dict(report.not_supported) == {
        f"model.layers.{i}.mlp.experts.gate_up_proj": MOE_PARTLY_PLANNED for i in (0, 1)
    }
    assert report.replaced == () and not any(isinstance(m, QuantizedExperts) for m in model.modules())


def test_applied_twice_is_refused(tmp_path: Path) -> None:
    model = _model("mixtral")
    plan = resolve(_recipe(tmp_path, "fp8-channel"), model)
    apply_plan(model, plan)
    with pytest.raises(
        ApplyError, match=r"model\.layers\.0\.mlp\.experts: the experts are quantized already"
    ):
        apply_plan(model, plan)


class _LinearExperts(nn.Module):
    """Experts held as a ModuleList of nn.Linear (older Mixtral style: ``experts.<e>.w1/w2/w3``)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            nn.ModuleDict({"w1": nn.Linear(64, 32, bias=False), "w3": nn.Linear(64, 32, bias=False),
                           "w2": nn.Linear(32, 64, bias=False)})
            for _ in range(3)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.experts[0]
        return e["w2"](nn.functional.silu(e["w1"](x)) * e["w3"](x))


def test_per_expert_linears_go_through_the_linear_path(tmp_path: Path) -> None:
    model = nn.ModuleDict({"mlp": _LinearExperts()}).to(torch.bfloat16)  # names mlp.experts.<e>.w1
    layers = layers_from_module(model)
    assert {layer.kind for layer in layers} == {LayerKind.MOE_EXPERTS} and len(layers) == 9
    plan = resolve(_recipe(tmp_path, "mxfp8-weight-only"), model)
    assert all(e.decision is Decision.QUANTIZE for e in plan.entries)
    report = apply_plan(model, plan)
    assert len(report.replaced) == 9 and report.experts_modules == ()
    assert isinstance(model.mlp.experts[2]["w3"], QuantizedLinear)
    x = torch.randn(5, 64).to(torch.bfloat16)
    assert model.mlp(x).shape == (5, 64)


def test_quantized_experts_state_dict_and_move() -> None:
    from mxrun.engine.schemes import preset_scheme

    source = _model("qwen3_moe").model.layers[0].mlp.experts
    experts = QuantizedExperts.from_module(source, preset_scheme("fp8-block"), "e")
    for param in ("gate_up_proj", "down_proj"):
        experts.load_fused(param, getattr(source, param).data)
    keys = set(experts.state_dict())
    assert keys == {"gate_up_proj", "gate_up_proj_scale", "down_proj", "down_proj_scale"}
    moved = experts.to(torch.float16)
    assert moved.gate_up_proj.dtype == torch.float8_e4m3fn and moved.dtype == torch.float16
    weights = moved.weights("down_proj")
    assert isinstance(weights, ExpertWeights) and weights.scale.shape == (4, 1, 1)


def test_tile_aligned_experts_hold_regrouped_mxfp8() -> None:
    """``tile_aligned: true`` on MXFP8 experts: every expert's stack is MXFP8 with one E8M0 code per 128x128
    tile, holding the values of regrouping the plain MXFP8 expert."""
    from mxrun.engine.schemes import build_scheme, preset_scheme
    from mxrun.kernels.mx_regroup import regroup_mxfp8_reference
    from mxrun.kernels.mxfp8_quantize import dequantize_mxfp8

    source = _model("qwen3_moe").model.layers[0].mlp.experts
    with torch.no_grad():  # rows of different magnitudes share tiles
        source.gate_up_proj.mul_(torch.logspace(-2, 1, source.gate_up_proj.shape[1])[:, None])
    scheme, _ = build_scheme("tiles", {"preset": "mxfp8", "weights": {"tile_aligned": True}})
    aligned = QuantizedExperts.from_module(source, scheme, "e")
    plain = QuantizedExperts.from_module(source, preset_scheme("mxfp8"), "e")
    for experts in (aligned, plain):
        experts.load_fused("gate_up_proj", source.gate_up_proj.data)
    codes, n = aligned.gate_up_proj_scale_e8m0, aligned.gate_up_proj.shape[1]
    assert torch.equal(codes, codes[:, ::128, ::4].repeat_interleave(128, 1)[:, :n].repeat_interleave(4, 2))
    assert not torch.equal(codes, plain.gate_up_proj_scale_e8m0)
    regrouped = regroup_mxfp8_reference(plain.gate_up_proj, plain.gate_up_proj_scale_e8m0)
    tile = regrouped.scale.repeat_interleave(128, 1)[:, :n].repeat_interleave(128, 2)[
        ..., : codes.shape[2] * 32
    ]
    assert torch.equal(dequantize_mxfp8(aligned.gate_up_proj, codes), regrouped.data.float() * tile)


@pytest.mark.parametrize("preset", ["fp8-channel", "mxfp8"])
def test_min_rows_runs_fewer_tokens_weight_only(preset: str) -> None:
    """Experts under ``activations: {min_rows: 5}``: fewer tokens give exactly the weight-only preset's output
    (W8A16), 5 or more exactly the W8A8 preset's."""
    from mxrun.engine.schemes import build_scheme, preset_scheme

    source = _model("qwen3_moe").model.layers[0].mlp.experts
    scheme, _ = build_scheme("decode", {"preset": preset, "activations": {"min_rows": 5}})
    made = {}
    for name, s in (
        ("decode", scheme),
        ("w8a8", preset_scheme(preset)),
        ("wo", preset_scheme(f"{preset}-weight-only")),
    ):
        made[name] = QuantizedExperts.from_module(source, s, "e")
        for param in ("gate_up_proj", "down_proj"):
            made[name].load_fused(param, getattr(source, param).data)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(5, HIDDEN, generator=g).to(torch.bfloat16)
    index = torch.randint(0, 4, (5, 2), generator=g)
    weights = torch.rand(5, 2, generator=g).to(torch.bfloat16)
    run = lambda name, n: made[name](hidden[:n], index[:n], weights[:n])  # noqa: E731
    assert torch.equal(run("decode", 4), run("wo", 4))
    assert not torch.equal(run("decode", 4), run("w8a8", 4))
    assert torch.equal(run("decode", 5), run("w8a8", 5))


@pytest.mark.parametrize("recipe", ["fp8-dynamic", "fp8-channel", "fp8-block", "mxfp8", "mixed-moe"])
def test_builtin_recipes_skip_gpt_oss_routers(recipe: str) -> None:
    """GPT-OSS calls its router ``mlp.router`` (a GptOssTopKRouter, not an nn.Linear, though its weight looks
    like one): every built-in recipe skips it, so applying them never reaches it; its transposed experts are
    reported unsupported and left alone."""
    model = model_zoo.tiny_gpt_oss()
    plan = resolve(load_recipe_or_raise(recipe), model)
    routers = [e for e in plan.entries if e.layer.name.endswith("mlp.router")]
    assert routers and all(e.decision is Decision.SKIPPED for e in routers)
    report = apply_plan(model, plan)  # before the skip, this raised ApplyError at the router
    assert all(not name.endswith("router") for name in report.replaced)
    # the tiny model's 64-wide layers are no multiple of 128: fp8-block leaves them all unsupported
    assert bool(report.replaced) is (recipe != "fp8-block")
