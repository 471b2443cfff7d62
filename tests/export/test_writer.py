"""Where the writer may write, and what it leaves behind when something fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mxrun.export import writer
from mxrun.export.writer import ExportError

from .conftest import Exported


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mxrun-" in p.name)


def _again(case: Exported, out: Path, **kwargs) -> writer.ExportResult:
    return writer.export_checkpoint(case.model, case.plan, case.recipe, case.source, out, **kwargs)


def test_refuses_the_source_folder_and_folders_holding_it(exported: dict[str, Exported]) -> None:
    case = exported["mxfp8"]
    before = _tree(case.source)
    for target in (case.source, case.source.parent):
        with pytest.raises(ExportError, match="is the source checkpoint folder"):
            _again(case, target, force=True)
    assert _tree(case.source) == before


def test_refuses_a_non_empty_target_without_force_and_replaces_it_with_force(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    case = exported["fp8-channel"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"out: exists and is not empty \(hint: --force"):
        _again(case, out)
    assert _tree(out) == {"keep.txt": b"mine"}

    result = _again(case, out, force=True, max_shard_bytes=300_000)
    assert not (out / "keep.txt").exists()
    assert _tree(out) == _tree(case.out)  # deterministic: the same bytes as the first export
    assert result.out_dir == out and _leftovers(tmp_path) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    _again(case, empty)  # an empty folder is not "non-empty": no --force needed
    assert (empty / "config.json").is_file()


def test_failure_leaves_nothing_behind_and_keeps_what_force_was_replacing(
    exported: dict[str, Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = exported["fp8-block"]
    calls = []
    real_save = writer._save_shard

    def fail_on_second_shard(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (injected)")
        real_save(tensors, path)

    monkeypatch.setattr(writer, "_save_shard", fail_on_second_shard)
    out = tmp_path / "new"
    with pytest.raises(OSError, match="injected"):
        _again(case, out, max_shard_bytes=300_000)
    assert len(calls) == 2  # the first shard was written before the failure
    assert not out.exists() and _leftovers(tmp_path) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    calls.clear()
    with pytest.raises(OSError, match="injected"):
        _again(case, old, force=True, max_shard_bytes=300_000)
    assert _tree(old) == {"config.json": b"{}"} and _leftovers(tmp_path) == []


def test_index_and_shards_are_consistent(exported: dict[str, Exported]) -> None:
    case = exported["mxfp8"]
    index = json.loads((case.out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(case.result.shards)
    sizes = sum((case.out / shard).stat().st_size for shard in case.result.shards)
    assert index["metadata"]["total_size"] == case.result.total_bytes <= sizes
    assert {p.name for p in case.out.iterdir()} == {
        *case.result.shards,
        "model.safetensors.index.json",
        "config.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
