"""What a proposer does: turn the committed context into one round's candidate trie."""

from __future__ import annotations

from dataclasses import dataclass
from threading import Event
from typing import Protocol

import torch

from services.candidate_tree import CandidateTree, SparseProbs
from services.rpc.specwire.v1 import target_pb2
from services.sampling import target_probs, top1
from services.token_noise import Stream, TokenNoise


class Proposer(Protocol):
    prefills_context: bool  # drafting after a context it has not seen costs a prefill of what it missed

    def propose(self, context: list[int], k: int, n: int, stop: Event | None = None) -> CandidateTree:
        """Up to `n` candidates of up to `k` tokens after `context` (prompt + everything committed).
        Once `stop` is set, a proposer that drafts token by token ends with the tokens it has (a
        draft-ahead whose assumption the target's answer broke: nothing will use it)."""
        ...


@dataclass(frozen=True)
class DraftNoise:
    """The draft's randomness, keyed by token position like the target's. Drafting for the `gumbel`
    strategy reads the target's SAMPLE stream (coupled: the draft proposes what the target would
    draw if q were p); every other strategy needs draws independent of the target's (DRAFT)."""

    noise: TokenNoise
    stream: Stream

    @classmethod
    def for_strategy(cls, seed: int, strategy: str) -> DraftNoise:
        return cls(TokenNoise(seed), Stream.SAMPLE if strategy == "gumbel" else Stream.DRAFT)

    def sample(self, probs: torch.Tensor, position: int) -> int:
        return self.noise.sample(probs, position, self.stream)

    def seed_at(self, position: int) -> int:
        """A 31-bit seed for an engine that samples by itself (vLLM), keyed by position."""
        return int(self.noise.uniform(position, Stream.DRAFT, 1)[0] * (2**31 - 1))


def draft_token(
    logits: torch.Tensor, sampling: target_pb2.SamplingParams, noise: DraftNoise, position: int
) -> tuple[int, SparseProbs | None]:
    """Greedy (no q) or a sample, for the token at `position`, with the exact sparse q it was
    drawn from."""
    if sampling.temperature == 0:
        return int(top1(logits)), None
    probs = target_probs(logits, sampling)
    support = probs.nonzero().flatten()
    token = noise.sample(probs, position)
    return token, SparseProbs(support.tolist(), probs[support].tolist())


@dataclass
class ChainRule:
    """How a draft chain picks its tokens and where it ends. A token the draft is unsure of is
    seldom accepted and each costs a draft step, so a chain ends after a token whose own
    probability is below `confidence_threshold` (HF assisted generation's
    `assistant_confidence_threshold`), or once the probability of the whole chain so far (the
    product of its tokens' probabilities, how EAGLE-2 ranks draft paths) is below
    `min_chain_probability` (0: off, for both)."""

    sampling: target_pb2.SamplingParams
    noise: DraftNoise
    confidence_threshold: float = 0.0
    min_chain_probability: float = 0.0
    probability: float = 1.0  # of the chain so far

    def start(self) -> ChainRule:
        self.probability = 1.0
        return self

    def next_token(self, logits: torch.Tensor, position: int) -> tuple[int, SparseProbs | None, bool]:
        """The token at `position`, its sparse q (None when greedy), and whether the chain goes on."""
        token, q = draft_token(logits, self.sampling, self.noise, position)
        if self.confidence_threshold or self.min_chain_probability:
            probability = float(logits.softmax(-1)[token])
            self.probability *= probability
            if probability < self.confidence_threshold or self.probability < self.min_chain_probability:
                return token, q, False
        return token, q, True


def draft_sampling(request: target_pb2.SamplingParams, max_top_k: int) -> target_pb2.SamplingParams:
    """The draft samples like the request but keeps at most `max_top_k` tokens, so q stays small."""
    top_k = min(request.top_k, max_top_k) if request.top_k else max_top_k
    return target_pb2.SamplingParams(temperature=request.temperature, top_p=request.top_p, top_k=top_k)
