"""The verification-strategy interface: target logits over a trie in, accepted path + next token out.

Rows of `logits`: row 0 follows the pending token, row 1 + i follows trie node i, so node i is
judged on row `parents[i] + 1`. `position` is the index (in prompt + generated text) of the token
row 0 decides; the row after a node at depth d decides the token at `position + d`. Random numbers
come from `TokenNoise` keyed by those indices, never from a running stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from services.candidate_tree import CandidateTree
from services.rpc.specwire.v1 import target_pb2
from services.sampling import check_sampling, target_probs, top1
from services.token_noise import TokenNoise
from target_node.kernels import TorchKernels, VerifyKernels


@dataclass
class Decision:
    accepted_nodes: list[int]  # node ids of the accepted path, root to leaf
    next_token: int  # bonus token (whole candidate accepted) or correction
    next_is_bonus: bool
    acceptable: list[bool]  # per node: accepted by the strategy's rule (drives per-candidate stats)


def parent_rows(tree: CandidateTree, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row of `logits` each node is judged on."""
    return torch.tensor(tree.parents, dtype=torch.long, device=device) + 1


def node_logprobs(logits: torch.Tensor, tree: CandidateTree) -> torch.Tensor:
    """Target log-probability (temperature 1) of every node's token given its ancestors."""
    if not len(tree):
        return torch.zeros(0)
    rows = logits[parent_rows(tree, logits.device)].float().log_softmax(-1)
    return rows.gather(-1, torch.tensor(tree.token_ids, device=logits.device).unsqueeze(-1)).squeeze(-1)


class Strategy(ABC):
    """One instance per session: holds that session's sampling and strategy parameters."""

    name: ClassVar[str]
    lossless: ClassVar[bool]

    def __init__(
        self,
        sampling: target_pb2.SamplingParams,
        params: target_pb2.StrategyParams,
        kernels: VerifyKernels | None = None,
    ) -> None:
        check_sampling(sampling)
        self.sampling = sampling
        self.kernels = kernels or TorchKernels()
        self.configure(params)

    def configure(self, params: target_pb2.StrategyParams) -> None:  # noqa: B027 - optional hook
        """Read and check this strategy's own parameters (raise InvalidArgument)."""

    def sample_token(self, logits: torch.Tensor, noise: TokenNoise, position: int) -> int:
        """The target's own choice for the token at `position`: argmax when greedy, else Gumbel-max
        on the session's noise (the same token the target alone would draw with this seed)."""
        if self.sampling.temperature == 0:
            return int(top1(logits))
        return noise.sample(target_probs(logits, self.sampling), position)

    @abstractmethod
    def evaluate_posterior(
        self, logits: torch.Tensor, tree: CandidateTree, noise: TokenNoise, position: int
    ) -> Decision:
        """Pick the accepted path through `tree` and the target's next token."""


class NodewiseStrategy(Strategy):
    """Judge every node by a rule on its parent's row; the longest acceptable path wins (the one
    tie-break: `CandidateTree.longest_accepted_path_end`); the next token is sampled from the target
    at the path's end."""

    @abstractmethod
    def accept(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Bool per node: `logits` [n, vocab] are the rows the nodes follow, `tokens` [n] their tokens."""

    def evaluate_posterior(
        self, logits: torch.Tensor, tree: CandidateTree, noise: TokenNoise, position: int
    ) -> Decision:
        acceptable = []
        if len(tree):
            rows = logits[parent_rows(tree, logits.device)].float()
            acceptable = self.accept(rows, torch.tensor(tree.token_ids, device=logits.device)).tolist()
        best = tree.longest_accepted_path_end(acceptable)
        next_token = self.sample_token(logits[best + 1].float(), noise, position + len(tree.path_to(best)))
        return decision_for(tree, best, next_token, acceptable)


def decision_for(tree: CandidateTree, end: int, next_token: int, acceptable: list[bool]) -> Decision:
    """The Decision for accepting the root path ending at `end` (ROOT: nothing accepted)."""
    path = tree.path_to(end)
    return Decision(path, next_token, bool(path) and end not in set(tree.parents), acceptable)
