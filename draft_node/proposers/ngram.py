"""Prompt-lookup (n-gram) proposer: no model; continue the context the way it continued before.

The longest suffix n-gram (n_max down to n_min) that occurred earlier in the context is looked up;
the tokens that followed its most recent occurrences become up to N distinct candidates. Proposals
are deterministic, so they carry no q (point masses for the probabilistic strategy).
"""

from __future__ import annotations

from services.candidate_tree import CandidateTree


class NgramProposer:
    def __init__(self, n_min: int = 1, n_max: int = 4, num_candidates: int = 1) -> None:
        self.n_min, self.n_max, self.num_candidates = n_min, n_max, num_candidates

    def propose(self, context: list[int], k: int) -> CandidateTree:
        if k <= 0:
            return CandidateTree()
        for n in range(min(self.n_max, len(context) - 1), self.n_min - 1, -1):
            suffix = context[-n:]
            candidates: list[list[int]] = []
            for start in range(len(context) - n - 1, -1, -1):  # most recent occurrence first
                if context[start : start + n] == suffix:
                    continuation = context[start + n : start + n + k]
                    if continuation and continuation not in candidates:
                        candidates.append(continuation)
                        if len(candidates) == self.num_candidates:
                            break
            if candidates:
                return CandidateTree.from_sequences(candidates)
        return CandidateTree()
