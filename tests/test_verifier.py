"""The target's verifier without gRPC: tree verification, KV compaction, session handling."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from transformers import DynamicCache

from services.candidate_tree import CandidateTree
from services.errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from services.kv_cache import (
    GROWTH_POSITIONS,
    kv_nbytes,
    kv_tensors,
    move_positions,
    new_kv_cache,
    truncate_kv,
)
from services.rpc.specwire.v1 import target_pb2
from services.token_noise import TokenNoise
from target_node.build import build_verifier
from target_node.config import TargetConfig
from target_node.session import SessionStore
from tests.helpers import target_only_greedy


@pytest.fixture
def verifier(target_model):
    return build_verifier(TargetConfig(model="tiny", max_tree_nodes=32, max_context_tokens=200), target_model)


def open_session(verifier, prompt_ids, **kwargs):
    return verifier.open_session(
        target_pb2.OpenSessionRequest(
            prompt_token_ids=prompt_ids, tokenizer_fingerprint=verifier.fingerprint, **kwargs
        )
    )


def verify(verifier, session_id, round_id, tree):
    return verifier.verify(
        target_pb2.VerifyRequest(session_id=session_id, round_id=round_id, tree=tree.to_proto())
    )


@pytest.mark.parametrize("num_candidates", [1, 2, 4])
def test_tree_verification_equals_target_greedy(target_model, verifier, num_candidates):
    """Random tries that contain the target's own continuation at a random depth, or not."""
    rng = random.Random(num_candidates)
    prompt = target_model.tokenizer.encode("def add(a, b):")
    expected = target_only_greedy(target_model, prompt, 40)
    opened = open_session(verifier, prompt)
    produced = [opened.first_token_id]
    round_id = 0
    while len(produced) < len(expected):
        truth = expected[len(produced) : len(produced) + 5]
        candidates = []
        for _ in range(num_candidates):
            keep = rng.randint(0, len(truth))
            candidates.append(
                truth[:keep] + [rng.randrange(verifier.vocab_size) for _ in range(rng.randint(0, 3))]
            )
        rng.shuffle(candidates)
        tree = CandidateTree.from_sequences(candidates)
        result = verify(verifier, opened.session_id, round_id, tree)
        round_id += 1
        for node, token in zip(result.accepted_node_ids, result.accepted_token_ids, strict=True):
            assert tree.token_ids[node] == token
        if result.accepted_node_ids:
            assert list(result.accepted_node_ids) == tree.path_to(result.accepted_node_ids[-1])
        produced += [*result.accepted_token_ids, result.next_token_id]
        assert result.context_length == len(prompt) + len(produced) - 1
    assert produced[: len(expected)] == expected


def test_longest_accepted_path_is_chosen(target_model, verifier):
    prompt = target_model.tokenizer.encode("The quick brown fox")
    expected = target_only_greedy(target_model, prompt, 6)
    opened = open_session(verifier, prompt)
    assert opened.first_token_id == expected[0]
    wrong = (expected[2] + 1) % verifier.vocab_size
    tree = CandidateTree.from_sequences([[expected[1], wrong], [expected[1], expected[2], expected[3]]])
    result = verify(verifier, opened.session_id, 0, tree)
    assert list(result.accepted_token_ids) == expected[1:4]
    assert result.next_token_id == expected[4]
    assert result.next_is_bonus


def test_compacted_cache_equals_fresh_prefill(target_model, verifier):
    prompt = target_model.tokenizer.encode("Natalia sold clips")
    expected = target_only_greedy(target_model, prompt, 8)
    opened = open_session(verifier, prompt)
    # a trie with a decoy branch first, so the accepted entries are not a contiguous prefix
    decoy = [(expected[1] + 7) % verifier.vocab_size, 3, 4]
    verify(verifier, opened.session_id, 0, CandidateTree.from_sequences([decoy, expected[1:4]]))
    session = verifier.sessions.get(opened.session_id)
    committed = prompt + expected[:4]
    assert session.context_length == len(committed)
    probe = torch.tensor([[session.pending_token]])
    with torch.inference_mode():
        fresh = DynamicCache()
        target_model.model(input_ids=torch.tensor([committed]), past_key_values=fresh, use_cache=True)
        want = target_model.model(input_ids=probe, past_key_values=fresh, use_cache=True).logits
        got = target_model.model(input_ids=probe, past_key_values=session.cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make_cache", [DynamicCache, new_kv_cache])
def test_kv_positions_move_and_truncate_in_every_layer(make_cache):
    cache = make_cache()
    for layer in range(3):
        keys = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 4).clone() + layer
        cache.update(keys, keys.clone(), layer)
    move_positions(kv_tensors(cache), torch.tensor([5, 8]), 3)
    truncate_kv(cache, 5)
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.keys[0, 0, :, 0].tolist() == [v + layer_idx for v in (0, 1, 2, 5, 8)]
    truncate_kv(cache, 2)
    assert cache.get_seq_length() == 2
    held = 10 if make_cache is DynamicCache else 10 + GROWTH_POSITIONS  # truncation keeps the memory
    assert kv_nbytes(cache) == 3 * 2 * (1 * 2 * held * 4 * 4)


def test_preallocated_cache_appends_in_place_and_grows():
    cache = new_kv_cache()
    first = torch.randn(1, 2, 3, 4)
    cache.update(first, first + 1, 0)
    buffer = cache.layers[0].keys.untyped_storage().data_ptr()
    step = torch.randn(1, 2, 2, 4)
    keys, values = cache.update(step, step + 1, 0)
    assert keys.untyped_storage().data_ptr() == buffer  # no copy of the cache per step
    assert torch.equal(keys, torch.cat([first, step], dim=-2)) and torch.equal(values, keys + 1)
    truncate_kv(cache, 1)
    keys, _ = cache.update(step, step, 0)  # writes over the dropped positions
    assert torch.equal(keys, torch.cat([first[..., :1, :], step], dim=-2))
    big = torch.randn(1, 2, GROWTH_POSITIONS + 5, 4)
    keys, _ = cache.update(big, big, 0)  # past the capacity: reallocated, contents kept
    assert torch.equal(keys, torch.cat([first[..., :1, :], step, big], dim=-2))
    assert cache.get_seq_length() == 3 + GROWTH_POSITIONS + 5


def test_bad_requests_get_precise_errors(target_model, verifier):
    prompt = target_model.tokenizer.encode("def add")
    with pytest.raises(InvalidArgument, match="empty"):
        open_session(verifier, [])
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        open_session(verifier, [verifier.vocab_size])
    with pytest.raises(FailedPrecondition, match="tokenizer mismatch"):
        verifier.open_session(
            target_pb2.OpenSessionRequest(prompt_token_ids=prompt, tokenizer_fingerprint="abc")
        )
    with pytest.raises(InvalidArgument, match="fingerprint is required"):
        verifier.open_session(target_pb2.OpenSessionRequest(prompt_token_ids=prompt))
    with pytest.raises(InvalidArgument, match="unknown strategy"):
        open_session(verifier, prompt, strategy="nope")
    with pytest.raises(InvalidArgument, match="temperature 0"):
        open_session(verifier, prompt, sampling=target_pb2.SamplingParams(temperature=0.7))
    with pytest.raises(OutOfRange, match="context limit"):
        open_session(verifier, prompt * 100)
    opened = open_session(verifier, prompt)
    with pytest.raises(NotFound):
        verify(verifier, "no-such-session", 0, CandidateTree())
    with pytest.raises(FailedPrecondition, match="expected round 0"):
        verify(verifier, opened.session_id, 3, CandidateTree())
    with pytest.raises(InvalidArgument, match="parent"):
        verify(verifier, opened.session_id, 0, CandidateTree([0], [1]))
    with pytest.raises(InvalidArgument, match="limit is 32"):
        verify(verifier, opened.session_id, 0, CandidateTree.from_sequences([[1] * 33]))
    # the session is intact after every refused request
    session = verifier.sessions.get(opened.session_id)
    assert session.context_length == len(prompt)
    assert verify(verifier, opened.session_id, 0, CandidateTree()).context_length == len(prompt) + 1


def test_failed_forward_leaves_session_unchanged(target_model, verifier, monkeypatch):
    prompt = target_model.tokenizer.encode("def add")
    opened = open_session(verifier, prompt)
    session = verifier.sessions.get(opened.session_id)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(session.strategy, "evaluate_posterior", broken)
    with pytest.raises(RuntimeError):
        verify(verifier, opened.session_id, 0, CandidateTree.from_sequences([[1, 2]]))
    assert session.context_length == len(prompt)
    assert session.next_round == 0


def test_session_store_ttl_and_capacity():
    now = [0.0]
    store = SessionStore(max_sessions=2, ttl_s=10, clock=lambda: now[0])

    def session(sid):
        from target_node.session import Session
        from target_node.strategies import make_strategy

        return Session(sid, [1, 2], make_strategy("", target_pb2.SamplingParams()), TokenNoise(0))

    store.add(session("a"))
    now[0] = 5
    store.add(session("b"))
    with pytest.raises(Exception, match="sessions already"):
        store.add(session("c"))
    now[0] = 12  # "a" idle for 12 s > TTL; "b" for 7 s
    assert store.expire() == ["a"]
    store.add(session("c"))
    with pytest.raises(NotFound):
        store.get("a")
    store.get("b")
    assert store.remove("b") and not store.remove("b")


def test_failed_compaction_leaves_session_unchanged(target_model, verifier, monkeypatch):
    """A compaction error (after the forward and the decision) still restores the session."""
    prompt = target_model.tokenizer.encode("def add(a, b):")
    expected = target_only_greedy(target_model, prompt, 6)
    opened = open_session(verifier, prompt)
    session = verifier.sessions.get(opened.session_id)
    # the target's continuation as the second candidate: accepting it moves KV entries
    tree = CandidateTree.from_sequences([[(expected[1] + 1) % verifier.vocab_size], expected[1:4]])

    def broken(*args, **kwargs):
        raise RuntimeError("compaction failed")

    monkeypatch.setattr(verifier.backend.kernels, "compact_kv", broken)
    with pytest.raises(RuntimeError, match="compaction"):
        verify(verifier, opened.session_id, 0, tree)
    assert session.context_length == len(prompt) and session.next_round == 0
    assert session.cache.get_seq_length() == len(prompt)
    monkeypatch.undo()
    result = verify(verifier, opened.session_id, 0, tree)
    assert [expected[0], *result.accepted_token_ids, result.next_token_id] == expected[:5]


def test_chains_are_not_moved(target_model, verifier, monkeypatch):
    """Compaction skips identity moves: a single accepted chain needs none."""
    moves = []
    monkeypatch.setattr(verifier.backend.kernels, "compact_kv", lambda t, src, dst: moves.append((src.tolist(), dst)))
    prompt = target_model.tokenizer.encode("def add(a, b):")
    expected = target_only_greedy(target_model, prompt, 6)
    opened = open_session(verifier, prompt)
    verify(verifier, opened.session_id, 0, CandidateTree.from_sequences([expected[1:4]]))
    assert moves == []
    wrong = (expected[5] + 1) % verifier.vocab_size
    verify(verifier, opened.session_id, 1, CandidateTree.from_sequences([[wrong], expected[5:6]]))
    kept = len(prompt) + 4 + 1
    assert moves == [([kept + 1], kept)]  # node 1 (second candidate) moves next to the prefix


def test_close_waits_for_the_round_in_flight(target_model, verifier):
    prompt = target_model.tokenizer.encode("def add")
    opened = open_session(verifier, prompt)
    session = verifier.sessions.get(opened.session_id)
    session.lock.acquire()  # a round in flight
    closer = threading.Thread(target=verifier.close_session, args=(opened.session_id,))
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and session.cache is not None  # the round's cache is not pulled from under it
    session.lock.release()
    closer.join(5)
    assert session.closed and session.cache is None


def test_session_removed_between_lookup_and_lock_reads_not_found(target_model, verifier, monkeypatch):
    """Evicted (or closed, or expired) after `get` found it: NOT_FOUND, which makes the draft resume."""
    prompt = target_model.tokenizer.encode("def add")
    opened = open_session(verifier, prompt)
    get = verifier.sessions.get

    def get_then_evicted(session_id, owner):
        session = get(session_id, owner)
        verifier.sessions.remove(session_id, owner)
        return session

    monkeypatch.setattr(verifier.sessions, "get", get_then_evicted)
    with pytest.raises(NotFound):
        verify(verifier, opened.session_id, 0, CandidateTree.from_sequences([[1, 2]]))


def test_session_bytes_reads_the_cache_once(verifier):
    """The metrics scrape sums session bytes beside rounds and closes: a cache that becomes None
    between a check and a read (CloseSession on another thread) counts, it never fails the scrape."""
    opened = open_session(verifier, [5, 6, 7])
    cache = verifier.sessions.get(opened.session_id).cache

    class ClosedMidScrape:
        reads = 0

        @property
        def cache(self):
            self.reads += 1
            return cache if self.reads == 1 else None

    assert verifier.backend.session_bytes(ClosedMidScrape()) == kv_nbytes(cache)
