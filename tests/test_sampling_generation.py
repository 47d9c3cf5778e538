"""Sampling through the pair: seeds reproduce, q is exactly the draft's sampling distribution."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from draft_node.proposers.base import DraftNoise, draft_sampling, draft_token
from services.rpc.specwire.v1 import draft_pb2, target_pb2
from services.sampling import target_probs
from tests.helpers import collect, forget_sessions_at


def test_draft_token_reports_the_distribution_it_sampled_from():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen) * 3
    sampling = draft_sampling(target_pb2.SamplingParams(temperature=0.8, top_p=0.95), max_top_k=8)
    assert sampling.top_k == 8
    counts = torch.zeros(50)
    noise = DraftNoise.for_strategy(0, "probabilistic")
    for position in range(4000):
        token, q = draft_token(logits, sampling, noise, position)
        assert token in q.token_ids and len(q.token_ids) <= 8
        counts[token] += 1
    expected = target_probs(logits, sampling)
    dense = torch.zeros(50)
    dense[q.token_ids] = torch.tensor(q.probs)
    torch.testing.assert_close(dense, expected)
    assert (counts / counts.sum() - expected).abs().sum() / 2 < 0.05  # total variation
    assert draft_token(logits, target_pb2.SamplingParams(), noise, 0) == (int(logits.argmax()), None)


def test_seeded_sampling_is_reproducible(tiny, pair_factory):
    pair = pair_factory(tiny.draft_noisy)
    request = dict(
        prompt="def add(a, b):", max_tokens=24, temperature=1.0, top_k=20, num_speculative_tokens=3
    )
    first, chunks = collect(pair.draft_stub, seed=7, **request)
    assert first == collect(pair.draft_stub, seed=7, **request)[0]
    runs = [collect(pair.draft_stub, seed=s, **request) for s in (8, 9, 10)]
    assert len({tuple(tokens) for tokens, _ in runs} | {tuple(first)}) > 1
    rounds = [c.stats for _, cs in [(first, chunks), *runs] for c in cs if c.HasField("stats")]
    assert rounds and sum(r.accepted_tokens for r in rounds) > 0  # sampled drafts are accepted too


@pytest.mark.parametrize("strategy", ["threshold", "typical", "topk"])
def test_lossy_strategies_run_end_to_end(tiny, pair_factory, strategy):
    pair = pair_factory(tiny.draft_noisy)
    tokens, chunks = collect(
        pair.draft_stub,
        prompt="The quick brown fox",
        max_tokens=16,
        temperature=0.7,
        seed=1,
        strategy=strategy,
    )
    rounds = [c.stats for c in chunks if c.HasField("stats")]
    assert tokens and all(0 <= t < len(pair.draft.node.tokenizer) for t in tokens)
    assert len(tokens) == 16 or chunks[-1].finish_reason == "stop"
    assert rounds and sum(r.accepted_tokens for r in rounds) > 0


def test_bad_sampling_parameters(tiny, pair_factory):
    pair = pair_factory(tiny.draft_noisy)
    for request in (
        dict(temperature=-1.0),
        dict(temperature=1.0, top_p=2.0),
        dict(strategy="nope"),
        dict(temperature=0.5, strategy="deterministic"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            list(pair.draft_stub.Generate(draft_pb2.GenerateRequest(prompt="hi", max_tokens=4, **request)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request


def target_alone_sampled(
    pair, prompt_ids: list[int], sampling: target_pb2.SamplingParams, count: int, strategy: str = "gumbel"
) -> list[int]:
    """The target sampling by itself through its own API: one session verified with empty tries."""
    info = pair.target_stub.Info(target_pb2.InfoRequest())
    opened = pair.target_stub.OpenSession(
        target_pb2.OpenSessionRequest(
            prompt_token_ids=prompt_ids,
            tokenizer_fingerprint=info.tokenizer_fingerprint,
            strategy=strategy,
            sampling=sampling,
        )
    )
    tokens = [opened.first_token_id]
    for round_id in range(count - 1):
        response = pair.target_stub.Verify(
            target_pb2.VerifyRequest(session_id=opened.session_id, round_id=round_id, tree=target_pb2.CandidateTree())
        )
        tokens.append(response.next_token_id)
    pair.target_stub.CloseSession(target_pb2.CloseSessionRequest(session_id=opened.session_id))
    return tokens


def test_seeded_text_is_the_targets_own_whatever_k_draft_pipelining_batching_or_resumes(
    tiny, target_model, pair_factory
):
    """The default sampled strategy (`gumbel`) with a seed gives the target alone's text for that
    seed: any K, a pipelined or sequential loop, another draft (n-gram, unrelated weights),
    concurrent requests batched on the target, sessions lost and resumed mid-generation."""
    request = dict(prompt="def add(a, b):", max_tokens=24, temperature=1.0, top_k=20, seed=7)
    pipelined = pair_factory(tiny.draft_noisy, pipeline=True)
    reference, chunks = collect(pipelined.draft_stub, num_speculative_tokens=3, **request)
    assert sum(c.stats.accepted_tokens for c in chunks if c.HasField("stats")) > 0
    sampling = target_pb2.SamplingParams(temperature=1.0, top_k=20, seed=7)
    prompt_ids = target_model.tokenizer.encode(request["prompt"])
    assert reference == target_alone_sampled(pipelined, prompt_ids, sampling, 24)[: len(reference)]
    assert len(reference) > 8
    for k in (1, 2, 5):
        assert collect(pipelined.draft_stub, num_speculative_tokens=k, **request)[0] == reference, k
    others = [
        pair_factory(tiny.draft_noisy, pipeline=False),
        pair_factory(tiny.draft_random, pipeline=True),
        pair_factory(tiny.draft_noisy, proposer="ngram", num_candidates=3),
    ]
    for pair in others:
        assert collect(pair.draft_stub, num_speculative_tokens=3, **request)[0] == reference
    with ThreadPoolExecutor(4) as pool:  # batched with each other on the target
        runs = list(pool.map(lambda k: collect(pipelined.draft_stub, num_speculative_tokens=k, **request)[0], [2, 3, 4, 3]))
    assert runs == [reference] * 4
    forget_sessions_at(pipelined.target.node, {2, 4})
    assert collect(pipelined.draft_stub, num_speculative_tokens=3, **request)[0] == reference
    assert pipelined.draft.node.metrics.target_resumes._value.get() == 2


@pytest.mark.parametrize("proposer", ["hf", "ngram"])
@pytest.mark.parametrize("strategy", ["", "probabilistic"])
def test_tiny_positive_temperatures_are_greedy(tiny, target_model, pair_factory, proposer, strategy):
    """1e-39 is positive but logits / 1e-39 overflow: both nodes treat it as greedy, whatever the
    strategy or proposer, so the text is the target's greedy text (no NaN token 0, no INTERNAL)."""
    from tests.helpers import target_only_greedy

    pair = pair_factory(tiny.draft_noisy, proposer=proposer)
    prompt = "def add(a, b):\n    return a + b\ndef add(a, b):"
    tokens, _ = collect(
        pair.draft_stub, prompt=prompt, max_tokens=16, temperature=1e-39, seed=3, strategy=strategy, num_speculative_tokens=3
    )
    assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 16)


def test_a_tiny_temperature_on_the_target_alone_is_greedy(tiny, target_model, pair_factory):
    """Straight to the target: a session at temperature 1e-39 takes the argmax at every position."""
    from tests.helpers import target_only_greedy

    pair = pair_factory(tiny.draft_noisy)
    prompt_ids = target_model.tokenizer.encode("The quick brown fox")
    for strategy in ("gumbel", "probabilistic", "threshold"):
        sampling = target_pb2.SamplingParams(temperature=1e-39, seed=1)
        tokens = target_alone_sampled(pair, prompt_ids, sampling, 8, strategy)
        assert tokens == target_only_greedy(target_model, prompt_ids, 8), strategy
