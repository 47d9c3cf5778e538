"""Prompt-lookup (n-gram) proposer: no model; continue the context the way it continued before.

The longest suffix n-gram (n_max down to n_min) that occurred earlier in the context is looked up;
the tokens that followed its most recent occurrences become up to N distinct candidates. Proposals
are deterministic, so they carry no q (point masses for the probabilistic strategy).
"""

from __future__ import annotations

from threading import Event

from services.candidate_tree import CandidateTree


class NgramProposer:
    prefills_context = False

    def __init__(self, n_min: int = 1, n_max: int = 4) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, context: list[int], k: int, n: int = 1, stop: Event | None = None) -> CandidateTree:
        """Continuations of the context's latest n-gram seen before (`stop`: nothing to cut short)."""
        if k <= 0:
            return CandidateTree()
        for size in range(min(self.n_max, len(context) - 1), self.n_min - 1, -1):
            suffix = context[-size:]
            candidates: list[list[int]] = []
            for start in range(len(context) - size - 1, -1, -1):  # most recent occurrence first
                if context[start : start + size] == suffix:
                    continuation = context[start + size : start + size + k]
                    if continuation and continuation not in candidates:
                        candidates.append(continuation)
                        if len(candidates) == n:
                            break
            if candidates:
                return CandidateTree.from_sequences(candidates)
        return CandidateTree()
