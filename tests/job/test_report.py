"""The main job end to end through the CLI on tiny checkpoints: the run folder, report.json's contents and
stamps, the reference perplexity against a direct computation, a tokenizer and --text, atomic writing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from mxrun import __version__
from mxrun.cli import main
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.plan import resolve
from mxrun.job import run_folder
from mxrun.job.evaluate import eval_text
from mxrun.job.loading import load_reference, open_checkpoint

WORDS = [
    "the",
    "devil",
    "is",
    "a",
    "word",
    "that",
    "means",
    "what",
    "the",
    "reader",
    "fears",
    "and",
    "the",
    "writer",
]


def _run(*args: str) -> dict:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "report.json").read_text())


def test_report_json(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    out = tmp_path / "run"
    report = _run(
        "--recipe", "fp8-channel", "--model", str(qwen3_moe_dir), "--out", str(out), "--max-tokens", "200",
        "--device", "cpu",
    )  # fmt: skip

    recipe = load_recipe_or_raise("fp8-channel")
    plan = resolve(recipe, qwen3_moe_dir)
    assert report["recipe"]["fingerprint"] == recipe.fingerprint and report["recipe"]["name"] == "fp8-channel"
    assert report["versions"]["mxrun"] == __version__ and report["versions"]["torch"] == torch.__version__
    assert report["versions"]["transformers"] == transformers.__version__ and "triton" in report["versions"]
    assert report["device"]["type"] == "cpu"  # CPU everywhere: the perplexity below is recomputed on CPU
    assert report["plan"] == json.loads(json.dumps(plan.summary()))
    assert (
        report["quantized_layers"]["count"] == len(plan.quantized())
        and not report["quantized_layers"]["left_unquantized"]
    )

    checkpoint = open_checkpoint(qwen3_moe_dir)
    load = report["load"]
    assert (
        load["checkpoint_bytes"] == checkpoint.total_bytes and load["shards"] == len(checkpoint.shards) == 7
    )
    assert 0 < load["model_bytes"] < load["checkpoint_bytes"] and load["host_peak_bytes"] is not None

    ev = report["evaluation"]
    assert ev["text"]["synthetic"] and ev["text"]["tokens"] == 200 and ev["text"]["windows"] == 1
    text = eval_text(qwen3_moe_dir, 128, None, 200)
    reference = load_reference(checkpoint, torch.bfloat16, torch.device("cpu"))
    with torch.no_grad():
        direct = math.exp(float(reference(text.ids[None], labels=text.ids[None]).loss))
    assert ev["perplexity"]["reference"] == pytest.approx(direct, rel=1e-5)
    assert ev["perplexity"]["quantized"] != ev["perplexity"]["reference"]
    assert 0.5 < ev["top1_agreement"] <= 1 and ev["mean_kl_nats"] > 0
    errors = [row["relative_error"] for row in ev["layer_errors"]["all"]]
    assert len(errors) == 11 + 1  # 11 dense Linears, 1 experts module (its gate_up_proj and down_proj)
    assert errors == sorted(errors, reverse=True) and all(0 < e < 0.2 for e in errors)
    assert ev["weight_bytes"]["quantized"] == load["model_bytes"] < ev["weight_bytes"]["reference"]
    assert all(v > 0 for v in ev["speed"]["prefill_tokens_per_s"].values())
    assert all(v > 0 for v in ev["speed"]["decode_tokens_per_s"].values())
    assert len(ev["continuation"]["reference"].split()) == ev["continuation"]["tokens"]

    markdown = (out / "report.md").read_text()
    assert recipe.fingerprint in markdown and "| perplexity |" in markdown
    plots = ["layer_errors.png"] if _has_matplotlib() else []
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.json", "report.md", *plots])
    assert report["files"] == ["report.json", "report.md", *plots]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _add_word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over WORDS (ids below the tiny models' vocabulary of 128), saved the usual way."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(dict.fromkeys(WORDS))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)


def test_tokenizer_and_text_file(tmp_path: Path, qwen3_moe_dir: Path) -> None:
    _add_word_tokenizer(qwen3_moe_dir)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 20))
    out = tmp_path / "run"
    report = _run(
        "--recipe",
        "mixed-moe",
        "--model",
        str(qwen3_moe_dir),
        "--text",
        str(text),
        "--out",
        str(out),
        "--max-tokens",
        "64",
        "--device",
        "cpu",
    )
    ev = report["evaluation"]
    assert ev["text"] == {"source": str(text), "synthetic": False, "tokens": 64, "context": 64, "windows": 1}
    assert ev["continuation"]["prompt"] == " ".join((WORDS * 2)[:16])
    assert set(ev["continuation"]["quantized"].split()) <= set(WORDS) | {"[UNK]"}
    assert not any("random token ids" in note for note in report["notes"])


def test_a_failed_write_leaves_nothing(
    tmp_path: Path, qwen3_moe_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_: dict) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(run_folder, "render_markdown", broken)
    out = tmp_path / "runs" / "run"
    result = CliRunner().invoke(
        main,
        ["--recipe", "fp8-channel", "--model", str(qwen3_moe_dir), "--out", str(out), "--max-tokens", "32"],
    )
    assert isinstance(result.exception, OSError)
    assert list((tmp_path / "runs").iterdir()) == []  # neither the run folder nor its temporary twin
