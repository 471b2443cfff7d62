"""Checkpoints of tiny transformers models written to tmp_path, and recipes, for the main-job tests.

The models come from ``tests/engine/model_zoo.py`` (seeded bf16 weights, built from configs, never
downloaded) and are written with ``save_pretrained``: so the files are what transformers 5 itself writes
(per-expert tensors, Mixtral's ``block_sparse_moe.experts.<i>.w1/w2/w3``, no tied ``lm_head``), optionally
sharded with an index.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest
from torch import nn

from tests.engine import model_zoo

pytest.importorskip("transformers")


def write_checkpoint(model: nn.Module, folder: Path, shard_kb: int | None = None) -> Path:
    """``model.save_pretrained(folder)``; ``shard_kb`` splits it into shards of about that size, with an index."""
    kwargs = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def zoo_checkpoint(tmp_path: Path, name: str, shard_kb: int | None = None) -> Path:
    return write_checkpoint(model_zoo.ZOO[name](), tmp_path / name, shard_kb)


def recipe_file(tmp_path: Path, body: str, name: str = "r") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"version: 1\nname: {name}\ndescription: test recipe\n" + dedent(body))
    return path


@pytest.fixture
def qwen3_moe_dir(tmp_path: Path) -> Path:
    """Tiny Qwen3-MoE (dense layer 0, MoE layer 1 with 4 experts), sharded into several files."""
    return zoo_checkpoint(tmp_path, "qwen3_moe", shard_kb=40)
