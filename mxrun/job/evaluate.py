"""The reference (unquantized) and the quantized model side by side, on the same tokens.

- Perplexity of each on a text: the model folder's tokenizer on the held-out sample that ships with mxrun
  (or ``--text FILE``), at most ``max_tokens`` tokens, cut into windows of the model's context
  (``max_position_embeddings``). Each window is scored on its own: the first token of a window has no
  context and is not scored, so a text of T tokens in W windows scores T - W predictions; both models score
  exactly the same ones. A folder without a tokenizer (the random-weight ``tiny-moe``) gets seeded random
  token ids from the config's vocabulary instead, and the report says so: its perplexities are near the
  vocabulary size and only the gap between the two models means anything.
- Top-1 agreement: the share of positions where both models predict the same next token; and the mean
  KL divergence KL(reference || quantized) of the next-token distributions, in nats.
- Greedy continuation of a prompt (the text's first tokens) by both, shown side by side.
- Per-layer error: forward hooks on the reference's planned layers feed each layer's input to the
  quantized layer of the same name and compare outputs, ``||q - r|| / ||r||`` (Frobenius, over the first
  window's tokens). So each layer's own error is measured, not the error it inherits from earlier layers.
- Weight memory of each model, and prefill and decode tokens/s on the device. On CPU the quantized layers
  run the plain-torch reference path (dequantize, then a bf16/fp32 matmul), which is slower than bf16: the
  speed goals are for CUDA, where the Triton kernels run.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mxrun import resources
from mxrun.engine.apply import ApplyReport
from mxrun.engine.plan import Plan
from mxrun.job.errors import JobError
from mxrun.job.loading import model_bytes

DEFAULT_MAX_TOKENS = 8192
"""Tokens of text evaluated by default: all of the built-in held-out sample (6,355 tokens with the default
model's tokenizer), about 3 s for the default model on 2 CPU cores."""
PROMPT_TOKENS = 16
CONTINUATION_TOKENS = 24
PREFILL_TOKENS = 256
TOP_LAYERS = 10
RANDOM_TEXT_SEED = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
MAX_TEXT_CHARS_PER_TOKEN = 32
"""Only the start of a long ``--text`` is tokenised: ``max_tokens`` tokens never need more characters."""


# ------------------------------------------------------------------------------------------------ text


@dataclass(frozen=True)
class EvalText:
    ids: torch.Tensor
    """Token ids ``[T]`` (int64, CPU)."""
    source: str
    """Where they came from, for the report (a file, or the random fallback)."""
    synthetic: bool
    """True when the ids are random (no tokenizer): perplexities are then not language quality."""
    tokenizer: Any | None = None

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids)


def builtin_text() -> Path | None:
    """The held-out sample text that ships with mxrun (``examples/texts/*heldout*.txt``), if present."""
    folder = resources.example_model_dir().parent / "texts"
    candidates = sorted(folder.glob("*heldout*.txt")) or sorted(folder.glob("*.txt"))
    return candidates[0] if candidates else None


def load_tokenizer(folder: Path) -> Any | None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise JobError(f"{folder}: its tokenizer cannot be loaded: {exc}".splitlines()[0]) from None


def eval_text(folder: Path, vocab_size: int, text_file: Path | None, max_tokens: int) -> EvalText:
    """The token ids to evaluate on (see the module docstring); raises :class:`JobError` for a text that
    cannot be read or tokenised."""
    if max_tokens < 2:
        raise JobError(f"--max-tokens {max_tokens}: at least 2 tokens are needed to score a prediction")
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        if text_file is not None:
            raise JobError(
                f"--text {text_file}: {folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}), so "
                "no text can be tokenised for it"
            )
        generator = torch.Generator().manual_seed(RANDOM_TEXT_SEED)
        ids = torch.randint(0, vocab_size, (max_tokens,), generator=generator)
        source = (
            f"{max_tokens} random token ids from the vocabulary of {vocab_size} (seed {RANDOM_TEXT_SEED}): "
            f"{folder.name} has no tokenizer"
        )
        return EvalText(ids, source, True)
    path = text_file or builtin_text()
    if path is None:
        raise JobError(
            "no text to evaluate on: the built-in sample is missing from this installation "
            "(hint: --text FILE)"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(max_tokens * MAX_TEXT_CHARS_PER_TOKEN)
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: cannot read the text: {exc}") from None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens], dtype=torch.long)
    if ids.numel() < 2:
        raise JobError(f"{path}: the text gives {ids.numel()} token(s); at least 2 are needed")
    if int(ids.max()) >= vocab_size:
        raise JobError(
            f"{path}: the tokenizer of {folder} gives ids beyond the model's vocabulary "
            f"({int(ids.max())} >= {vocab_size})"
        )
    return EvalText(ids, str(path), False, tokenizer)


def windows(ids: torch.Tensor, context: int) -> list[torch.Tensor]:
    """``ids`` cut into consecutive windows of ``context`` tokens; a last window of one token is dropped
    (it has nothing to predict)."""
    pieces = list(ids.split(context))
    return [piece for piece in pieces if piece.numel() >= 2]


# --------------------------------------------------------------------------------------------- metrics


def sequence_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood (nats) of ``ids[1:]`` under ``logits[:-1]`` (``[L, V]``, ``[L]``)."""
    log_probs = F.log_softmax(logits[:-1].float(), dim=-1)
    return -log_probs.gather(-1, ids[1:, None]).sum()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def perplexity(model: nn.Module, ids: torch.Tensor, context: int, device: torch.device) -> float:
    """Perplexity of ``model`` on ``ids`` scored window by window (the module docstring says how)."""
    nll, count = 0.0, 0
    for window in windows(ids, context):
        window = window.to(device)
        nll += float(sequence_nll(_logits(model, window), window))
        count += window.numel() - 1
    return math.exp(nll / count)


@dataclass
class _LayerError:
    error_sq: float = 0.0
    reference_sq: float = 0.0

    @property
    def relative(self) -> float:
        return math.sqrt(self.error_sq / self.reference_sq) if self.reference_sq > 0 else 0.0


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"a layer output of type {type(value).__name__}")


@contextmanager
def layer_error_probe(pairs: list[tuple[str, nn.Module, nn.Module]]) -> Iterator[dict[str, _LayerError]]:
    """While active, every forward of a reference layer also runs its quantized twin on the same input and
    adds up the squared error and the squared reference output, per layer name."""
    errors = {name: _LayerError() for name, _, _ in pairs}

    def hook_for(name: str, quantized: nn.Module) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            with torch.no_grad():
                reference = _first_tensor(output).float()
                mine = _first_tensor(quantized(*args, **kwargs)).float()
            errors[name].error_sq += float((mine - reference).pow(2).sum())
            errors[name].reference_sq += float(reference.pow(2).sum())

        return hook

    handles = [ref.register_forward_hook(hook_for(name, q), with_kwargs=True) for name, ref, q in pairs]
    try:
        yield errors
    finally:
        for handle in handles:
            handle.remove()


def layer_pairs(
    reference: nn.Module, quantized: nn.Module, plan: Plan, report: ApplyReport
) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, reference module, quantized module)`` for each planned layer that was quantized. A planned
    layer that is a parameter (fused experts, ``...experts.gate_up_proj``) is probed through the module that
    owns it (``...experts``)."""
    left_out = {name for name, _ in report.not_supported}
    names: dict[str, None] = {}
    for entry in plan.quantized():
        if entry.layer.name in left_out:
            continue
        name = entry.layer.name
        try:
            quantized.get_submodule(name)
        except AttributeError:
            name = name.rpartition(".")[0]
        names[name] = None
    return [(name, reference.get_submodule(name), quantized.get_submodule(name)) for name in names]


# ------------------------------------------------------------------------------------------------ speed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_argument(model: nn.Module) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` from transformers 5.2x, ``past_key_values`` before
    (outputs name the cache the same way)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device
) -> tuple[list[int], float]:
    """Greedy continuation of ``prompt`` ``[P]`` with the KV cache; returns the new ids and decode tokens/s
    (every step after the prefill, one token each)."""
    cache_argument = _cache_argument(model)
    with torch.no_grad():
        out = model(prompt[None].to(device), use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        produced = [token]
        _sync(device)
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, use_cache=True, **{cache_argument: out[cache_argument]})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            produced.append(token)
        _sync(device)
        seconds = time.perf_counter() - started
    ids = torch.cat(produced, dim=1)[0].tolist()
    return ids, (new_tokens - 1) / seconds if seconds > 0 else float("nan")


def prefill_tokens_per_second(
    model: nn.Module, ids: torch.Tensor, device: torch.device, min_seconds: float = 0.3, min_repeats: int = 3
) -> float:
    """Median tokens/s of a forward over ``ids`` ``[P]`` (batch 1), after one warm-up run."""
    batch = ids[None].to(device)
    times = []
    with torch.no_grad():
        model(batch)
        total = 0.0
        while len(times) < min_repeats or total < min_seconds:
            _sync(device)
            started = time.perf_counter()
            model(batch)
            _sync(device)
            times.append(time.perf_counter() - started)
            total += times[-1]
            if len(times) >= 50:
                break
    return ids.numel() / statistics.median(times)


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Continuation:
    prompt: str
    reference: str | None
    """None when there is no reference model (an exported checkpoint without its source)."""
    quantized: str
    same_tokens: int | None
    """How many of the generated tokens agree before the first difference (None: no reference)."""
    tokens: int


@dataclass(frozen=True)
class Evaluation:
    """Both models' numbers; every reference field (and those comparing with it) is None when the quantized
    model was evaluated alone (:func:`evaluate_alone`)."""

    text_source: str
    synthetic_text: bool
    tokens: int
    context: int
    windows: int
    perplexity_reference: float | None
    perplexity_quantized: float
    top1_agreement: float | None
    mean_kl: float | None
    continuation: Continuation
    layer_errors: list[tuple[str, float]]
    """Every probed layer's relative output error, largest first (empty without a reference)."""
    layer_error_tokens: int
    weight_bytes_reference: int | None
    weight_bytes_quantized: int
    prefill_tokens: int
    prefill_tps_reference: float | None
    prefill_tps_quantized: float
    decode_tps_reference: float | None
    decode_tps_quantized: float
    notes: list[str] = field(default_factory=list)

    def top_layers(self, n: int = TOP_LAYERS) -> list[tuple[str, float]]:
        return self.layer_errors[:n]

    def to_json(self, top: int = TOP_LAYERS) -> dict[str, Any]:
        return {
            "text": {
                "source": self.text_source,
                "synthetic": self.synthetic_text,
                "tokens": self.tokens,
                "context": self.context,
                "windows": self.windows,
            },
            "reference_available": self.perplexity_reference is not None,
            "perplexity": {
                "reference": _rounded(self.perplexity_reference, 4),
                "quantized": round(self.perplexity_quantized, 4),
                "relative_change": None
                if self.perplexity_reference is None
                else round(self.perplexity_quantized / self.perplexity_reference - 1, 6),
            },
            "top1_agreement": _rounded(self.top1_agreement, 6),
            "mean_kl_nats": _rounded(self.mean_kl, 8),
            "continuation": {
                "prompt": self.continuation.prompt,
                "reference": self.continuation.reference,
                "quantized": self.continuation.quantized,
                "same_tokens": self.continuation.same_tokens,
                "tokens": self.continuation.tokens,
            },
            "layer_errors": {
                "tokens": self.layer_error_tokens,
                "top": [
                    {"layer": name, "relative_error": round(err, 6)} for name, err in self.top_layers(top)
                ],
                "all": [{"layer": name, "relative_error": round(err, 6)} for name, err in self.layer_errors],
            },
            "weight_bytes": {
                "reference": self.weight_bytes_reference,
                "quantized": self.weight_bytes_quantized,
                "ratio": None
                if self.weight_bytes_reference is None
                else round(self.weight_bytes_quantized / self.weight_bytes_reference, 4),
            },
            "speed": {
                "prefill_tokens": self.prefill_tokens,
                "prefill_tokens_per_s": {
                    "reference": _rounded(self.prefill_tps_reference, 1),
                    "quantized": round(self.prefill_tps_quantized, 1),
                },
                "decode_tokens_per_s": {
                    "reference": _rounded(self.decode_tps_reference, 1),
                    "quantized": round(self.decode_tps_quantized, 1),
                },
            },
            "notes": list(self.notes),
        }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def context_length(config: Any, max_tokens: int) -> int:
    """Window length: the model's context (``max_position_embeddings``), at most ``max_tokens``."""
    context = getattr(config, "max_position_embeddings", None) or max_tokens
    return max(2, min(int(context), max_tokens))


_CPU_NOTE = (
    "CPU: quantized layers run the plain-torch reference path (dequantize + matmul), slower than bf16; the "
    "speed goals are for CUDA, where the Triton kernels run"
)


def _prompt_and_length(text: EvalText, context: int) -> tuple[torch.Tensor, int]:
    """The greedy-continuation prompt and how many tokens to generate, staying inside the context."""
    prompt = text.ids[: min(PROMPT_TOKENS, context // 2, text.ids.numel())]
    return prompt, max(2, min(CONTINUATION_TOKENS, context - prompt.numel()))


def evaluate(
    reference: nn.Module,
    quantized: nn.Module,
    plan: Plan,
    report: ApplyReport,
    text: EvalText,
    device: torch.device,
) -> Evaluation:
    """Everything in the module docstring, on ``text``; both models must be on ``device`` already."""
    context = context_length(reference.config, text.ids.numel())
    pieces = windows(text.ids, context)
    pairs = layer_pairs(reference, quantized, plan, report)
    nll_ref = nll_q = kl = 0.0
    agree = positions = scored = 0
    errors: dict[str, _LayerError] = {}
    for index, window in enumerate(pieces):
        window = window.to(device)
        if index == 0:
            with layer_error_probe(pairs) as errors:
                logits_ref = _logits(reference, window)
        else:
            logits_ref = _logits(reference, window)
        logits_q = _logits(quantized, window)
        nll_ref += float(sequence_nll(logits_ref, window))
        nll_q += float(sequence_nll(logits_q, window))
        log_ref, log_q = F.log_softmax(logits_ref, -1), F.log_softmax(logits_q, -1)
        kl += float((log_ref.exp() * (log_ref - log_q)).sum())
        agree += int((logits_ref.argmax(-1) == logits_q.argmax(-1)).sum())
        positions += window.numel()
        scored += window.numel() - 1

    prompt, new_tokens = _prompt_and_length(text, context)
    for model in (reference, quantized):  # kernels compile (CUDA) and caches warm on a short run first
        greedy(model, prompt, 3, device)
    ids_ref, decode_ref = greedy(reference, prompt, new_tokens, device)
    ids_q, decode_q = greedy(quantized, prompt, new_tokens, device)
    same = next((i for i, (a, b) in enumerate(zip(ids_ref, ids_q, strict=True)) if a != b), len(ids_ref))
    continuation = Continuation(
        text.decode(prompt.tolist()), text.decode(ids_ref), text.decode(ids_q), same, new_tokens
    )

    prefill_ids = text.ids[: min(PREFILL_TOKENS, context)]
    notes = []
    if text.synthetic:
        notes.append(
            "random token ids (no tokenizer): perplexities are near the vocabulary size and say "
            "nothing about language; only the reference-vs-quantized gap is meaningful"
        )
    if device.type == "cpu":
        notes.append(_CPU_NOTE)
    ranked = sorted(((name, error.relative) for name, error in errors.items()), key=lambda item: -item[1])
    return Evaluation(
        text_source=text.source,
        synthetic_text=text.synthetic,
        tokens=text.ids.numel(),
        context=context,
        windows=len(pieces),
        perplexity_reference=math.exp(nll_ref / scored),
        perplexity_quantized=math.exp(nll_q / scored),
        top1_agreement=agree / positions,
        mean_kl=kl / positions,
        continuation=continuation,
        layer_errors=ranked,
        layer_error_tokens=pieces[0].numel() if pieces else 0,
        weight_bytes_reference=model_bytes(reference),
        weight_bytes_quantized=model_bytes(quantized),
        prefill_tokens=prefill_ids.numel(),
        prefill_tps_reference=prefill_tokens_per_second(reference, prefill_ids, device),
        prefill_tps_quantized=prefill_tokens_per_second(quantized, prefill_ids, device),
        decode_tps_reference=decode_ref,
        decode_tps_quantized=decode_q,
        notes=notes,
    )


def evaluate_alone(quantized: nn.Module, text: EvalText, device: torch.device) -> Evaluation:
    """The quantized model's own numbers when there is nothing to compare it with (an exported checkpoint
    whose source is gone): perplexity, a greedy continuation, weight memory, tokens/s; every reference field
    is None. The perplexity is computed window by window exactly as :func:`evaluate` computes it, so the two
    agree bit for bit on the same model and text."""
    context = context_length(quantized.config, text.ids.numel())
    pieces = windows(text.ids, context)
    nll_q, scored = 0.0, 0
    for window in pieces:
        window = window.to(device)
        nll_q += float(sequence_nll(_logits(quantized, window), window))
        scored += window.numel() - 1
    prompt, new_tokens = _prompt_and_length(text, context)
    greedy(quantized, prompt, 3, device)
    ids_q, decode_q = greedy(quantized, prompt, new_tokens, device)
    continuation = Continuation(text.decode(prompt.tolist()), None, text.decode(ids_q), None, new_tokens)
    prefill_ids = text.ids[: min(PREFILL_TOKENS, context)]
    notes = []
    if text.synthetic:
        notes.append("random token ids (no tokenizer): the perplexity is near the vocabulary size")
    if device.type == "cpu":
        notes.append(_CPU_NOTE)
    return Evaluation(
        text_source=text.source,
        synthetic_text=text.synthetic,
        tokens=text.ids.numel(),
        context=context,
        windows=len(pieces),
        perplexity_reference=None,
        perplexity_quantized=math.exp(nll_q / scored),
        top1_agreement=None,
        mean_kl=None,
        continuation=continuation,
        layer_errors=[],
        layer_error_tokens=0,
        weight_bytes_reference=None,
        weight_bytes_quantized=model_bytes(quantized),
        prefill_tokens=prefill_ids.numel(),
        prefill_tps_reference=None,
        prefill_tps_quantized=prefill_tokens_per_second(quantized, prefill_ids, device),
        decode_tps_reference=None,
        decode_tps_quantized=decode_q,
        notes=notes,
    )
