"""Greedy verification: accept while the draft token equals the target's argmax (lossless for greedy)."""

from __future__ import annotations

import torch

from services.errors import InvalidArgument
from services.rpc.specwire.v1 import target_pb2
from target_node.strategies.base import NodewiseStrategy


class DeterministicStrategy(NodewiseStrategy):
    name = "deterministic"
    lossless = True

    def __init__(self, sampling: target_pb2.SamplingParams, params: target_pb2.StrategyParams) -> None:
        if sampling.temperature != 0:
            raise InvalidArgument(
                f"strategy 'deterministic' is greedy and needs temperature 0, got {sampling.temperature}"
            )
        super().__init__(sampling, params)

    def accept(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) == tokens
