"""Sampling on either node: logits -> the distribution sampled from (temperature, top-k, top-p)."""

from __future__ import annotations

import torch

from services.errors import InvalidArgument
from services.limits import GREEDY_TEMPERATURE
from services.rpc.specwire.v1 import target_pb2


def check_sampling(sampling: target_pb2.SamplingParams) -> None:
    if not 0 <= sampling.temperature <= 100 or sampling.temperature != sampling.temperature:
        raise InvalidArgument(f"temperature must be in [0, 100], got {sampling.temperature}")
    if not 0 <= sampling.top_p <= 1 or sampling.top_p != sampling.top_p:
        raise InvalidArgument(f"top_p must be in [0, 1], got {sampling.top_p}")


def effective_sampling(sampling: target_pb2.SamplingParams) -> target_pb2.SamplingParams:
    """The checked parameters as both nodes use them: a temperature below GREEDY_TEMPERATURE is
    greedy (0), since dividing logits by it overflows to inf and gives NaN probabilities."""
    check_sampling(sampling)
    effective = target_pb2.SamplingParams()
    effective.CopyFrom(sampling)
    if effective.temperature < GREEDY_TEMPERATURE:
        effective.temperature = 0.0
    return effective


def target_probs(logits: torch.Tensor, sampling: target_pb2.SamplingParams) -> torch.Tensor:
    """Row-wise probabilities the target samples from; one-hot argmax when temperature is 0."""
    logits = logits.float()
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if 0 < sampling.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
