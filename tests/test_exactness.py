"""Same seed, same text, whatever the servers did: pipelined or not, prefix caches cold or warm,
alone or batched with other sessions on the target, resumed after a lost session or not.

`gumbel` gives the target alone's seeded text whatever K, N or the draft were
(tests/test_sampling_generation.py); `probabilistic` depends on the trie shapes (K, N, the draft),
so for a fixed draft and K it must not depend on anything else the servers did."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from draft_node.proposers.base import DraftNoise
from draft_node.proposers.hf import HFProposer
from draft_node.speculative import draft_ahead
from services.compute_thread import ComputeThread
from services.model_loading import load_model
from services.rpc.specwire.v1 import target_pb2
from target_node.build import build_verifier
from target_node.config import TargetConfig
from tests.helpers import collect, forget_sessions_at

SEEDS = (11, 12, 13)


REQUEST = {"prompt": "Natalia sold clips to 48 of her friends", "max_tokens": 40, "temperature": 1.0, "top_k": 20}


def texts(pair, strategy: str, k: int) -> list[list[int]]:
    """One seeded generation per seed."""
    return [collect(pair.draft_stub, seed=s, strategy=strategy, num_speculative_tokens=k, **REQUEST)[0] for s in SEEDS]


def batched_forwards(verifier) -> float:
    """Verify forwards that served more than one session."""
    samples = {(s.name, s.labels.get("le")): s.value for s in verifier.metrics.batch_size.collect()[0].samples}
    return samples[("specwire_target_batch_size_count", None)] - samples[("specwire_target_batch_size_bucket", "1.0")]


@pytest.mark.parametrize(
    "strategy, chain_probability",
    [("probabilistic", 0.5), ("probabilistic", 0.9), ("gumbel", 0.5)],
    ids=["probabilistic", "probabilistic-short-chains", "gumbel"],
)
def test_seeded_text_does_not_depend_on_what_the_servers_did(
    tiny, target_model, pair_factory, strategy, chain_probability
):
    """`chain_probability` 0.9 ends most chains after a token or two, where a look-ahead that
    counted its guessed token in the chain's stop rule drafted other (or no) tries."""
    k = 6
    sequential = pair_factory(tiny.draft_noisy, pipeline=False, min_chain_probability=chain_probability)
    reference = texts(sequential, strategy, k)  # prefix caches cold on both nodes
    assert len({tuple(t) for t in reference}) == len(SEEDS) and all(len(t) >= 8 for t in reference)
    assert texts(sequential, strategy, k) == reference, "prefix caches warm"

    batching = build_verifier(TargetConfig(model="tiny", batch_wait_ms=20), target_model)
    pipelined = pair_factory(
        tiny.draft_noisy, pipeline=True, target_verifier=batching, min_chain_probability=chain_probability
    )
    assert texts(pipelined, strategy, k) == reference, "pipelined, caches cold"
    assert pipelined.draft.node.metrics.pipeline_rounds.labels("hit")._value.get() > 0, "no look-ahead was used"
    assert texts(pipelined, strategy, k) == reference, "pipelined, caches warm"

    with ThreadPoolExecutor(3) as pool:  # sessions batched together on the target
        batched = list(pool.map(lambda _: texts(pipelined, strategy, k), range(3)))
    assert batched == [reference] * 3, "batched"
    assert batched_forwards(batching) > 0, "no forward was batched"

    forget_sessions_at(batching, {2, 5, 9})
    assert texts(pipelined, strategy, k) == reference, "resumed"
    assert pipelined.draft.node.metrics.target_resumes._value.get() == 3


@pytest.mark.parametrize("chain_probability", [0.0, 0.5, 0.9])
def test_the_look_ahead_is_the_trie_its_round_would_send(tiny, chain_probability):
    """What the proposer drafts ahead (after a guessed next token) equals what it proposes once that
    context is the round's, q included: a hit changes nothing but the time."""
    model = load_model(tiny.draft_noisy).model
    sampling = target_pb2.SamplingParams(temperature=1.0, top_k=20)
    proposer = HFProposer(
        model, ComputeThread(), sampling, DraftNoise.for_strategy(5, "probabilistic"),
        min_chain_probability=chain_probability,
    )  # fmt: skip
    context, lengths = list(range(5, 25)), set()
    for _ in range(6):
        tree = proposer.propose(context, 6)
        ahead = draft_ahead(proposer, context, tree, lambda length: 6, 1)
        assert ahead.context[: len(context)] == context
        assert proposer.propose(ahead.context, 6) == ahead.tree
        lengths.add(len(ahead.tree))
        context = ahead.context
    assert (lengths == {6}) == (chain_probability == 0.0)  # the chains' stop rule ended some early
