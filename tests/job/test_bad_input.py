"""Bad input to the main job: each case is one line on stderr (``mxrun: error: ...`` naming the file, tensor
or layer), exit status 1, and nothing written (no run folder, no temporary folder beside it).

The checkpoint is the tiny Qwen3-MoE in 7 shards with an index; each test breaks one thing in it. Cases
caught by the headers (missing/truncated shard, wrong index) fail before any weight is read; the others
(non-float, NaN/Inf, a missing tensor) fail while streaming, after the plan was printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file

from mxrun.cli import main
from tests.job.conftest import recipe_file, zoo_checkpoint

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
K_PROJ = "model.layers.1.self_attn.k_proj.weight"
EXPERT = "model.layers.1.mlp.experts.2.up_proj.weight"
NORM = "model.layers.1.post_attention_layernorm.weight"


def _run(tmp_path: Path, folder: Path | str, *extra: str, recipe: str = "fp8-channel") -> Result:
    out = tmp_path / "runs" / "out"
    result = CliRunner().invoke(main, ["--recipe", recipe, "--model", str(folder), "--out", str(out), *extra])
    assert not (tmp_path / "runs").exists(), "a failed run must write nothing"
    return result


def _assert_one_line_error(result: Result, *fragments: str) -> str:
    """The error line; stderr may hold the recipe's own positioned warnings before it, nothing else."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and ": warning: " not in line]
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("mxrun: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def _shard_of(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def _edit_tensor(folder: Path, tensor: str, edit) -> Path:
    """Rewrite the shard holding ``tensor`` with ``edit(tensors)`` applied; returns the shard."""
    shard = _shard_of(folder, tensor)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def test_missing_shard(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    shard = _shard_of(qwen3_moe_dir, K_PROJ)
    shard.unlink()
    _assert_one_line_error(
        _run(tmp_path, qwen3_moe_dir), "model.safetensors.index.json", shard.name, "is missing"
    )


def test_truncated_shard(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    shard = _shard_of(qwen3_moe_dir, K_PROJ)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    _assert_one_line_error(_run(tmp_path, qwen3_moe_dir), str(shard), "truncated")


def test_wrong_index(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    index_file = qwen3_moe_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    other = next(s for s in index["weight_map"].values() if s != index["weight_map"][K_PROJ])
    index["weight_map"][K_PROJ] = other
    index_file.write_text(json.dumps(index))
    _assert_one_line_error(_run(tmp_path, qwen3_moe_dir), str(index_file), K_PROJ, f"listed in {other}")


def test_non_float_weight(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    def to_int8(tensors: dict) -> None:
        tensors[Q_PROJ] = tensors[Q_PROJ].to(torch.int8)

    shard = _edit_tensor(qwen3_moe_dir, Q_PROJ, to_int8)
    _assert_one_line_error(_run(tmp_path, qwen3_moe_dir), str(shard), Q_PROJ, "int8", "floating point")


@pytest.mark.parametrize(("tensor", "value"), [(K_PROJ, float("nan")), (EXPERT, float("inf"))])
def test_non_finite_weight_in_a_planned_layer(
    tmp_path: Path, qwen3_moe_dir: Path, tensor: str, value: float
) -> None:
    def poison(tensors: dict) -> None:
        tensors[tensor][3, 5] = value

    shard = _edit_tensor(qwen3_moe_dir, tensor, poison)
    _assert_one_line_error(_run(tmp_path, qwen3_moe_dir), str(shard), tensor, "1 NaN/Inf", "planned layer")


def test_missing_tensor(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    _edit_tensor(qwen3_moe_dir, NORM, lambda tensors: tensors.pop(NORM))
    index_file = qwen3_moe_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][NORM]
    index_file.write_text(json.dumps(index))
    _assert_one_line_error(_run(tmp_path, qwen3_moe_dir), "no tensor for 1 weight(s)", NORM)


def test_recipe_that_quantizes_nothing(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    recipe = recipe_file(tmp_path, "rules:\n  - {match: 'no_such_layer', scheme: mxfp8}\n")
    result = _run(tmp_path, qwen3_moe_dir, recipe=str(recipe))
    line = _assert_one_line_error(result, "quantizes no layer", str(qwen3_moe_dir))
    assert f"{recipe}:5:13: warning: rule 'rules[0]' matches no layer" in result.stderr
    assert "unmatched: 15" in line


def test_text_without_tokenizer(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("hello")
    _assert_one_line_error(_run(tmp_path, qwen3_moe_dir, "--text", str(text)), "--text", "has no tokenizer")


def test_too_little_memory(tmp_path: Path, qwen3_moe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mxrun.job.loading.host_available_bytes", lambda: 100_000)
    _assert_one_line_error(
        _run(tmp_path, qwen3_moe_dir, "--device", "cpu"), "too little memory on cpu", "0 MiB is free"
    )


def test_out_folder_that_is_not_empty(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(
        main, ["--recipe", "fp8-channel", "--model", str(qwen3_moe_dir), "--out", str(out)]
    )
    _assert_one_line_error(result, str(out), "not an empty folder")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "keep.txt").read_text() == "mine"


def test_base_model_without_lm_head(tmp_path: Path) -> None:
    folder = zoo_checkpoint(tmp_path, "bert")
    _assert_one_line_error(
        _run(tmp_path, folder),
        str(folder),
        "none of its tensors",
        "BertLMHeadModel",
        "'bert' prefix: a base model without its LM head",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    _assert_one_line_error(
        _run(tmp_path, qwen3_moe_dir, "--device", "cuda"), "--device cuda", "no CUDA device"
    )
