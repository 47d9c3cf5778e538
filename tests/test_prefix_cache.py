"""Prefix caching (services/prefix_cache.py): what it reuses, what it keeps, and that both nodes'
prefills from it leave greedy output identical to the target alone."""

from __future__ import annotations

import torch

from draft_node.proposers.hf import HFProposer
from services.compute_thread import ComputeThread
from services.kv_cache import kv_tensors, new_kv_cache
from services.model_loading import load_model
from services.prefix_cache import PrefixCache, shared_length
from target_node.build import build_verifier
from target_node.config import TargetConfig
from tests.helpers import collect, target_only_greedy
from tests.test_verifier import open_session

LAYERS, HEADS, DIM = 2, 1, 4
TOKEN_BYTES = LAYERS * 2 * HEADS * DIM * 4  # float32 keys + values of one position


def cache_of(token_ids: list[int]):
    """A cache whose entry at each position encodes that position's token, so copies can be checked."""
    cache = new_kv_cache()
    for layer in range(LAYERS):
        values = torch.tensor(token_ids, dtype=torch.float32).view(1, 1, -1, 1).expand(1, HEADS, -1, DIM)
        cache.update(values + layer, values - layer, layer)
    return cache


def tokens_in(cache) -> list[int]:
    return [int(v) for v in kv_tensors(cache)[0][0, 0, :, 0]]


def test_longest_shared_prefix_wins_and_the_last_token_is_always_fed():
    cache = PrefixCache(1 << 20)
    cache.store([1, 2, 3, 4], cache_of([1, 2, 3, 4]))
    cache.store([1, 2, 9], cache_of([1, 2, 9]))
    length, found = cache.lookup([1, 2, 3, 7, 8])
    assert length == 3 and tokens_in(found) == [1, 2, 3]
    length, found = cache.lookup([1, 2, 3, 4])  # the whole prompt is cached: its last token is fed again
    assert length == 3 and tokens_in(found) == [1, 2, 3]
    assert cache.lookup([5, 6])[0] == 0 and cache.lookup([1])[0] == 0
    assert kv_tensors(cache.lookup([1, 2, 9, 9])[1])[2][0, 0, :, 0].tolist() == [2.0, 3.0, 10.0]  # layer 1 keys


def test_entries_are_copies_and_the_budget_evicts_the_least_recently_used():
    cache = PrefixCache(3 * 4 * TOKEN_BYTES)  # three 4-token prompts
    source = cache_of([1, 2, 3, 4])
    cache.store([1, 2, 3, 4], source)
    kv_tensors(source)[0].zero_()  # the session's cache changes after the store
    length, found = cache.lookup([1, 2, 3, 5])
    assert tokens_in(found) == [1, 2, 3]
    kv_tensors(found)[0].zero_()  # and a session that took a prefix changes its copy
    assert tokens_in(cache.lookup([1, 2, 3, 5])[1]) == [1, 2, 3]
    for first in (10, 20):
        cache.store([first, 2, 3, 4], cache_of([first, 2, 3, 4]))
    cache.lookup([1, 2, 3, 6])  # the oldest entry is used again ...
    cache.store([30, 2, 3, 4], cache_of([30, 2, 3, 4]))  # ... so the next oldest goes
    assert len(cache) == 3
    assert cache.lookup([10, 2, 3, 4])[0] == 0 and cache.lookup([1, 2, 3, 4])[0] == 3
    off = PrefixCache(0)
    off.store([1, 2, 3], cache_of([1, 2, 3]))
    assert len(off) == 0 and off.lookup([1, 2, 3, 4])[0] == 0


def test_shared_length():
    assert shared_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert shared_length([1, 2], [1, 2, 3]) == 2 and shared_length([], [1]) == 0


def test_target_prefill_from_the_cache_matches_a_full_prefill(tiny):
    loaded = load_model(tiny.target)
    cached = build_verifier(TargetConfig(model="tiny", max_context_tokens=200), loaded)
    full = build_verifier(TargetConfig(model="tiny", max_context_tokens=200, prefix_cache_mb=0), loaded)
    shared = list(range(5, 45))
    try:
        open_session(cached, shared + [50, 51])
        sessions = []
        for verifier in (cached, full):
            opened = open_session(verifier, shared + [60, 61, 62])
            sessions.append(verifier.sessions.get(opened.session_id))
        assert [s.cached_prefix for s in sessions] == [40, 0]
        for a, b in zip(kv_tensors(sessions[0].cache), kv_tensors(sessions[1].cache), strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
        assert sessions[0].pending_token == sessions[1].pending_token
        metric = cached.metrics.registry.get_sample_value
        assert metric("specwire_target_prefill_tokens_total", {"source": "cached"}) == 40
        assert metric("specwire_target_prefill_tokens_total", {"source": "computed"}) == 42 + 3
    finally:
        cached.stop()
        full.stop()


def test_draft_starts_from_the_shared_prefix_and_drafts_the_same_chain(tiny):
    model = load_model(tiny.draft_noisy).model
    fed: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    compute, shared = ComputeThread(), list(range(5, 45))
    prefixes = PrefixCache(1 << 20)
    HFProposer(model, compute, min_chain_probability=0, prefix_cache=prefixes).propose(shared + [50, 51], 3)
    fed.clear()
    reused = HFProposer(model, compute, min_chain_probability=0, prefix_cache=prefixes).propose(shared + [60, 61], 3)
    assert fed == [1, 1, 1, 1]  # what the cached prefix lacks, then the context's last token as a step
    alone = HFProposer(model, compute, min_chain_probability=0).propose(shared + [60, 61], 3)
    assert reused.token_ids == alone.token_ids
    compute.stop()


def test_prompts_sharing_a_prefix_stay_token_identical_through_the_pair(tiny, target_model, pair_factory):
    """Both nodes prefill the second and third prompts from their prefix caches."""
    pair = pair_factory(tiny.draft_noisy)
    system = "You are a careful assistant. Answer briefly and exactly. "
    for question in ("What is 2 + 2?", "What is 3 + 5?", "What is 2 + 2?"):
        tokens, _ = collect(pair.draft_stub, prompt=system + question, max_tokens=24)
        prompt_ids = target_model.tokenizer.encode(system + question)
        assert tokens == target_only_greedy(target_model, prompt_ids, 24), question
    registry = pair.target.node.metrics.registry
    assert registry.get_sample_value("specwire_target_prefill_tokens_total", {"source": "cached"}) > 0
