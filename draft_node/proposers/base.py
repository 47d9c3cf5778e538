"""What a proposer does: turn the committed context into one round's candidate trie."""

from __future__ import annotations

from typing import Protocol

import torch

from services.candidate_tree import CandidateTree, SparseProbs
from services.rpc.specwire.v1 import target_pb2
from services.sampling import sample, target_probs


class Proposer(Protocol):
    def propose(self, context: list[int], k: int, n: int) -> CandidateTree:
        """Up to `n` candidates of up to `k` tokens after `context` (prompt + everything committed)."""
        ...


def draft_token(
    logits: torch.Tensor, sampling: target_pb2.SamplingParams, generator: torch.Generator
) -> tuple[int, SparseProbs | None]:
    """Greedy (no q) or a sample with the exact sparse distribution q it was drawn from."""
    if sampling.temperature == 0:
        return int(logits.argmax()), None
    probs = target_probs(logits, sampling)
    support = probs.nonzero().flatten()
    token = sample(probs, generator)
    return token, SparseProbs(support.tolist(), probs[support].tolist())


def draft_sampling(request: target_pb2.SamplingParams, max_top_k: int) -> target_pb2.SamplingParams:
    """The draft samples like the request but keeps at most `max_top_k` tokens, so q stays small."""
    top_k = min(request.top_k, max_top_k) if request.top_k else max_top_k
    return target_pb2.SamplingParams(temperature=request.temperature, top_p=request.top_p, top_k=top_k)
