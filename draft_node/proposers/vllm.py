"""Draft proposer on a vLLM engine: N sampled continuations of K tokens per round, as a trie.

Sampling: `SamplingParams(n=N, max_tokens=K, logprobs=top_k)` with the engine in
`processed_logprobs` mode, so each position's returned logprobs are the full top-k/top-p truncated
distribution the token was sampled from: the sparse q is exact. Duplicate samples are merged in
order of first appearance, which turns N i.i.d. draws into sampling without replacement; a later
sibling's q is therefore q without the earlier siblings' tokens, renormalized (what the
probabilistic strategy requires). Greedy: one greedy chain plus N-1 sampled alternatives (no q:
greedy verification only compares tokens).
"""

from __future__ import annotations

import math
from threading import Event

from draft_node.config import DraftConfig
from draft_node.proposers.base import DraftNoise
from services.candidate_tree import ROOT, CandidateTree, SparseProbs
from services.rpc.specwire.v1 import target_pb2
from services.vllm_engine import VllmEngine


class VllmDraftModel:
    """The draft's vLLM engine, shared by all generations (their proposals are batched)."""

    def __init__(self, model_dir: str, config: DraftConfig) -> None:
        self.engine = VllmEngine(
            model_dir,
            config.dtype,
            config.vllm_max_model_len,
            config.vllm_block_size,
            config.workers,
            0.002,
            name="vllm-draft-batcher",
            logprobs_mode="processed_logprobs",
            max_logprobs=max(20, config.draft_top_k),
        )
        self.draft_top_k = config.draft_top_k

    def stop(self) -> None:
        self.engine.stop()


def sparse_q(logprobs: dict, exclude: set[int]) -> SparseProbs:
    """The sampling distribution at one position, without `exclude` (earlier siblings), renormalized."""
    probs = {
        t: math.exp(lp.logprob) for t, lp in logprobs.items() if t not in exclude and lp.logprob > -math.inf
    }
    total = sum(probs.values())
    return SparseProbs(list(probs), [p / total for p in probs.values()])


class VllmProposer:
    prefills_context = True

    def __init__(
        self, model: VllmDraftModel, sampling: target_pb2.SamplingParams, noise: DraftNoise
    ) -> None:
        self.model = model
        self.sampling = sampling
        self.noise = noise

    def propose(self, context: list[int], k: int, n: int = 1, stop: Event | None = None) -> CandidateTree:
        """`stop` is not heard: the engine drafts the whole chain in one call."""
        from vllm import SamplingParams

        if k <= 0:
            return CandidateTree()
        seed = self.noise.seed_at(len(context))
        top_k = self.sampling.top_k or self.model.draft_top_k
        sampled = SamplingParams(
            n=n,
            max_tokens=k,
            temperature=self.sampling.temperature or 1.0,
            top_p=self.sampling.top_p or 1.0,
            top_k=top_k,
            seed=seed,
            logprobs=top_k,
        )
        greedy = self.sampling.temperature == 0
        jobs = [(context, sampled)]
        if greedy:
            jobs = [(context, SamplingParams(n=1, max_tokens=k, temperature=0.0))]
            if n > 1:
                sampled.n = n - 1
                jobs.append((context, sampled))
        outputs, _ = self.model.engine.generate(jobs)
        sequences = [seq for out in outputs for seq in out.outputs]
        return build_tree(sequences, with_q=not greedy)


def build_tree(sequences: list, with_q: bool) -> CandidateTree:
    """Merge vLLM completion outputs into a trie (first appearance wins), with per-node q."""
    tree = CandidateTree()
    child: dict[tuple[int, int], int] = {}
    siblings: dict[int, set[int]] = {}
    for seq in sequences:
        parent = ROOT
        for depth, token in enumerate(seq.token_ids):
            node = child.get((parent, token))
            if node is None:
                node = len(tree)
                earlier = siblings.setdefault(parent, set())
                tree.parents.append(parent)
                tree.token_ids.append(token)
                if with_q:
                    tree.draft_probs.append(sparse_q(seq.logprobs[depth], exclude=earlier))
                earlier.add(token)
                child[(parent, token)] = node
            parent = node
    return tree
