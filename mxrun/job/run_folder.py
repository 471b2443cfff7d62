"""The run folder: ``report.json``, ``report.md`` and PNG plots, written all at once or not at all.

Everything is written into a temporary folder beside the target and renamed into place, so a run that fails
(or is interrupted) leaves no half-written folder, and a reader never sees one. An existing target is used
only when it is an empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mxrun.job.errors import JobError
from mxrun.job.evaluate import Evaluation

DEFAULT_RUNS_DIR = Path("runs")
LAYER_PLOT = "layer_errors.png"
MAX_PLOTTED_LAYERS = 60


def default_run_dir(recipe_name: str, root: Path = DEFAULT_RUNS_DIR, now: datetime | None = None) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<recipe>/``; a suffix ``-2``, ``-3``... if that exists already."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    candidate = root / f"{stamp}-{recipe_name}"
    suffix = 2
    while candidate.exists():
        candidate = root / f"{stamp}-{recipe_name}-{suffix}"
        suffix += 1
    return candidate


def check_target(out: Path) -> None:
    """Refuse a target that exists and is not an empty folder (before the job spends time on the model)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise JobError(
            f"{out}: exists and is not an empty folder; the run folder is never written over "
            "(hint: another --out)"
        )


def write_run_folder(report: dict[str, Any], evaluation: Evaluation, out: Path) -> Path:
    """Write the run folder at ``out`` atomically and return it; ``report`` gets its ``files`` list."""
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        plots, note = write_plots(evaluation, staging)
        if note:
            report.setdefault("notes", []).append(note)
        report["files"] = ["report.json", "report.md", *plots]
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (staging / "report.md").write_text(render_markdown(report), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------------- plots


def write_plots(evaluation: Evaluation, folder: Path) -> tuple[list[str], str | None]:
    """The per-layer error bar chart; ``([], note)`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    errors = evaluation.layer_errors
    if not errors:
        return [], None
    top = {name for name, _ in evaluation.top_layers()}
    shown = errors[:MAX_PLOTTED_LAYERS]
    title = "relative output error per quantized layer (largest first"
    title += f", {len(shown)} of {len(errors)})" if len(shown) < len(errors) else ")"
    names = [name for name, _ in shown][::-1]
    values = [value for _, value in shown][::-1]
    figure, axes = plt.subplots(figsize=(9, 1.2 + 0.28 * len(shown)))
    axes.barh(names, values, color=["tab:red" if name in top else "tab:blue" for name in names])
    axes.set_xlabel(f"||q - r|| / ||r|| on the reference's inputs ({evaluation.layer_error_tokens} tokens)")
    axes.set_title(title, fontsize=10)
    axes.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(folder / LAYER_PLOT, dpi=110)
    plt.close(figure)
    return [LAYER_PLOT], None


# ------------------------------------------------------------------------------------------------- markdown


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.2f} MiB"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def render_markdown(report: dict[str, Any]) -> str:
    recipe, model, ev, load = report["recipe"], report["model"], report["evaluation"], report["load"]
    ppl, speed, weights = ev["perplexity"], ev["speed"], ev["weight_bytes"]
    cont = ev["continuation"]
    lines = [
        f"# mxrun run: recipe `{recipe['name']}` on `{model['label']}`",
        "",
        f"- recipe fingerprint: `{recipe['fingerprint']}`",
        f"- model: `{model['path']}` ({model['model_type']}, {model['dtype']})",
        f"- device: {report['device']['name']} ({report['device']['type']})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- created: {report['created']}; total time {report['timings']['total_s']:.1f} s",
        f"- plan: {report['plan']['quantized']}/{report['plan']['layers']} layers quantized "
        f"({', '.join(f'{k}: {v}' for k, v in report['plan']['by_scheme'].items())})",
        f"- text: {ev['text']['source']}; {ev['text']['tokens']} tokens in {ev['text']['windows']} window(s) "
        f"of {ev['text']['context']}",
        f"- loaded: {_load_path(report)}",
        "",
        "## Quality",
        "",
        "| metric | reference | quantized |",
        "| --- | ---: | ---: |",
        f"| perplexity | {_num(ppl['reference'], '.4f')} | {_perplexity(ppl)} |",
        f"| top-1 agreement with the reference | | {_num(ev['top1_agreement'], '.2%')} |",
        f"| mean KL(reference \\|\\| quantized), nats | | {_num(ev['mean_kl_nats'], '.3g')} |",
        "",
        f"Greedy continuation ({cont['tokens']} tokens; {_agree(cont)}):",
        "",
        "| | text |",
        "| --- | --- |",
        f"| prompt | {_cell(cont['prompt'])} |",
        f"| reference | {_cell(cont['reference'] if cont['reference'] is not None else NA)} |",
        f"| quantized | {_cell(cont['quantized'])} |",
        "",
        f"## Layers with the largest output error (on {ev['layer_errors']['tokens']} tokens)",
        "",
        "| layer | relative error |",
        "| --- | ---: |",
        *[f"| `{row['layer']}` | {row['relative_error']:.4g} |" for row in ev["layer_errors"]["top"]],
        "",
    ]
    if LAYER_PLOT in report.get("files", []):
        lines += [f"![per-layer error]({LAYER_PLOT})", ""]
    lines += [
        "## Memory and speed",
        "",
        "| | reference | quantized |",
        "| --- | ---: | ---: |",
        f"| weights | {_mib(weights['reference'])} | {_mib(weights['quantized'])}{_weight_ratio(weights)} |",
        f"| prefill tokens/s ({speed['prefill_tokens']} tokens) | "
        f"{_num(speed['prefill_tokens_per_s']['reference'], ',.1f')} | "
        f"{speed['prefill_tokens_per_s']['quantized']:,.1f} |",
        f"| decode tokens/s | {_num(speed['decode_tokens_per_s']['reference'], ',.1f')} | "
        f"{speed['decode_tokens_per_s']['quantized']:,.1f} |",
        "",
        f"{_load_title(load)}: {load['tensors']} tensors, {_mib(load['checkpoint_bytes'])} from "
        f"{load['shards']} shard(s) "
        f"in {load['seconds']:.2f} s. Peak memory of the load: {_peak(load)}.",
        "",
    ]
    if report.get("notes"):
        lines += ["## Notes", "", *[f"- {note}" for note in report["notes"]], ""]
    return "\n".join(lines)


def _peak(load: dict[str, Any], short: bool = False) -> str:
    """The load's peak against the final model, on the memory that holds it: the GPU's on CUDA (the host
    then holds one tensor in flight and the CUDA runtime, which are shown in MiB), else the host's."""
    on_device = load["device_peak_ratio"] is not None
    ratio = load["device_peak_ratio"] if on_device else load["host_peak_ratio"]
    goal = (
        "reload; the goal is for the online load"
        if load.get("path") == "exported"
        else f"goal < {load['goal_ratio']}x"
    )
    text = f"{'device' if on_device else 'host'} {_ratio(ratio)} ({goal})"
    if not short:
        peak = load["device_peak_bytes"] if on_device else load["host_peak_bytes"]
        text += f": {_mib(peak)} for a final model of {_mib(load['model_bytes'])}"
    if on_device:
        text += f"; host +{_mib(load['host_peak_bytes'])}"
    return text


NA = "n/a"
"""What a reference column shows when there is no reference model."""


def _num(value: float | None, spec: str) -> str:
    return NA if value is None else format(value, spec)


def _perplexity(ppl: dict[str, Any]) -> str:
    if ppl["relative_change"] is None:
        return f"{ppl['quantized']:.4f}"
    return f"{ppl['quantized']:.4f} ({ppl['relative_change']:+.2%})"


def _agree(cont: dict[str, Any]) -> str:
    if cont["same_tokens"] is None:
        return "no reference to compare with"
    return f"the first {cont['same_tokens']} agree"


def _weight_ratio(weights: dict[str, Any]) -> str:
    return "" if weights["ratio"] is None else f" ({weights['ratio']:.2f}x)"


def _load_title(load: dict[str, Any]) -> str:
    return "Exported checkpoint reloaded" if load.get("path") == "exported" else "Online load"


def _load_path(report: dict[str, Any]) -> str:
    """Which way the quantized model was loaded, and what it was compared with."""
    model = report["model"]
    if report["load"].get("path") != "exported":
        return "online (the bf16 checkpoint streamed and quantized while loading)"
    exported = model.get("exported") or {}
    reference = model.get("reference")
    against = f"compared with {reference}" if reference else "no reference (reference columns n/a)"
    return (
        f"exported checkpoint ({exported.get('format')}, recipe {exported.get('fingerprint')}), stored codes "
        f"and scales reloaded without requantizing; {against}"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or " "


# -------------------------------------------------------------------------------------------------- console


def print_summary(report: dict[str, Any], folder: Path, console: Console) -> None:
    """The run's headline numbers as a rich table, then where the run folder is."""
    ev, load = report["evaluation"], report["load"]
    ppl, speed, weights = ev["perplexity"], ev["speed"], ev["weight_bytes"]
    table = Table(
        title=f"mxrun: recipe {report['recipe']['name']} on {report['model']['label']} "
        f"({report['device']['type']})",
        title_justify="left",
    )
    table.add_column("metric", no_wrap=True)
    table.add_column("reference", justify="right")
    table.add_column("quantized", justify="right")
    table.add_row("perplexity", _num(ppl["reference"], ".4f"), _perplexity(ppl))
    table.add_row("top-1 agreement", "", _num(ev["top1_agreement"], ".2%"))
    table.add_row("mean KL (nats)", "", _num(ev["mean_kl_nats"], ".3g"))
    cont = ev["continuation"]
    agrees = NA if cont["same_tokens"] is None else f"{cont['same_tokens']}/{cont['tokens']} tokens"
    table.add_row("greedy continuation agrees", "", agrees)
    table.add_row(
        "weights", _mib(weights["reference"]), f"{_mib(weights['quantized'])}{_weight_ratio(weights)}"
    )
    table.add_row(
        f"prefill tokens/s ({speed['prefill_tokens']})",
        _num(speed["prefill_tokens_per_s"]["reference"], ",.1f"),
        f"{speed['prefill_tokens_per_s']['quantized']:,.1f}",
    )
    table.add_row(
        "decode tokens/s",
        _num(speed["decode_tokens_per_s"]["reference"], ",.1f"),
        f"{speed['decode_tokens_per_s']['quantized']:,.1f}",
    )
    peak = _peak(load, short=True)
    table.add_row("load peak / final model", "", peak)
    console.print(table)
    console.print(f"prompt:    {cont['prompt']!r}", soft_wrap=True, markup=False)
    reference_text = NA if cont["reference"] is None else repr(cont["reference"])
    console.print(f"reference: {reference_text}", soft_wrap=True, markup=False)
    console.print(f"quantized: {cont['quantized']!r}", soft_wrap=True, markup=False)
    worst = ev["layer_errors"]["top"][:3]
    if worst:
        console.print(
            "largest layer errors: " + ", ".join(f"{r['layer']} {r['relative_error']:.3g}" for r in worst),
            soft_wrap=True,
            markup=False,
        )
    for note in report.get("notes", []):
        console.print(f"note: {note}", soft_wrap=True, markup=False)
    console.print(f"loaded: {_load_path(report)}", soft_wrap=True, markup=False)
    console.print(f"run folder: {folder}", soft_wrap=True, markup=False)
