"""Train the built-in default model that ``mxrun --recipe R`` runs on when no ``--model`` is given.

The model is a small Qwen3-MoE causal LM (``Qwen3MoeForCausalLM``: 4 layers, 8 experts of which 2 per
token, hidden 256, expert width 128, head dim 64, vocabulary 2048) trained from scratch on Ambrose Bierce's
"The Devil's Dictionary", which ships in ``mxrun/examples/texts/`` (source, public-domain status and
cleaning in the README there). Every dimension a quantized GEMM reduces over (its K) is a multiple of 128,
so each MXFP8 block of 32 and each FP8 128x128 tile is whole.

It writes ``mxrun/examples/default-moe/`` (or ``--out``): ``config.json``, ``model.safetensors`` in bf16,
the byte-level BPE tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
and a ``README.md`` with the measured losses. The folder is built in a temporary directory next to the target and renamed into place.

    python scripts/train_default_model.py --device cuda   # what made the shipped model (25 s on an H200)
    python scripts/train_default_model.py --device cpu --steps 20 --out /tmp/m   # a quick smoke run
    python scripts/train_default_model.py --prepare-text devil.dict.dz   # rebuild the two text files

Why 300 steps (of 32 x 256 tokens, about 20 passes over the 123k training tokens): the text is small and the
model memorises it fast. With this recipe, runs of 300, 600, 1200 and 2400 steps (cosine over each) ended at
held-out perplexity 134, 708, 6660 and 10019: the held-out loss bottoms out near step 200 (perplexity ~130)
whatever the schedule, and the train loss goes on falling to 0.07. 300 steps ends just past that minimum.
The full CPU run takes 10 to 20 minutes on 2 cores.

Everything is seeded (data order, initialisation, tokenizer); on CUDA the result can still differ in the
last bits between runs because some CUDA kernels (scatter-adds, the attention backward) are not
deterministic. Needs only torch, transformers, tokenizers and safetensors.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ROOT / "mxrun" / "examples" / "texts"
TRAIN_TEXT = TEXTS / "devils-dictionary-train.txt"
HELDOUT_TEXT = TEXTS / "devils-dictionary-heldout.txt"
DEFAULT_OUT = ROOT / "mxrun" / "examples" / "default-moe"

VOCAB_SIZE = 2048
SEQ_LEN = 256
END_OF_TEXT = "<|endoftext|>"
HELDOUT_FRACTION = 0.05


# --- the text -------------------------------------------------------------------------------------------


def clean_devils_dictionary(dict_dz: Path) -> str:
    """The plain text of Debian's ``dict-devil`` (``/usr/share/dictd/devil.dict.dz``, a gzip'd dictd file).

    The dictd file is the Internet Wiretap edition (1993) with dictfmt's additions: a preamble before the
    Wiretap title block, ``{WORD}`` braces around cross-references, and a final line with the alphabet.
    Those are removed, trailing spaces are stripped and the text ends with one newline; everything else
    (entries, verses, the preface and the Wiretap header) is kept byte for byte. The file is pure ASCII.
    """
    text = gzip.decompress(dict_dz.read_bytes()).decode("ascii")
    start = text.index("The Internet Wiretap 1st Online Edition")
    text = text[text.rindex("\n", 0, start) + 1 :]
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and (not lines[-1] or re.fullmatch(r"[a-z]+", lines[-1].strip())):
        lines.pop()  # dictfmt's alphabet line (and blank lines before it)
    text = "\n".join(lines) + "\n"
    return re.sub(r"\{([^{}\n]*)\}", r"\1", text)


def split_heldout(text: str, fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(train, held-out): the held-out part starts at the first entry ("WORD, n.  ...") past ``1 - fraction``.

    The split is at an entry boundary so that no definition is cut in two; ``train + heldout == text``.
    """
    entry = re.compile(r"\n\n(?=[A-Z][A-Z .'-]*, )")
    match = entry.search(text, int(len(text) * (1 - fraction)))
    if match is None:
        raise ValueError("no dictionary entry starts in the last part of the text")
    cut = match.start() + 2
    return text[:cut], text[cut:]


def prepare_texts(dict_dz: Path) -> None:
    train, heldout = split_heldout(clean_devils_dictionary(dict_dz))
    TEXTS.mkdir(parents=True, exist_ok=True)
    TRAIN_TEXT.write_text(train, encoding="utf-8")
    HELDOUT_TEXT.write_text(heldout, encoding="utf-8")
    print(f"wrote {TRAIN_TEXT} ({len(train)} chars) and {HELDOUT_TEXT} ({len(heldout)} chars)")


# --- tokenizer, config, model ---------------------------------------------------------------------------


def build_tokenizer(train_text: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style: any byte string encodes, nothing is unknown) trained on the text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(train_text.split("\n\n"), trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"the BPE has {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def build_config(end_of_text_id: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,  # the dense MLP width; unused, since every layer is MoE
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=SEQ_LEN,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        tie_word_embeddings=False,
        bos_token_id=end_of_text_id,
        eos_token_id=end_of_text_id,
        pad_token_id=end_of_text_id,
    )


# --- training -------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_nll(model: Qwen3MoeForCausalLM, ids: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood (nats/token) of ``ids`` (1-D), in windows of ``SEQ_LEN + 1``.

    Consecutive windows share one token, so every token but the first is predicted exactly once, with the
    tokens before it in its window (up to ``SEQ_LEN``) as context; the last window may be shorter.
    """
    model.eval()
    device = next(model.parameters()).device
    starts = range(0, len(ids) - 1, SEQ_LEN)
    full = [s for s in starts if s + SEQ_LEN + 1 <= len(ids)]
    batches = [
        torch.stack([ids[s : s + SEQ_LEN + 1] for s in full[i : i + batch_size]])
        for i in range(0, len(full), batch_size)
    ]
    batches += [ids[s:][None] for s in starts if s + SEQ_LEN + 1 > len(ids)]
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch[:, :-1]).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def train(args: argparse.Namespace) -> None:
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    train_text = TRAIN_TEXT.read_text(encoding="utf-8")
    heldout_text = HELDOUT_TEXT.read_text(encoding="utf-8")
    tokenizer = build_tokenizer(train_text)
    train_ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    heldout_ids = torch.tensor(tokenizer(heldout_text)["input_ids"], dtype=torch.long)
    print(
        f"text: {len(train_text)} chars -> {len(train_ids)} train tokens, {len(heldout_text)} chars -> "
        f"{len(heldout_ids)} held-out tokens ({len(train_text) / len(train_ids):.2f} chars/token)"
    )

    config = build_config(tokenizer.convert_tokens_to_ids(END_OF_TEXT))
    model = Qwen3MoeForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {n_params:,} parameters; device {device}; {args.steps} steps of {args.batch_size}x{SEQ_LEN}"
    )

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = max(1, args.steps // 20)
    generator = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    train_ids_device = train_ids.to(device)
    offsets = torch.arange(SEQ_LEN + 1, device=device)
    recent_ce: list[torch.Tensor] = []  # the last steps' train cross-entropy, read at each report
    for step in range(args.steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (args.batch_size,), generator=generator)
        batch = train_ids_device[starts.to(device)[:, None] + offsets]
        with autocast:
            out = model(input_ids=batch[:, :-1], output_router_logits=True)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss = ce + config.router_aux_loss_coef * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent_ce.append(ce.detach())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with autocast:
                heldout = mean_nll(model, heldout_ids)
            train_ce = torch.stack(recent_ce[-args.eval_every :]).mean().item()
            recent_ce = recent_ce[-args.eval_every :]
            print(
                f"step {step + 1:5d}  lr {optimizer.param_groups[0]['lr']:.2e}  train ce {train_ce:.4f}  "
                f"held-out ce {heldout:.4f} (ppl {math.exp(heldout):.1f})  {time.perf_counter() - started:.0f}s",
                flush=True,
            )
    train_wall_s = time.perf_counter() - started

    # The shipped weights are bf16: measure what ships, in fp32 arithmetic on bf16 weights' values.
    model = model.to(torch.bfloat16)
    train_nll = mean_nll(model, train_ids[: len(heldout_ids) * 4])
    heldout_nll = mean_nll(model, heldout_ids)
    results = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "tokens_seen": args.steps * args.batch_size * SEQ_LEN,
        "train_tokens": len(train_ids),
        "heldout_tokens": len(heldout_ids),
        "train_ce_last_steps": train_ce,  # mean over the last eval_every steps, in training precision
        "train_ce_bf16": train_nll,
        "heldout_ce_bf16": heldout_nll,
        "heldout_ppl_bf16": math.exp(heldout_nll),
        "parameters": n_params,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "train_wall_s": round(train_wall_s, 1),
    }
    print(
        f"bf16: train ce {train_nll:.4f} (first {len(heldout_ids) * 4} tokens), held-out ce {heldout_nll:.4f}, "
        f"held-out perplexity {math.exp(heldout_nll):.2f} (uniform: {VOCAB_SIZE})"
    )
    write_folder(args.out, model, tokenizer, results, args)
    print(json.dumps(results, indent=2))


# --- output ---------------------------------------------------------------------------------------------


MODEL_CARD = """\
# default-moe

The built-in default model of mxrun: what `mxrun --recipe R` quantizes and evaluates when no `--model` is
given. A {params:,}-parameter Qwen3-MoE causal LM (`Qwen3MoeForCausalLM`, {layers} layers, {experts} experts
with {top_k} per token, hidden {hidden}, expert width {moe_width}, head dim {head_dim}, vocabulary {vocab}),
trained from scratch on Ambrose Bierce's "The Devil's Dictionary" (public domain; see
`mxrun/examples/texts/README.md`). Weights are bf16; the tokenizer is a byte-level BPE trained on the same
text. It writes Bierce-flavoured English of a sort and exists to make quantization error measurable.

Made by `scripts/train_default_model.py {argv}` on {device}, {steps} steps of {batch}x{seq_len} tokens
({wall:.0f} s).

| measure (bf16 weights) | value |
| --- | --- |
| training text | {train_tokens} tokens |
| held-out text (`devils-dictionary-heldout.txt`) | {heldout_tokens} tokens |
| train cross-entropy (first {train_eval_tokens} tokens) | {train_ce:.4f} nats/token |
| held-out cross-entropy | {heldout_ce:.4f} nats/token |
| held-out perplexity | {heldout_ppl:.2f} (uniform over the vocabulary: {vocab}) |

```json
{results}
```
"""


def write_folder(
    out: Path,
    model: Qwen3MoeForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    results: dict,
    args: argparse.Namespace,
) -> None:
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.config.output_router_logits = False
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "generation_config.json").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)
        # transformers 5 names its class TokenizersBackend; PreTrainedTokenizerFast loads in 4.x and 5.x.
        tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer_config.pop("backend", None)
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
        special_tokens = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT}
        for name, content in (
            ("tokenizer_config.json", tokenizer_config),
            ("special_tokens_map.json", special_tokens),
        ):
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        config = model.config
        (tmp / "README.md").write_text(
            MODEL_CARD.format(
                params=results["parameters"],
                layers=config.num_hidden_layers,
                experts=config.num_experts,
                top_k=config.num_experts_per_tok,
                hidden=config.hidden_size,
                moe_width=config.moe_intermediate_size,
                head_dim=config.head_dim,
                vocab=config.vocab_size,
                argv=(
                    f"--device {results['device_type']} --steps {args.steps} --batch-size {args.batch_size} "
                    f"--lr {args.lr:g} --weight-decay {args.weight_decay:g} --seed {args.seed}"
                ),
                device=results["device"],
                steps=results["steps"],
                batch=results["batch_size"],
                seq_len=results["seq_len"],
                wall=results["train_wall_s"],
                train_tokens=results["train_tokens"],
                heldout_tokens=results["heldout_tokens"],
                train_eval_tokens=results["heldout_tokens"] * 4,
                train_ce=results["train_ce_bf16"],
                heldout_ce=results["heldout_ce_bf16"],
                heldout_ppl=results["heldout_ppl_bf16"],
                results=json.dumps(results, indent=2),
            ),
            encoding="utf-8",
        )
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder ships
        for path in tmp.iterdir():
            path.chmod(0o644)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--prepare-text",
        type=Path,
        metavar="DEVIL_DICT_DZ",
        help="rebuild the two text files from Debian's dict-devil devil.dict.dz, then exit",
    )
    args = parser.parse_args()
    if args.prepare_text is not None:
        prepare_texts(args.prepare_text)
        return
    train(args)


if __name__ == "__main__":
    main()
