"""How long resolving a recipe into a plan takes, at real scale, and how it grows with layers x rules.

Three measurements, each the best of ``--runs``:

1. a 671B-class checkpoint (DeepSeek-V3-like: 61 layers, 58 MoE x 256 experts x 3 projections, ~45k
   tensors in 160 shards, headers only) resolved with a 40-rule recipe: headers read + plan, target < 1 s;
2. a 100k-layer synthetic checkpoint with the same recipe, target < 2 s;
3. the matching + plan stage alone on in-memory layer lists, over a grid of layer and rule counts, with the
   cost per (layer x rule) so linear growth (or better: RE2 matches all rules in one pass) is visible.

    python benchmarks/bench_plan.py [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_checkpoint import write_synthetic_checkpoint

from mxrun.engine.inventory import layers_from_checkpoint
from mxrun.engine.layers import Layer, LayerKind
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.plan import resolve_layers


def recipe_with_rules(folder: Path, n_rules: int) -> Path:
    """A realistic recipe of ``n_rules`` rules: per-layer-range expert rules, attention, a catch-all."""
    rules = [
        f"  - {{name: experts-{i}, match: 'model\\.layers\\.{i}\\d*\\.mlp\\.experts\\..*', kind: moe_experts, "
        f"scheme: {'mxfp8' if i % 2 else 'fp8-block'}}}"
        for i in range(max(n_rules - 2, 0))
    ]
    rules.append("  - {name: attention, match: '.*\\.self_attn\\.(q|k|v|o)_proj', scheme: fp8-channel}")
    rules.append("  - {name: rest, match: '.*', scheme: fp8-channel}")
    path = folder / f"recipe-{n_rules}.yaml"
    path.write_text(
        "version: 1\nname: bench\ndescription: benchmark recipe\nrules:\n"
        + "\n".join(rules[:n_rules])
        + "\nskip:\n  - lm_head\n  - '.*\\.mlp\\.gate'\n"
    )
    return path


def synthetic_layers(n_layers: int) -> list[Layer]:
    """``n_layers`` Linear layers named like a deep dense model (7 per block)."""
    names = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    return [
        Layer(f"model.layers.{i // 7}.{names[i % 7]}", LayerKind.LINEAR, (4096, 4096), "bfloat16")
        for i in range(n_layers)
    ]


def best_of(runs: int, fn: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    results: dict[str, Any] = {"end_to_end": [], "grid": []}

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        recipe = load_recipe_or_raise(recipe_with_rules(folder, 40))
        cases = [
            ("671B-class, 160 shards", {}, 1.0),
            ("100k-layer dense", dict(n_layers=14286, n_moe_layers=0, hidden=1024, dense_inter=4096), 2.0),
        ]
        print(
            f"{'checkpoint':<24} {'tensors':>8} {'layers':>8} {'rules':>5} {'headers+plan s':>15} {'target s':>9}"
        )
        for label, sizes, target in cases:
            checkpoint = write_synthetic_checkpoint(folder / label.split()[0], **sizes)
            n_tensors = len(
                json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
            )
            n_layers = len(layers_from_checkpoint(checkpoint))
            seconds = best_of(
                args.runs, lambda c=checkpoint: resolve_layers(recipe, layers_from_checkpoint(c))
            )
            print(f"{label:<24} {n_tensors:>8} {n_layers:>8} {40:>5} {seconds:>15.3f} {target:>9.1f}")
            results["end_to_end"].append(
                {
                    "case": label,
                    "tensors": n_tensors,
                    "layers": n_layers,
                    "rules": 40,
                    "seconds": seconds,
                    "target_seconds": target,
                }
            )

        print(f"\n{'layers':>8} {'rules':>5} {'plan s':>8} {'ns per layer':>13} {'ns per layer x rule':>20}")
        for n_layers in (12_500, 25_000, 50_000, 100_000):
            layers = synthetic_layers(n_layers)
            for n_rules in (10, 20, 40, 80):
                grid_recipe = load_recipe_or_raise(recipe_with_rules(folder, n_rules))
                seconds = best_of(args.runs, lambda r=grid_recipe, ls=layers: resolve_layers(r, ls))
                per_layer = seconds / n_layers * 1e9
                print(
                    f"{n_layers:>8} {n_rules:>5} {seconds:>8.3f} {per_layer:>13.0f} {per_layer / n_rules:>20.1f}"
                )
                results["grid"].append({"layers": n_layers, "rules": n_rules, "seconds": seconds})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
