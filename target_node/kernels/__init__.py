"""Verify kernels for the target's hot path, chosen CUDA -> Triton -> torch reference.

`kernels=auto` takes the first backend that loads on the model's device; a forced choice
(`--kernels`, SPECWIRE_KERNELS) that cannot load is an error, not a silent fallback.
"""

from __future__ import annotations

import logging
import os

import torch

from target_node.kernels.base import (
    DraftQ,
    GreedyVerifyResult,
    RejectionResult,
    TreeBatch,
    VerifyKernels,
    pack_draft_q,
    pack_trees,
)
from target_node.kernels.torch_ref import TorchKernels

log = logging.getLogger(__name__)

KERNEL_CHOICES = ("auto", "cuda", "triton", "torch")

__all__ = [
    "KERNEL_CHOICES",
    "DraftQ",
    "GreedyVerifyResult",
    "RejectionResult",
    "TorchKernels",
    "TreeBatch",
    "VerifyKernels",
    "load_kernels",
    "pack_draft_q",
    "pack_trees",
]


def _load_cuda(device: torch.device, forced: bool) -> VerifyKernels:
    if device.type != "cuda":
        raise RuntimeError(f"the model is on {device}, not a CUDA device")
    from target_node.kernels.cuda_ext import CudaKernels

    return CudaKernels()


def _load_triton(device: torch.device, forced: bool) -> VerifyKernels:
    """On a CUDA device; elsewhere only when forced and under TRITON_INTERPRET=1 (tests: slow)."""
    if device.type != "cuda" and not (forced and os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(f"the model is on {device}; Triton runs there only under TRITON_INTERPRET=1")
    from target_node.kernels.triton_kernels import TritonKernels

    return TritonKernels()


LOADERS = {"cuda": _load_cuda, "triton": _load_triton}


def load_kernels(choice: str = "auto", device: torch.device | str = "cpu") -> VerifyKernels:
    """The verify kernels for tensors on `device`: `choice` forces one backend, 'auto' falls back."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {choice!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    device = torch.device(device)
    if choice == "torch":
        return TorchKernels()
    reasons = []
    for name in ("cuda", "triton") if choice == "auto" else (choice,):
        try:
            kernels = LOADERS[name](device, forced=choice != "auto")
        except Exception as exc:
            if choice != "auto":
                raise RuntimeError(f"kernels={choice} requested but unavailable: {exc}") from exc
            reasons.append(f"{name}: {exc}")
            continue
        log.info("verify kernels: %s", name)
        return kernels
    log.info("verify kernels: torch reference (%s)", "; ".join(reasons))
    return TorchKernels()
