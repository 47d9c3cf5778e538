"""End to end through real gRPC servers on 127.0.0.1: greedy output equals the target alone."""

from __future__ import annotations

import pytest

from tests.helpers import collect, target_only_greedy

PROMPTS = ["def add(a, b):", "Natalia sold clips to 48 of her friends", "The quick brown fox"]


def test_draft_equal_to_target_accepts_everything(tiny, target_model, pair_factory):
    # the very same numbers as the target, and full chains (the tiny model is unsure of its tokens)
    pair = pair_factory(tiny.draft_same, weights="fp32", min_chain_probability=0)
    k = 4
    tokens, chunks = collect(
        pair.draft_stub, prompt="def add(a, b):", max_tokens=41, num_speculative_tokens=k
    )
    rounds = [c for c in chunks if c.HasField("stats")]
    assert rounds, "no speculative round ran"
    full = [c for c in rounds if c.stats.drafted_tokens == k]
    assert full, "every round drafted fewer than K tokens"
    for chunk in rounds:
        assert chunk.stats.accepted_tokens == chunk.stats.drafted_tokens  # acceptance rate 1.0
    for chunk in full[:-1]:  # the last round may be cut by EOS or max_tokens
        assert len(chunk.token_ids) == k + 1  # K accepted + the bonus token
    prompt_ids = target_model.tokenizer.encode("def add(a, b):")
    assert tokens == target_only_greedy(target_model, prompt_ids, 41)


@pytest.mark.parametrize("draft", ["draft_noisy", "draft_random"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_different_draft_is_token_identical_to_target(tiny, target_model, pair_factory, draft, k):
    pair = pair_factory(getattr(tiny, draft))
    for prompt in PROMPTS:
        tokens, chunks = collect(pair.draft_stub, prompt=prompt, max_tokens=48, num_speculative_tokens=k)
        expected = target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 48)
        assert tokens == expected, prompt
        assert chunks[-1].finish_reason in ("length", "stop")
        text = "".join(c.text for c in chunks)
        assert text == target_model.tokenizer.decode(expected, skip_special_tokens=True)


def test_noisy_draft_is_partially_accepted(tiny, pair_factory):
    pair = pair_factory(tiny.draft_noisy)
    _, chunks = collect(
        pair.draft_stub, prompt="for i in range(10):", max_tokens=64, num_speculative_tokens=4
    )
    drafted = sum(c.stats.drafted_tokens for c in chunks if c.HasField("stats"))
    accepted = sum(c.stats.accepted_tokens for c in chunks if c.HasField("stats"))
    assert 0 < accepted < drafted


def test_chat_template_and_stop_string(tiny, target_model, pair_factory):
    pair = pair_factory(tiny.draft_noisy)
    prompt_ids = target_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = target_only_greedy(target_model, list(prompt_ids), 40)
    tokens, chunks = collect(pair.draft_stub, prompt="hello", apply_chat_template=True, max_tokens=40)
    assert tokens == expected
    full_text = target_model.tokenizer.decode(expected, skip_special_tokens=True)
    stop = full_text[10:13]
    _, chunks = collect(pair.draft_stub, prompt="hello", apply_chat_template=True, max_tokens=40, stop=[stop])
    text = "".join(c.text for c in chunks)
    assert text == full_text[: full_text.index(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_max_tokens_is_exact(tiny, pair_factory):
    pair = pair_factory(tiny.draft_same)
    for max_tokens in (1, 2, 5, 9):
        tokens, chunks = collect(
            pair.draft_stub, prompt="The quick brown fox", max_tokens=max_tokens, num_speculative_tokens=4
        )
        assert len(tokens) <= max_tokens
        if chunks[-1].finish_reason == "length":
            assert len(tokens) == max_tokens


@pytest.mark.parametrize("draft", ["draft_same", "draft_noisy"])
def test_pipelining_keeps_outputs_identical_and_reports_hits(tiny, target_model, pair_factory, draft):
    weights = "fp32" if draft == "draft_same" else "int8"  # draft_same: the target's very numbers
    # full chains: a look-ahead chain that ended at its bonus guess leaves nothing to reuse
    pair = pair_factory(getattr(tiny, draft), pipeline=True, weights=weights, min_chain_probability=0)
    for prompt in PROMPTS:
        tokens, chunks = collect(pair.draft_stub, prompt=prompt, max_tokens=48, num_speculative_tokens=3)
        assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 48), prompt
    results = [c.stats.pipeline for c in chunks if c.HasField("stats")]
    assert set(results) <= {"", "hit", "miss"} and results[0] == ""
    registry = pair.draft.node.metrics.registry
    hits = registry.get_sample_value("specwire_draft_pipeline_rounds_total", {"result": "hit"}) or 0
    misses = registry.get_sample_value("specwire_draft_pipeline_rounds_total", {"result": "miss"}) or 0
    assert hits + misses > 0
    if draft == "draft_same":  # the draft is the target: its bonus guess is always right
        assert misses == 0 and hits > 0
