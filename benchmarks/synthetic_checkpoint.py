"""Header-only synthetic checkpoints at real scale, and a timing of the checkpoint inventory on them.

A DeepSeek-V3-class checkpoint (671B parameters, ~45k tensors, 160 shards) cannot live on a test machine,
but its inventory only reads safetensors headers. :func:`write_synthetic_checkpoint` writes each shard as a
real header followed by a *sparse* data region (``truncate`` to the size the offsets need): the files are
valid safetensors of the right apparent size (1.3 TB in all) that occupy only their headers on disk (a few
MB), provided the filesystem supports sparse files (ext4, xfs, btrfs, tmpfs do).

Layout (DeepSeek-V3-like with Llama-style attention, per-expert tensor names as on the Hub):
``model.embed_tokens``, then per decoder layer q/k/v/o projections and two norms; the first
``n_layers - n_moe_layers`` layers have a dense ``mlp.{gate,up,down}_proj``, the rest a router
``mlp.gate.weight`` (+ fp32 ``e_score_correction_bias``), one shared expert ``mlp.shared_experts.*`` and
``n_experts`` routed experts ``mlp.experts.<k>.{gate,up,down}_proj.weight``; then ``model.norm``,
``lm_head``.

Run ``python benchmarks/synthetic_checkpoint.py`` to print the inventory times beside their targets.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time
from pathlib import Path

_ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}

INVENTORY_TARGET_S = 0.5
"""The 671B-class inventory must leave room for matching inside a 1 s plan on 2 cores."""


def synthetic_tensors(
    n_layers: int = 61,
    n_moe_layers: int = 58,
    n_experts: int = 256,
    hidden: int = 7168,
    moe_inter: int = 2048,
    dense_inter: int = 18432,
    dtype: str = "BF16",
    vocab: int = 129280,
) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of every tensor of the synthetic model, in model order."""
    kv_dim = hidden // 8  # GQA with 8x fewer k/v heads than q heads
    tensors: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", dtype, (vocab, hidden))]
    n_dense = n_layers - n_moe_layers
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}"
        tensors += [
            (f"{prefix}.input_layernorm.weight", dtype, (hidden,)),
            (f"{prefix}.self_attn.q_proj.weight", dtype, (hidden, hidden)),
            (f"{prefix}.self_attn.k_proj.weight", dtype, (kv_dim, hidden)),
            (f"{prefix}.self_attn.v_proj.weight", dtype, (kv_dim, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", dtype, (hidden, hidden)),
            (f"{prefix}.post_attention_layernorm.weight", dtype, (hidden,)),
        ]
        if layer < n_dense:
            tensors += _mlp_tensors(f"{prefix}.mlp", hidden, dense_inter, dtype)
            continue
        tensors += [
            (f"{prefix}.mlp.gate.weight", dtype, (n_experts, hidden)),
            (f"{prefix}.mlp.gate.e_score_correction_bias", "F32", (n_experts,)),
        ]
        tensors += _mlp_tensors(f"{prefix}.mlp.shared_experts", hidden, moe_inter, dtype)
        for expert in range(n_experts):
            tensors += _mlp_tensors(f"{prefix}.mlp.experts.{expert}", hidden, moe_inter, dtype)
    tensors += [("model.norm.weight", dtype, (hidden,)), ("lm_head.weight", dtype, (vocab, hidden))]
    return tensors


def _mlp_tensors(prefix: str, hidden: int, inter: int, dtype: str) -> list[tuple[str, str, tuple[int, ...]]]:
    return [
        (f"{prefix}.gate_proj.weight", dtype, (inter, hidden)),
        (f"{prefix}.up_proj.weight", dtype, (inter, hidden)),
        (f"{prefix}.down_proj.weight", dtype, (hidden, inter)),
    ]


def write_synthetic_checkpoint(
    dir: str | os.PathLike[str],
    n_layers: int = 61,
    n_moe_layers: int = 58,
    n_experts: int = 256,
    n_shards: int = 160,
    hidden: int = 7168,
    moe_inter: int = 2048,
    dense_inter: int = 18432,
    dtype: str = "BF16",
) -> Path:
    """Write a header-only sharded checkpoint (``config.json``, index, sparse shards) into ``dir``.

    Tensors are cut into ``n_shards`` contiguous runs of roughly equal bytes, as ``save_pretrained`` does
    (fewer files if a tensor is larger than a shard's share). Returns the folder.
    """
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = synthetic_tensors(n_layers, n_moe_layers, n_experts, hidden, moe_inter, dense_inter, dtype)
    sizes = [_nbytes(dtype_code, shape) for _, dtype_code, shape in tensors]
    total_bytes = sum(sizes)

    runs: list[list[int]] = [[] for _ in range(n_shards)]
    bytes_before = 0
    for position, size in enumerate(sizes):
        midpoint = bytes_before + size // 2
        runs[min(n_shards - 1, midpoint * n_shards // max(total_bytes, 1))].append(position)
        bytes_before += size
    runs = [run for run in runs if run]

    weight_map: dict[str, str] = {}
    for shard_number, run in enumerate(runs, start=1):
        shard_name = f"model-{shard_number:05d}-of-{len(runs):05d}.safetensors"
        _write_sparse_shard(folder / shard_name, [tensors[p] for p in run])
        weight_map.update({tensors[p][0]: shard_name for p in run})

    config = {
        "architectures": ["SyntheticForCausalLM"],
        "model_type": "mxrun_synthetic",
        "hidden_size": hidden,
        "intermediate_size": dense_inter,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": n_layers,
        "first_k_dense_replace": n_layers - n_moe_layers,
        "n_routed_experts": n_experts,
        "n_shared_experts": 1,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * _ITEM_BYTES[dtype]


def _write_sparse_shard(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]]) -> None:
    """A valid safetensors file whose data region is a hole of the right length."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8-byte alignment
    with open(path, "wb") as stream:
        stream.write(struct.pack("<Q", len(header_bytes)))
        stream.write(header_bytes)
        stream.truncate(8 + len(header_bytes) + offset)


def _best_of(runs: int, fn):  # type: ignore[no-untyped-def]
    """Smallest wall time of ``runs`` calls (headers sit in the page cache after the first) and the result."""
    best, result = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--runs", type=int, default=5, help="timed repetitions; the best is printed")
    args = parser.parse_args()

    from mxrun.engine.inventory import layers_from_checkpoint

    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        cases = {
            "671B-class (DeepSeek-V3-like, 160 shards)": ({}, INVENTORY_TARGET_S),
            "100k-layer dense (14286 x 7 Linear, 160 shards)": (
                dict(n_layers=14286, n_moe_layers=0, hidden=1024, dense_inter=4096),
                None,
            ),
        }
        for label, (sizes, target_s) in cases.items():
            start = time.perf_counter()
            folder = write_synthetic_checkpoint(Path(scratch) / label.split()[0], **sizes)
            written_s = time.perf_counter() - start
            n_tensors = len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
            seconds, layers = _best_of(args.runs, lambda folder=folder: layers_from_checkpoint(folder))
            anchor = f" (target < {target_s * 1e3:.0f} ms)" if target_s is not None else ""
            print(
                f"{label}: {n_tensors} tensors -> {len(layers)} layers; "
                f"layers_from_checkpoint best of {args.runs}: {seconds * 1e3:.0f} ms{anchor}; "
                f"checkpoint written in {written_s:.1f} s"
            )


if __name__ == "__main__":
    main()
