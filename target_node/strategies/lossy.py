"""Lossy node-wise rules (faster, not the target's exact distribution): threshold, typical, topk.

Acceptance is judged on softmax(logits / T) (T = 1 when sampling greedily).
"""

from __future__ import annotations

import torch

from services.errors import InvalidArgument
from services.rpc.specwire.v1 import target_pb2
from services.sampling import without_nan
from target_node.strategies.base import NodewiseStrategy


def _acceptance_probs(logits: torch.Tensor, sampling: target_pb2.SamplingParams) -> torch.Tensor:
    return (without_nan(logits) / (sampling.temperature or 1.0)).softmax(-1)


class ThresholdStrategy(NodewiseStrategy):
    name = "threshold"
    lossless = False

    def configure(self, params: target_pb2.StrategyParams) -> None:
        self.threshold = params.threshold or 0.09
        if not 0 < self.threshold <= 1:
            raise InvalidArgument(f"threshold must be in (0, 1], got {self.threshold}")

    def accept(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        probs = _acceptance_probs(logits, self.sampling)
        return probs.gather(-1, tokens[:, None])[:, 0] >= self.threshold


class TypicalStrategy(NodewiseStrategy):
    """Medusa's typical acceptance: p(x) > min(epsilon, alpha * exp(-entropy))."""

    name = "typical"
    lossless = False

    def configure(self, params: target_pb2.StrategyParams) -> None:
        self.epsilon = params.epsilon or 0.09
        self.alpha = params.alpha or 0.3
        if not 0 < self.epsilon <= 1 or not 0 < self.alpha:
            raise InvalidArgument(
                f"typical needs 0 < epsilon <= 1 and alpha > 0, got {self.epsilon}, {self.alpha}"
            )

    def accept(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        probs = _acceptance_probs(logits, self.sampling)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        bound = torch.minimum(torch.full_like(entropy, self.epsilon), self.alpha * torch.exp(-entropy))
        return probs.gather(-1, tokens[:, None])[:, 0] > bound


class TopKStrategy(NodewiseStrategy):
    name = "topk"
    lossless = False

    def configure(self, params: target_pb2.StrategyParams) -> None:
        self.k = params.top_k or 3

    def accept(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        k = min(self.k, logits.shape[-1])
        return (without_nan(logits).topk(k, dim=-1).indices == tokens[:, None]).any(-1)
