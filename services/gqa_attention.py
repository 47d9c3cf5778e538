"""Attention that reads grouped KV heads in place on a CPU, with a mask as without one.

transformers' `sdpa` copies each KV head once per query head of its group (`repeat_kv`) whenever
a mask is passed, as it is for every verify forward (a tree mask): for Qwen2.5-1.5B (12 query
heads, 2 KV heads) six copies of the whole cache, every layer, every round. torch's CPU SDPA
takes grouped heads as they are (`enable_gqa`), with the same result bit for bit and no
copies. Elsewhere transformers' own path stays: fused GPU kernels take GQA only without a mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "sdpa_gqa"  # the attn_implementation name models load with


def sdpa_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa` attention, except that a masked CPU call keeps KV heads grouped."""
    if query.device.type != "cpu" or attention_mask is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    grouped = query.shape[1] != key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=grouped
    )
    return out.transpose(1, 2).contiguous(), None


# Registered under its own name (transformers' registries are process-wide), masks made as for sdpa.
AttentionInterface.register(ATTENTION, sdpa_gqa_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
