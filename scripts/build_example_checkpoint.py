"""Write the small example checkpoint that ships with mxrun (``mxrun/examples/tiny-moe``).

It is a Qwen3-MoE-architecture causal LM with tiny dimensions (2 layers, 4 experts, hidden 128), saved
in bf16 with ``save_pretrained``, so that plans and validation have a real Hugging Face checkpoint to run
on with no download. Its weights are random (seeded); the main-job issue replaces it with a trained model.

    python scripts/build_example_checkpoint.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mxrun" / "examples" / "tiny-moe"


def build(out: Path) -> None:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
