"""An HF model as both nodes run it on a CPU: driven from its own compute thread (one OpenMP pool),
its linear layers swapped for small-row ones, with a prefix cache of prompt KV entries. The hf
target backend and the hf draft proposer each hold one."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from services.compute_thread import ComputeThread
from services.limits import mb_to_bytes
from services.prefix_cache import PrefixCache
from services.small_row_linear import small_row_setting, use_small_row_linears


@dataclass
class HFRuntime:
    compute: ComputeThread
    small_row_limit: int  # the most rows a linear computes row by row (0: stock linears)
    prefix_cache: PrefixCache

    @classmethod
    def start(cls, model: nn.Module, small_row_linear: str, prefix_cache_mb: float, name: str, int8: bool = False) -> HFRuntime:
        """`small_row_linear`: the nodes' `--small-row-linear` setting; `int8`: the linears read a
        weight-only int8 copy (the draft's `--weights int8`)."""
        compute = ComputeThread(name)
        limit = compute.run(use_small_row_linears, model, small_row_setting(small_row_linear), int8=int8)
        return cls(compute, limit, PrefixCache(mb_to_bytes(prefix_cache_mb)))
