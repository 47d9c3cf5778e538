"""Concurrent sessions verified in one padded batch forward give the same results as alone."""

from __future__ import annotations

import threading
import time

import pytest

from services.batching import MicroBatcher
from services.candidate_tree import CandidateTree
from services.errors import Unavailable
from services.rpc.specwire.v1 import target_pb2
from target_node.backends.hf import check_tree_attention
from target_node.build import build_verifier
from target_node.config import TargetConfig
from tests.helpers import target_only_greedy

PROMPTS = [
    "def add(a, b):",
    "Natalia sold clips to 48 of her friends in April",
    "x",
    "The quick brown fox jumps",
]


def run_session(verifier, prompt_ids, expected, results, index):
    """Greedy rounds with tries of different shapes (truth + decoys) until `expected` is produced."""
    opened = verifier.open_session(
        target_pb2.OpenSessionRequest(prompt_token_ids=prompt_ids, tokenizer_fingerprint=verifier.fingerprint)
    )
    produced, batch_sizes, round_id = [opened.first_token_id], [], 0
    while len(produced) < len(expected):
        truth = expected[len(produced) : len(produced) + 1 + index % 3]
        decoy = [(t + 1) % verifier.vocab_size for t in truth]
        tree = CandidateTree.from_sequences([decoy, truth][: 1 + index % 2] if index % 2 else [truth])
        response = verifier.verify(
            target_pb2.VerifyRequest(session_id=opened.session_id, round_id=round_id, tree=tree.to_proto())
        )
        round_id += 1
        produced += [*response.accepted_token_ids, response.next_token_id]
        batch_sizes.append(response.batch_size)
    results[index] = (produced[: len(expected)], batch_sizes)


@pytest.mark.parametrize("fail_batched", [False, True])
def test_concurrent_sessions_batch_and_match_target_alone(target_model, monkeypatch, fail_batched):
    verifier = build_verifier(TargetConfig(model="tiny", max_batch_size=4, batch_wait_ms=30), target_model)
    if fail_batched:  # a broken batched forward falls back to one forward per request

        def boom(jobs):
            raise RuntimeError("batched forward failed")

        monkeypatch.setattr(verifier.backend, "_batched_forward", boom)
    prompts = [target_model.tokenizer.encode(p) for p in PROMPTS]
    expected = [target_only_greedy(target_model, p, 24) for p in prompts]
    results: dict[int, tuple] = {}
    threads = [
        threading.Thread(target=run_session, args=(verifier, p, e, results, i))
        for i, (p, e) in enumerate(zip(prompts, expected, strict=True))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    verifier.stop()
    assert sorted(results) == list(range(len(PROMPTS)))
    for i, want in enumerate(expected):
        assert results[i][0] == want, PROMPTS[i]
    sizes = [size for _, batch_sizes in results.values() for size in batch_sizes]
    if fail_batched:
        assert set(sizes) == {1}
    else:
        assert max(sizes) > 1, "no two requests were ever batched"


def test_model_that_ignores_tree_mask_is_refused(target_model, monkeypatch):
    model = target_model.model
    original = model.forward

    def drop_4d_mask(*args, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return original(*args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "forward", drop_4d_mask)
    with pytest.raises(RuntimeError, match="ignores custom 4D attention masks"):
        check_tree_attention(model, "broken")
    monkeypatch.setattr(model, "forward", original)
    check_tree_attention(model, "fine")


def test_same_seed_same_samples(target_model):
    verifier = build_verifier(TargetConfig(model="tiny"), target_model)
    prompt = target_model.tokenizer.encode("def add(a, b):")

    def sampled(seed):
        opened = verifier.open_session(
            target_pb2.OpenSessionRequest(
                prompt_token_ids=prompt,
                tokenizer_fingerprint=verifier.fingerprint,
                strategy="probabilistic",
                sampling=target_pb2.SamplingParams(temperature=1.0, seed=seed),
            )
        )
        tokens = [opened.first_token_id]
        for round_id in range(6):
            response = verifier.verify(
                target_pb2.VerifyRequest(
                    session_id=opened.session_id,
                    round_id=round_id,
                    tree=CandidateTree.from_sequences([[tokens[-1], 5]]).to_proto(),
                )
            )
            tokens += [*response.accepted_token_ids, response.next_token_id]
        return tokens

    assert sampled(11) == sampled(11)
    assert sampled(11) != sampled(12)
    verifier.stop()


def test_candidates_report_accepted_length_best_first(target_model):
    verifier = build_verifier(TargetConfig(model="tiny"), target_model)
    prompt = target_model.tokenizer.encode("The quick brown fox")
    expected = target_only_greedy(target_model, prompt, 5)
    opened = verifier.open_session(
        target_pb2.OpenSessionRequest(prompt_token_ids=prompt, tokenizer_fingerprint=verifier.fingerprint)
    )
    wrong = (expected[1] + 1) % verifier.vocab_size
    tree = CandidateTree.from_sequences([[wrong, 1], [expected[1], wrong], [expected[1], expected[2], 9]])
    response = verifier.verify(
        target_pb2.VerifyRequest(session_id=opened.session_id, round_id=0, tree=tree.to_proto())
    )
    by_leaf = {c.leaf_node_id: c for c in response.candidates}
    assert [c.accepted_length for c in response.candidates] == [2, 1, 0]
    assert response.candidates[0].leaf_node_id == 5  # leaves: 1, 3, 5 (nodes 2 -> 4 -> 5 carry the truth)
    assert list(response.accepted_node_ids) == [2, 4]
    assert by_leaf[1].accepted_length == 0 and by_leaf[1].target_logprob == 0
    assert all(c.target_logprob < 0 for c in response.candidates if c.accepted_length)
    verifier.stop()


def test_a_stopped_batcher_answers_unavailable_instead_of_hanging():
    started, release = threading.Event(), threading.Event()

    def slow(jobs):
        started.set()
        release.wait(5)
        return jobs

    batcher = MicroBatcher(slow, max_batch_size=1, max_wait_s=0)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", batcher.submit(1)))
    first.start()
    started.wait(5)
    queued = threading.Thread(target=lambda: results.setdefault("queued", _outcome(batcher.submit, 2)))
    queued.start()
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    release.set()
    for thread in (first, queued, stopper):
        thread.join(10)
    assert results["first"] == (1, 1)  # the batch in flight finishes
    assert isinstance(results["queued"], Unavailable)
    with pytest.raises(Unavailable):
        batcher.submit(3)


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        return exc


def test_a_job_alone_does_not_wait_for_a_batch_and_jobs_arriving_meanwhile_run_together():
    """One hop for a lone session: no batching wait when nobody else is submitting; requests that
    arrive while a batch runs form the next batch."""
    sizes, started, release = [], threading.Event(), threading.Event()

    def run(jobs):
        sizes.append(len(jobs))
        if len(sizes) == 1:
            started.set()
            release.wait(5)
        return jobs

    batcher = MicroBatcher(run, max_batch_size=8, max_wait_s=30)  # a wait would stall the test
    first = threading.Thread(target=batcher.submit, args=(0,))
    first.start()
    assert started.wait(5), "a lone job waited for company"
    others = [threading.Thread(target=batcher.submit, args=(i,)) for i in range(1, 4)]
    for thread in others:
        thread.start()
    while batcher._jobs.qsize() < 3:
        time.sleep(0.01)
    release.set()
    for thread in (first, *others):
        thread.join(10)
        assert not thread.is_alive()
    assert sizes == [1, 3]
    batcher.stop()
