"""Tiny Hugging Face models with random weights, built the same way by every test that needs one."""

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")


TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
"""The sizes every tiny model shares (head_dim 16)."""


def tiny_llama(**overrides) -> nn.Module:
    """A 2-layer Llama of ``TINY_SIZES``, float32, eval mode."""
    config = transformers.LlamaConfig(**{**TINY_SIZES, **overrides})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()

MOE_FAMILIES = {  # model type -> (config fields, MoE layers among the 2)
    "qwen3_moe": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True), 2),
    "qwen2_moe": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=96), 2),
    "mixtral": (dict(num_local_experts=8, num_experts_per_tok=2), 2),
    "gpt_oss": (dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"]), 2),
    "deepseek_v3": (dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                         first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, num_key_value_heads=4), 1),
}


def tiny_moe(family: str, implementation: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 2-layer MoE model of ``family`` (a key of ``MOE_FAMILIES``) with HF's experts ``implementation``."""
    fields, _ = MOE_FAMILIES[family]
    config = transformers.AutoConfig.for_model(family, **{**TINY_SIZES, "head_dim": 16, **fields})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.set_experts_implementation(implementation)
    return model
