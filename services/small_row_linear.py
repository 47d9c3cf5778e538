"""Linear layers that read each weight once for a few rows (decode steps, verify trees) on a CPU.

A decode step or a verify of a small tree is memory-bound: its cost is streaming the weights.
Stock `F.linear` with 2-16 rows picks GEMM kernels that cost 2-3x one row on the 2-core machine
here, so a 4-row verify cost 2.4x a decode step. `cpu/small_row_linear.cpp` (AVX2 + FMA, JIT-built
once with torch's extension builder) streams W once for all rows: 4 rows cost about 1.2x one
row, and each row's result is bitwise the same whatever the other rows (greedy verify sees the
very logits a decode step would). Where it cannot be built (no compiler, no AVX2), the product is
computed weight-stationary with torch, `(W @ x.T).T`, which helps up to about 4 rows. Large row
counts (prefill) keep `F.linear`; the crossover is measured on the device at start-up.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from services.cpu_extension import load_extension

log = logging.getLogger(__name__)

CANDIDATE_ROWS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The AVX2 kernel, built on first use (about a minute) and then loaded from torch's extension
    cache; None where this CPU or machine cannot run or build it."""
    try:
        return load_extension("small_row_linear", ["small_row_linear.cpp"], ["-O3", "-mavx2", "-mfma", "-fopenmp"])
    except RuntimeError as exc:  # no compiler or headers: the torch fallback still works
        log.warning("small-row linear kernel not available (%s); using torch's weight-stationary product", exc)
        return None


def weight_stationary_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` of 2D `x` computed as `(W @ x.T).T` (W is the streamed operand): the fallback."""
    out = torch.mm(weight, x.t()).t()
    return out + bias if bias is not None else out


def small_row_kernel() -> LinearFn:
    """The fastest few-row product available here: the AVX2 kernel, else the torch fallback."""
    ext = cpu_extension()
    return ext.small_row_linear if ext is not None else weight_stationary_linear


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 with one float32 scale per output row: W ~= q * scale[:, None]."""
    scale = (weight.detach().float().abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(weight.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def prepack_int8(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> object | None:
    """The same int8 weights prepacked for torch's quantized GEMM (fbgemm/oneDNN: u8 x s8 products),
    so a draft's prompt prefill runs in int8 too: 3.5-4.7x fp32 `F.linear` for 200 rows of the 0.5B's
    layers on the 2-core AVX2 machine. None where this torch has no quantized CPU engine (torch
    marks its quantized tensors deprecated; without them prefill stays on fp32 `F.linear`)."""
    if not {"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines):
        return None
    zero_points = torch.zeros(len(scale), dtype=torch.long)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            return torch.ops.quantized.linear_prepack(weight, None if bias is None else bias.detach().float())
    except (AttributeError, RuntimeError) as exc:
        log.warning("int8 prefill not available in this torch (%s); draft prefill stays float32", exc)
        return None


class SmallRowLinear(nn.Module):
    """An `nn.Linear` (same parameters, shared) that uses `kernel` for up to `max_rows` rows; with
    `int8`, those rows read an int8 copy of the weight (a draft's choice: a quarter of fp32's bytes)
    and multiply it with each row rounded to int16 in integer arithmetic (exact int32 sums), and
    more rows (a prompt prefill) run torch's quantized GEMM on the same int8 weights, x rounded to
    7-bit unsigned with one scale for all rows (`reduce_range`: AVX2's u8 x s8 pair sums cannot
    saturate)."""

    def __init__(self, linear: nn.Linear, kernel: LinearFn, max_rows: int, int8: bool = False) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel, self.max_rows = kernel, max_rows
        self.int8 = quantize_int8(linear.weight) if int8 else None
        self.int8_prefill = prepack_int8(*self.int8, linear.bias) if self.int8 is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows:
            if self.int8_prefill is not None and x.dtype == torch.float32:
                return torch.ops.quantized.linear_dynamic(x, self.int8_prefill, True)
            return F.linear(x, self.weight, self.bias)
        x2d = x.reshape(rows, self.in_features)
        if self.int8 is not None:
            out = cpu_extension().small_row_linear(x2d, self.int8[0], self.bias, self.int8[1])
        else:
            out = self.kernel(x2d, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, max_rows={self.max_rows}, "
            f"int8={self.int8 is not None}"
        )


def _fastest_s(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Each function's fastest time of `repeats`, the functions taking turns: a node calibrates
    while the other node of a pair loads, and the fastest run is the one that load left alone."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@torch.inference_mode()
def calibrate(weight: torch.Tensor, kernel: LinearFn, repeats: int = 7) -> int:
    """The largest row count up to which `kernel` beats `F.linear` on this weight, every smaller
    candidate count included (1: never; one row is a matrix-vector product either way)."""
    max_rows = 1
    for rows in CANDIDATE_ROWS:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
        stock, own = _fastest_s([lambda x=x: F.linear(x, weight), lambda x=x: kernel(x, weight, None)], repeats)
        if own >= 0.95 * stock:
            break
        max_rows = rows
    return max_rows


def small_row_setting(value: str) -> int | None:
    """The `--small-row-linear` setting as `use_small_row_linears` takes it ("auto": None)."""
    return None if value == "auto" else int(value)


def largest_linear(model: nn.Module) -> nn.Linear | None:
    """The model's largest linear layer below its output head (an MLP projection), to calibrate on."""
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in name]
    return max(linears, key=lambda m: m.weight.numel(), default=None)


def use_small_row_linears(model: nn.Module, max_rows: int | None = None, int8: bool = False) -> int:
    """Swap every `nn.Linear` of a CPU `model` for a `SmallRowLinear` sharing its parameters.

    `max_rows` None measures the crossover on this machine (`calibrate`); 0 leaves the model as
    it is, and so does a model on another device. `int8` (drafts only: it changes the model's
    numbers) needs the AVX2 kernel and is ignored without it. Returns the row limit in use (0: off).
    """
    swapped = [m for m in model.modules() if isinstance(m, SmallRowLinear)]
    if swapped and max_rows is None:  # done before (a model shared by a node and a baseline)
        return swapped[0].max_rows
    probe = largest_linear(model)
    if probe is None or probe.weight.device.type != "cpu" or max_rows == 0:
        return 0
    kernel = small_row_kernel()
    if int8 and cpu_extension() is None:
        log.warning("int8 draft weights need the AVX2 kernel, which is not available here; keeping %s", probe.weight.dtype)
        int8 = False
    if max_rows is None:
        max_rows = calibrate(probe.weight, kernel)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, SmallRowLinear(child, kernel, max_rows, int8))
            elif isinstance(child, SmallRowLinear):
                child.max_rows = max_rows
    log.info(
        "small-row linears (%s%s) for up to %d rows",
        "AVX2 kernel" if cpu_extension() is not None else "torch weight-stationary",
        ", int8 weights" if int8 else "",
        max_rows,
    )
    return max_rows
