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


def without_nan(logits: torch.Tensor) -> torch.Tensor:
    """NaN logits as -inf: the first half of the greedy rule (see `top1`)."""
    return torch.where(logits.isnan(), float("-inf"), logits)


def top1(logits: torch.Tensor) -> torch.Tensor:
    """The one greedy rule of both nodes (the torch, Triton and CUDA verify kernels and the vLLM
    backend follow it too): along the last dim, the index of the largest logit, where NaN counts as
    -inf (never chosen over a number) and a tie, including a row with no number at all, goes to the
    lowest index. Output never depends on a kernel's reduction order or on how NaN compares."""
    return without_nan(logits).argmax(-1)  # torch.argmax returns the first maximal index


def target_probs(logits: torch.Tensor, sampling: target_pb2.SamplingParams) -> torch.Tensor:
    """Row-wise probabilities the target samples from; one-hot `top1` when temperature is 0. NaN
    logits get no mass; a row with no number at all is one-hot on index 0 (the greedy rule's token)."""
    logits = without_nan(logits.float())
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(top1(logits), logits.shape[-1]).to(logits.dtype)
    empty = logits.amax(-1, keepdim=True) == float("-inf")
    if empty.any():
        logits = torch.where(empty & (torch.arange(logits.shape[-1], device=logits.device) == 0), 0.0, logits)
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
