"""Reloading an export never materialises the high-precision weights of its quantized layers."""

from __future__ import annotations

import torch

from mxrun.engine.empty_init import materialize_meta_parameters
from mxrun.engine.methods import QuantizedLinear
from mxrun.engine.moe import QuantizedExperts
from mxrun.export import reload

from .conftest import TOKENS, Exported


def test_reload_allocates_only_the_final_model(exported: dict[str, Exported], monkeypatch) -> None:
    """The skeleton has no parameter storage, and what is allocated afterwards for the unquantized parameters
    is exactly their size: no bf16 copy of any quantized weight exists at any point of the reload."""
    case = exported["mxfp8"]
    allocated: list[int] = []

    def counting(model, device):
        meta = {
            id(p): p for m in model.modules() for p in m._parameters.values() if p is not None and p.is_meta
        }
        allocated.append(sum(p.numel() * p.element_size() for p in meta.values()))
        return materialize_meta_parameters(model, device)

    skeletons: list[torch.nn.Module] = []
    real_skeleton = reload._skeleton

    def recording(folder, dtype):
        model = real_skeleton(folder, dtype)
        skeletons.append(model)
        assert all(p.is_meta for p in model.parameters()), "the skeleton holds real weights"
        return model

    monkeypatch.setattr(reload, "materialize_meta_parameters", counting)
    monkeypatch.setattr(reload, "_skeleton", recording)
    model = reload.load_exported(case.out)
    quantized = [m for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))]
    own = {id(p) for m in quantized for p in m.parameters()}
    unquantized = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in own)
    assert len(skeletons) == 1 and len(allocated) == 1 and quantized
    assert allocated[0] == unquantized  # embeddings, norms, routers, lm_head: nothing else
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, case.model(TOKENS).logits)
