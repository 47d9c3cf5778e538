"""Grouped-KV attention: the same logits as transformers' sdpa, bit for bit, without copying KV
heads under a tree mask (what every verify forward passes)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import sdpa_attention

from services.candidate_tree import CandidateTree
from services.gqa_attention import ATTENTION
from services.kv_cache import new_kv_cache
from services.model_loading import load_model
from target_node.tree_attention import batch_inputs, build_tree_query


@torch.inference_mode()
def prefill_and_verify(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt logits, a tree verify's logits (4D mask) and the next decode step's logits."""
    cache = new_kv_cache()
    prompt = torch.tensor([[5, 9, 14, 3, 27, 8]])
    prefill = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
    tree = CandidateTree.from_sequences([[11, 12, 13], [11, 40], [41]])
    inputs = batch_inputs([build_tree_query(10, tree, prompt.shape[1])], model.dtype, torch.device("cpu"))
    verify = model(
        input_ids=inputs.input_ids,
        position_ids=inputs.position_ids,
        attention_mask=inputs.attention_mask,
        past_key_values=cache,
        use_cache=True,
    ).logits
    step = model(input_ids=torch.tensor([[7]]), past_key_values=cache, use_cache=True).logits
    return prefill, verify, step


def test_models_load_with_grouped_kv_attention_and_equal_sdpa_bitwise(tiny):
    loaded = load_model(tiny.target).model
    assert loaded.config._attn_implementation == ATTENTION
    assert loaded.config.num_key_value_heads < loaded.config.num_attention_heads  # the tiny model is GQA
    stock = AutoModelForCausalLM.from_pretrained(tiny.target, attn_implementation="sdpa").eval()
    for ours, theirs in zip(prefill_and_verify(loaded), prefill_and_verify(stock), strict=True):
        assert torch.equal(ours, theirs)


def test_a_masked_forward_does_not_copy_kv_heads(tiny, monkeypatch):
    def no_copies(*args: object) -> None:
        raise AssertionError("repeat_kv called")

    monkeypatch.setattr(sdpa_attention, "repeat_kv", no_copies)
    prefill_and_verify(load_model(tiny.target).model)
    stock = AutoModelForCausalLM.from_pretrained(tiny.target, attn_implementation="sdpa").eval()
    with pytest.raises(AssertionError, match="repeat_kv"):  # what transformers' sdpa does under a mask
        prefill_and_verify(stock)
