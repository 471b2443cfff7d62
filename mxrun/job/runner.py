"""The main job, stage by stage: checkpoint headers -> online quantized load -> reference load -> side-by-side
evaluation -> run folder. Each stage lives in its own module; this one only sequences them and assembles
``report.json``.

Every check that can refuse the input runs before the first weight byte is read (headers, index, the plan,
the target folder, the text, free memory); the loader refuses bad tensors as they arrive. Nothing is written
until the end, and then atomically.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mxrun import __version__
from mxrun.engine.plan import Plan
from mxrun.job.errors import JobError
from mxrun.job.evaluate import DEFAULT_MAX_TOKENS, Evaluation, eval_text, evaluate, evaluate_alone
from mxrun.job.exported import (
    LOAD_PATH_EXPORTED,
    LOAD_PATH_ONLINE,
    ExportedCheckpoint,
    exported_recipe,
    load_exported_model,
    open_exported,
    reference_folder,
)
from mxrun.job.loading import (
    MEMORY_HEADROOM,
    QuantizedModel,
    check_memory,
    estimated_model_bytes,
    load_quantized,
    load_reference,
    model_dtype,
    open_checkpoint,
)
from mxrun.job.run_folder import check_target, default_run_dir, print_summary, write_run_folder

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class JobOptions:
    model_dir: Path
    model_label: str
    """How the model is named in reports (the path given, or the bundled example's name)."""
    text_file: Path | None = None
    device: str = "auto"
    out_dir: Path | None = None
    """The run folder; default ``runs/<timestamp>-<recipe>/`` in the working directory."""
    max_tokens: int = DEFAULT_MAX_TOKENS
    progress: bool = True
    """A progress bar over bytes while loading, on stderr when that is a terminal."""
    reference_dir: Path | None = None
    """For an exported checkpoint: the unquantized checkpoint to compare with (default: the source the
    export records, when it is still there)."""


@dataclass(frozen=True)
class JobResult:
    folder: Path
    report: dict[str, Any]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU is an error, not a silent fallback."""
    if name not in DEVICES:
        raise JobError(f"--device {name}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise JobError(
            "--device cuda: no CUDA device is available to this torch "
            f"({torch.__version__}); use --device cpu"
        )
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def versions() -> dict[str, str | None]:
    import transformers

    try:
        triton: str | None = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {
        "mxrun": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton,
        "python": platform.python_version(),
    }


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        }
    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine() or "cpu",
        "threads": torch.get_num_threads(),
    }


def run_job(plan: Plan, options: JobOptions, console: Console | None = None) -> JobResult:
    """Run the main job for ``plan`` (resolved against ``options.model_dir``) and write its run folder.

    A folder that ``mxrun export`` wrote is reloaded as stored instead of streamed and quantized
    (:mod:`mxrun.job.exported`); ``report["load"]["path"]`` says which way the model was loaded."""
    console = console or _stdout_console()
    started = time.perf_counter()
    device = resolve_device(options.device)
    out = options.out_dir or default_run_dir(plan.recipe.name)
    check_target(out)
    exported = open_exported(options.model_dir)
    if exported is not None:
        return _run_exported(plan, options, exported, device, out, console, started)
    checkpoint = open_checkpoint(options.model_dir)
    dtype = model_dtype(plan)
    reference_bytes, quantized_bytes = estimated_model_bytes(checkpoint, plan, dtype)
    check_memory(
        int(quantized_bytes * MEMORY_HEADROOM) + reference_bytes,
        device,
        "the quantized model being loaded and the reference it is compared with",
    )
    vocab = _vocab_size(checkpoint.config)
    text = eval_text(checkpoint.folder, vocab, options.text_file, options.max_tokens)

    quantized = load_quantized(checkpoint, plan, device, progress=options.progress)
    loaded_at = time.perf_counter()
    reference = load_reference(checkpoint, quantized.dtype, device)
    evaluation = evaluate(reference, quantized.model, plan, quantized.report, text, device)
    evaluated_at = time.perf_counter()
    del reference

    report = build_report(plan, options, device, quantized, evaluation)
    report["load"]["path"] = LOAD_PATH_ONLINE
    return _finish(report, evaluation, out, console, started, quantized, loaded_at, evaluated_at)


def _run_exported(
    plan: Plan,
    options: JobOptions,
    exported: ExportedCheckpoint,
    device: torch.device,
    out: Path,
    console: Console,
    started: float,
) -> JobResult:
    """The job on an exported checkpoint: reload it as stored, compare with its source (or the given
    reference) when there is one, else report the quantized model alone."""
    if exported.fingerprint is not None and plan.recipe.fingerprint != exported.fingerprint:
        exported_recipe(exported, plan.recipe)  # raises the one-line fingerprint error
    checkpoint = open_checkpoint(exported.folder)
    reference_dir, reference_note = reference_folder(exported, options.reference_dir)
    reference_checkpoint = open_checkpoint(reference_dir) if reference_dir is not None else None
    reference_bytes = 0
    if reference_checkpoint is not None:
        reference_bytes, _ = estimated_model_bytes(reference_checkpoint, plan, model_dtype(plan))
    check_memory(
        int(checkpoint.total_bytes * MEMORY_HEADROOM) + reference_bytes,
        device,
        "the exported model and the reference it is compared with",
    )
    vocab = _vocab_size(checkpoint.config)
    text = eval_text(checkpoint.folder, vocab, options.text_file, options.max_tokens)

    quantized = load_exported_model(exported, checkpoint, plan, device)
    loaded_at = time.perf_counter()
    if reference_checkpoint is not None:
        reference = load_reference(reference_checkpoint, quantized.dtype, device)
        evaluation = evaluate(reference, quantized.model, plan, quantized.report, text, device)
        del reference
    else:
        evaluation = evaluate_alone(quantized.model, text, device)
    evaluated_at = time.perf_counter()

    report = build_report(plan, options, device, quantized, evaluation)
    report["load"]["path"] = LOAD_PATH_EXPORTED
    report["model"]["exported"] = {
        "format": exported.quantization_config.get("format"),
        "fingerprint": exported.fingerprint,
        "source": str(exported.source) if exported.source is not None else None,
    }
    report["model"]["reference"] = str(reference_dir) if reference_dir is not None else None
    if reference_note:
        report["notes"].append(reference_note)
    return _finish(report, evaluation, out, console, started, quantized, loaded_at, evaluated_at)


def _finish(
    report: dict[str, Any],
    evaluation: Evaluation,
    out: Path,
    console: Console,
    started: float,
    quantized: QuantizedModel,
    loaded_at: float,
    evaluated_at: float,
) -> JobResult:
    report["timings"] = {
        "load_s": round(quantized.stats.seconds, 3),
        "evaluate_s": round(evaluated_at - loaded_at, 3),
        "total_s": round(time.perf_counter() - started, 3),
    }
    folder = write_run_folder(report, evaluation, out)
    report["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    print_summary(report, folder, console)
    return JobResult(folder, report)


def _stdout_console() -> Console:
    """As the plan's table: no folding of layer names when stdout is a file or a CI log."""
    console = Console(soft_wrap=False)
    if not console.is_terminal:
        console.width = 200
    return console


def _vocab_size(config: dict[str, Any]) -> int:
    for candidate in (config, config.get("text_config") or {}):
        value = candidate.get("vocab_size")
        if isinstance(value, int) and value > 0:
            return value
    raise JobError("config.json has no vocab_size; the main job evaluates a causal LM")


def build_report(
    plan: Plan, options: JobOptions, device: torch.device, quantized: QuantizedModel, evaluation: Evaluation
) -> dict[str, Any]:
    apply_report = quantized.report
    config = quantized.model.config
    return {
        "format": "mxrun-run/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "recipe": plan.recipe.to_json(),  # name, fingerprint, files, the resolved recipe
        "model": {
            "label": options.model_label,
            "path": str(options.model_dir),
            "model_type": getattr(config, "model_type", None),
            "dtype": str(quantized.dtype).removeprefix("torch."),
            "architectures": list(getattr(config, "architectures", None) or []),
        },
        "versions": versions(),
        "device": device_info(device),
        "plan": plan.summary(),
        "quantized_layers": {
            "count": len(apply_report.replaced),
            "by_scheme": dict(apply_report.by_scheme),
            "left_unquantized": [{"layer": name, "reason": why} for name, why in apply_report.not_supported],
        },
        "load": quantized.stats.to_json(),
        "evaluation": evaluation.to_json(),
        "notes": [*quantized.notes, *evaluation.notes],
    }
