"""Output error of every quantized Linear preset against the bf16 layer it replaces, on well-behaved and on
heavy-tailed data, beside the error the tests allow.

For each preset (``mxrun.engine.schemes.PRESETS``), weight shape and kind of data, a bf16 ``nn.Linear`` is
quantized through the same ``QuantizedLinear`` a plan applies (Triton kernels on CUDA, the plain-torch
reference on CPU) and its output compared with the exact product of the bf16 input and weight (fp64):

* ``rel_err``: relative Frobenius error ``||y_q - y|| / ||y||``, and ``sqnr_db = -20 log10(rel_err)``;
* ``max_err``: the largest element error over the largest ``|y|``;
* ``bound``: the statistical bound ``tests/engine/test_methods.py`` asserts and derives (each E4M3 rounding at
  most ``u = 2^-4`` relative, zero-mean, ``E[e^2] <= u^2 / 3``: ``1.3 sqrt(q u^2 / 3)`` with ``q`` = 2
  quantized operands for W8A8, 1 for weight-only, plus the bf16 output rounding ``2^-8``).

The bf16 layer itself (``torch.matmul``, bf16 output) is the first row: its only error is that rounding.

Data (seeded): ``normal`` activations N(0, 1) and weights N(0, 0.02^2); ``outliers``: the same with 1% of
the input channels 100x larger, as the outlier features of LLM activations; ``student-t``: activations and
weights from Student's t with 3 degrees of freedom (heavy tails in both).

    PYTHONPATH=. python3 benchmarks/linear_accuracy.py --device cuda --json acc.json --markdown acc.md --plot acc.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from mxrun.engine.methods import QuantizedLinear, method_for
from mxrun.engine.schemes import PRESETS, preset_scheme

U = 2.0**-4  # half an E4M3 ulp, relative
SHAPES = {"8B o 4096->4096": (4096, 4096), "8B down 14336->4096": (14336, 4096)}  # name: (K, N)
KINDS = ("normal", "outliers", "student-t")


def _student_t3(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Student's t with 3 degrees of freedom from ``g`` alone: a normal over the root of a chi-square(3) / 3."""
    chi_square = torch.randn((3, *shape), generator=g).square().sum(0)
    return torch.randn(shape, generator=g) / (chi_square / 3).sqrt()


def make_data(kind: str, m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 activations ``[m, k]`` and weight ``[n, k]`` of one kind (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "student-t":
        x, w = _student_t3((m, k), g), _student_t3((n, k), g) * 0.02
    else:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.02
        if kind == "outliers":
            channels = torch.randperm(k, generator=g)[: max(4, k // 100)]
            x[:, channels] *= 100.0
    return x.to(torch.bfloat16), w.to(torch.bfloat16)


def statistical_bound(scheme_name: str) -> float:
    """The relative Frobenius bound the tests assert for this preset (see the module docstring)."""
    operands = 1 if preset_scheme(scheme_name).weight_only else 2
    return 1.3 * math.sqrt(operands * U**2 / 3) + 2.0**-8


def _errors(out: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    diff = out.double() - exact
    rel = (diff.norm() / exact.norm()).item()
    return {
        "rel_err": rel,
        "sqnr_db": -20 * math.log10(rel) if rel > 0 else math.inf,
        "max_err": (diff.abs().max() / exact.abs().max()).item(),
    }


def layers(weight: torch.Tensor, device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """bf16 and every preset's quantized layer for ``weight``, each a callable of the activations."""
    n, k = weight.shape
    linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"bf16": linear}
    for name in sorted(PRESETS):
        layer = QuantizedLinear.from_linear(linear, method_for(preset_scheme(name)), layer_name=name)
        layer.load_weight(linear.weight.data)
        calls[name] = layer
    return calls


def run(device: torch.device, ms: list[int]) -> list[dict]:
    """Every (shape, kind of data, M, layer): the errors of :func:`_errors` and the bound."""
    rows = []
    for shape, (k, n) in SHAPES.items():
        for kind in KINDS:
            x, w = make_data(kind, max(ms), k, n, seed=KINDS.index(kind))
            calls = layers(w.to(device), device)
            for m in ms:
                exact = x[:m].double() @ w.double().T
                x_dev = x[:m].to(device)
                for name, layer in calls.items():
                    with torch.no_grad():
                        out = layer(x_dev).cpu()
                    bound = 2.0**-8 if name == "bf16" else statistical_bound(name)
                    row = {"shape": shape, "M": m, "kind": kind, "scheme": name, "bound": bound}
                    row.update(_errors(out, exact))
                    rows.append(row)
                    print(
                        f"{shape:22s} M={m:5d} {kind:10s} {name:24s} rel {row['rel_err']:.2e} "
                        f"({row['sqnr_db']:.1f} dB)  max {row['max_err']:.2e}  bound {bound:.2e}",
                        flush=True,
                    )
    return rows


def _table(rows: list[dict]) -> list[str]:
    """Schemes down, kinds of data across: the largest relative error of ``rows`` (SQNR), and the bound."""
    lines = ["| scheme | " + " | ".join(KINDS) + " | bound |", "| --- |" + " ---: |" * (len(KINDS) + 1)]
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        worst = {k: max((r for r in rows if (r["scheme"], r["kind"]) == (scheme, k)), key=lambda r: r["rel_err"])
                 for k in KINDS}  # fmt: skip
        cells = " | ".join(f"{worst[k]['rel_err']:.2e} ({worst[k]['sqnr_db']:.1f} dB)" for k in KINDS)
        lines.append(f"| {scheme} | {cells} | {worst[KINDS[0]]['bound']:.2e} |")
    return lines


def markdown(rows: list[dict], device: str, command: str) -> str:
    """The worst case over shapes and M first, then one table per shape and M."""
    lines = [f"Device: {device}. `{command}`", "",
             "Relative Frobenius error of the output against the exact product of the bf16 operands (SQNR in "
             "dB), and the bound the tests assert. Worst over every shape and M:", ""]  # fmt: skip
    lines += [*_table(rows), ""]
    for shape, m in dict.fromkeys((r["shape"], r["M"]) for r in rows):
        lines += [
            f"**{shape}, M = {m}**",
            "",
            *_table([r for r in rows if (r["shape"], r["M"]) == (shape, m)]),
        ]
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    """Grouped bars of SQNR per scheme and kind of data, one panel per shape, at the largest M."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    largest = max(r["M"] for r in rows)
    rows = [r for r in rows if r["M"] == largest]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.5), squeeze=False)
    width = 0.8 / len(KINDS)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for i, kind in enumerate(KINDS):
            values = [next(r["sqnr_db"] for r in rows if (r["shape"], r["scheme"], r["kind"]) == (shape, s, kind))
                      for s in schemes]  # fmt: skip
            ax.bar([j + i * width for j in range(len(schemes))], values, width, label=kind)
        ax.set_xticks([j + width for j in range(len(schemes))], schemes, rotation=45, ha="right")
        ax.set_ylabel("SQNR against the exact product (dB)")
        ax.set_title(f"{shape}, M = {rows[0]['M']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ms", type=int, nargs="+", default=[16, 1024], help="rows of activations")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = run(device, args.ms)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (plain-torch reference)"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(
                markdown(rows, name, "benchmarks/linear_accuracy.py " + " ".join(argv or sys.argv[1:])) + "\n"
            )
    if args.plot:
        plot(rows, args.plot)
    over = [r for r in rows if r["rel_err"] > r["bound"]]
    for r in over:
        print(f"OVER THE BOUND: {r['shape']} {r['kind']} {r['scheme']}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
