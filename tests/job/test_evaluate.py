"""The evaluation's measures against direct computations: perplexity against transformers' own loss, the
per-layer probe against a layer with a known error, and the windowing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mxrun.job.evaluate import layer_error_probe, perplexity, sequence_nll, windows
from tests.engine import model_zoo

CPU = torch.device("cpu")


def test_windows_cover_the_text_and_drop_a_lone_last_token() -> None:
    ids = torch.arange(45)
    assert [w.numel() for w in windows(ids, 20)] == [20, 20, 5]
    assert [w.numel() for w in windows(torch.arange(41), 20)] == [20, 20]  # a 1-token window predicts nothing
    assert torch.equal(torch.cat(windows(ids, 20)), ids)


def test_perplexity_equals_transformers_loss_over_windows() -> None:
    model = model_zoo.tiny_llama()
    ids = torch.randint(0, model_zoo.VOCAB, (55,), generator=torch.Generator().manual_seed(3))
    nll = count = 0.0
    with torch.no_grad():
        for window in (ids[:20], ids[20:40], ids[40:]):
            loss = model(window[None], labels=window[None]).loss  # mean over the window's len - 1 predictions
            nll += float(loss) * (window.numel() - 1)
            count += window.numel() - 1
    assert perplexity(model, ids, 20, CPU) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_sequence_nll_by_hand() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    ids = torch.tensor([2, 0, 1])
    by_hand = -(torch.log_softmax(logits[0], -1)[0] + torch.log_softmax(logits[1], -1)[1])
    assert float(sequence_nll(logits, ids)) == pytest.approx(float(by_hand))


def test_layer_probe_measures_each_layers_own_error() -> None:
    reference = model_zoo.tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    twin = copy.deepcopy(reference.get_submodule(name))
    with torch.no_grad():
        twin.weight.mul_(1.25)  # output scales by exactly 1.25 (power-of-two mantissa change): error 0.25
    same = reference.get_submodule("model.layers.1.self_attn.q_proj")
    pairs = [(name, reference.get_submodule(name), twin), ("same", same, copy.deepcopy(same))]
    with layer_error_probe(pairs) as errors, torch.no_grad():
        reference(torch.randint(0, model_zoo.VOCAB, (1, 9)))
    assert errors[name].relative == pytest.approx(0.25, rel=1e-3)
    assert errors["same"].relative == 0.0 and errors["same"].reference_sq > 0
    assert not reference.get_submodule(name)._forward_hooks, "hooks are removed afterwards"
