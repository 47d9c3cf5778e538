"""Lossless sampling by Gumbel-max coupling: accept a candidate when it is the target's own sample.

The target's token at every position is argmax(log p + g), with g keyed by (seed, position)
(services.token_noise): an exact sample from p. A candidate is accepted when it equals that
token, so the text is the target's own seeded sample: the same text the target alone produces
with this seed, whatever the draft, K, N, pipelining or resumes were. A draft that proposes
argmax(log q + g) with the same g (a coupled draft: the draft node does this for this strategy) is
accepted whenever the perturbed argmaxes agree, at least (1 - TV) / (1 + TV) of the time.
"""

from __future__ import annotations

import torch

from services.candidate_tree import CandidateTree
from services.token_noise import TokenNoise
from target_node.strategies.base import Decision, Strategy, decision_for


class GumbelStrategy(Strategy):
    name = "gumbel"
    lossless = True

    def evaluate_posterior(
        self, logits: torch.Tensor, tree: CandidateTree, noise: TokenNoise, position: int
    ) -> Decision:
        row_depths = [0, *tree.depths()]  # the row after a node at depth d decides position + d
        chosen = [self.sample_token(logits[row].float(), noise, position + d) for row, d in enumerate(row_depths)]
        acceptable = [token == chosen[parent + 1] for parent, token in zip(tree.parents, tree.token_ids, strict=True)]
        end = tree.longest_accepted_path_end(acceptable)
        return decision_for(tree, end, chosen[end + 1], acceptable)
