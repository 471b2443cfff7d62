"""Tiny real transformers-5 architectures, built from config objects (never downloaded), for tests.

Sizes are the smallest that keep every structural feature a recipe cares about: hidden 64, 2 decoder layers,
4 experts, GQA (fewer k/v heads than q heads, so q and k/v shapes differ), distinct intermediate sizes (so
gate/up and down shapes differ and a transposed layout would show). Weights are bf16 and seeded, so a test
that saves and reloads gets the same model every time.

Each builder returns ``nn.Module`` in eval mode. ``ZOO`` maps a short name to its builder so tests can
parametrize over all of them; ``transformers`` is imported lazily so this module imports without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # building from a config must never reach the network

if TYPE_CHECKING:
    from torch import nn

HIDDEN = 64
N_LAYERS = 2
N_EXPERTS = 4
VOCAB = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
DENSE_INTER = 96
MOE_INTER = 48
"""Expert intermediate size I; chosen so 2I (96) differs from H (64) and I from H."""

SEED = 0


def _built(config: object, model_class_name: str = "AutoModelForCausalLM") -> nn.Module:
    """Instantiate ``config`` with seeded random weights in bf16, on CPU."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    model_class = getattr(transformers, model_class_name)
    if model_class_name.startswith("Auto"):
        model = model_class.from_config(config, dtype=torch.bfloat16)
    else:
        model = model_class(config).to(torch.bfloat16)
    return model.eval()


def tiny_llama(tie_word_embeddings: bool = False) -> nn.Module:
    """Dense decoder: q/k/v/o, gate/up/down; optionally with ``lm_head`` tied to the embedding."""
    from transformers import LlamaConfig

    return _built(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=DENSE_INTER,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            tie_word_embeddings=tie_word_embeddings,
        )
    )


def tiny_qwen3_moe() -> nn.Module:
    """Layer 0 dense MLP (``mlp_only_layers``), layer 1 MoE with ``mlp.gate`` router and fused experts."""
    from transformers import Qwen3MoeConfig

    return _built(
        Qwen3MoeConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=DENSE_INTER,
            moe_intermediate_size=MOE_INTER,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            num_experts=N_EXPERTS,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
        )
    )


def tiny_mixtral() -> nn.Module:
    """MoE in every layer; its checkpoint uses ``block_sparse_moe.experts.<i>.w1/w2/w3`` names."""
    from transformers import MixtralConfig

    return _built(
        MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=MOE_INTER,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=2,
        )
    )


def tiny_olmoe() -> nn.Module:
    from transformers import OlmoeConfig

    return _built(
        OlmoeConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=MOE_INTER,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            num_experts=N_EXPERTS,
            num_experts_per_tok=2,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    )


def tiny_deepseek_v3() -> nn.Module:
    """MLA attention (no q/k/v group), dense layer 0, MoE layers with shared experts and an fp32 router."""
    from transformers import DeepseekV3Config

    return _built(
        DeepseekV3Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=DENSE_INTER,
            moe_intermediate_size=MOE_INTER,
            num_hidden_layers=N_LAYERS + 1,
            first_k_dense_replace=1,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            n_routed_experts=N_EXPERTS,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
    )


def tiny_gpt_oss() -> nn.Module:
    """Fused experts stored transposed (``[E, H, 2I]``, ``[E, I, H]``) both in the module and on disk."""
    from transformers import GptOssConfig

    return _built(
        GptOssConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=MOE_INTER,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=2,
        )
    )


def tiny_bert() -> nn.Module:
    """Encoder: ``attention.self.query/key/value`` (a q/k/v group), word/position/type embeddings, pooler."""
    from transformers import BertConfig

    return _built(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=DENSE_INTER,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=64,
        ),
        model_class_name="BertModel",
    )


ZOO: dict[str, Callable[[], nn.Module]] = {
    "llama": tiny_llama,
    "llama_tied": lambda: tiny_llama(tie_word_embeddings=True),
    "qwen3_moe": tiny_qwen3_moe,
    "mixtral": tiny_mixtral,
    "olmoe": tiny_olmoe,
    "deepseek_v3": tiny_deepseek_v3,
    "gpt_oss": tiny_gpt_oss,
    "bert": tiny_bert,
}


def stream_checkpoint(path, model, online, rename: dict[str, str] | None = None) -> list[str]:
    """A minimal shard loader for the online-quantization tests: one tensor at a time, those the
    ``OnlineQuantizer`` takes go to it, the rest into the model (under ``rename`` if given). Returns the names
    the quantizer consumed."""
    import torch
    from safetensors import safe_open

    consumed = []
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
            tensor = f.get_tensor(name)
            if online.quantize_on_load(name, tensor):
                consumed.append(name)
            else:
                with torch.no_grad():
                    params[(rename or {}).get(name, name)].copy_(tensor)
            del tensor
    return consumed
