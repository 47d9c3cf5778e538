"""Greedy verification: accept while the draft token equals the target's argmax (lossless for greedy).

The whole decision is the `tree_greedy_verify` kernel: argmax per row and the longest path of
matching tokens.
"""

from __future__ import annotations

import torch

from services.candidate_tree import CandidateTree
from services.errors import InvalidArgument
from services.rpc.specwire.v1 import target_pb2
from services.token_noise import TokenNoise
from target_node.kernels import pack_trees
from target_node.strategies.base import Decision, Strategy, decision_for


class DeterministicStrategy(Strategy):
    name = "deterministic"
    lossless = True

    def configure(self, params: target_pb2.StrategyParams) -> None:
        if self.sampling.temperature != 0:
            raise InvalidArgument(
                f"strategy 'deterministic' is greedy and needs temperature 0, got {self.sampling.temperature}"
            )

    def evaluate_posterior(
        self, logits: torch.Tensor, tree: CandidateTree, noise: TokenNoise, position: int
    ) -> Decision:
        rows = logits[: len(tree) + 1]
        result = self.kernels.tree_greedy_verify(rows[None], pack_trees([tree], rows.device))
        end = int(result.path_end[0])
        next_token = int(result.target_argmax[0, end + 1])
        return decision_for(tree, end, next_token, result.node_accepted[0, : len(tree)].tolist())
