"""Verification strategies, chosen per session by name."""

from __future__ import annotations

from services.errors import InvalidArgument
from services.rpc.specwire.v1 import target_pb2
from target_node.kernels import VerifyKernels
from target_node.strategies.base import Decision, Strategy
from target_node.strategies.deterministic import DeterministicStrategy
from target_node.strategies.gumbel import GumbelStrategy
from target_node.strategies.lossy import ThresholdStrategy, TopKStrategy, TypicalStrategy
from target_node.strategies.probabilistic import ProbabilisticStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        DeterministicStrategy,
        ProbabilisticStrategy,
        GumbelStrategy,
        ThresholdStrategy,
        TypicalStrategy,
        TopKStrategy,
    )
}
DEFAULT_STRATEGY = DeterministicStrategy.name

__all__ = ["DEFAULT_STRATEGY", "STRATEGIES", "Decision", "Strategy", "make_strategy"]


def make_strategy(
    name: str,
    sampling: target_pb2.SamplingParams,
    params: target_pb2.StrategyParams | None = None,
    kernels: VerifyKernels | None = None,
) -> Strategy:
    """Instantiate a strategy by name ('' means the default); raises InvalidArgument on bad input."""
    cls = STRATEGIES.get(name or DEFAULT_STRATEGY)
    if cls is None:
        raise InvalidArgument(f"unknown strategy {name!r}; available: {', '.join(sorted(STRATEGIES))}")
    return cls(sampling, params or target_pb2.StrategyParams(), kernels)
