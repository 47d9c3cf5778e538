"""The small-row linear path: equal to F.linear for every row count it serves, row-invariant,
int8 weights within x's int16 rounding of their dequantized product (a prefill's rows in int8 too),
and speculative greedy output identical to the target alone with the kernels, the int8 draft and
the preallocated KV cache all on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.model_loading import load_model
from services.small_row_linear import (
    SmallRowLinear,
    cpu_extension,
    prepack_int8,
    quantize_int8,
    use_small_row_linears,
    weight_stationary_linear,
)
from tests.conftest import start_pair
from tests.helpers import collect, target_only_greedy

needs_kernel = pytest.mark.skipif(cpu_extension() is None, reason="no AVX2 CPU or no C++ compiler here")
ROWS = list(range(1, 65))


@needs_kernel
def test_prebuilt_kernel_loads_without_a_compiler(monkeypatch):
    """Runtime images carry no compiler: the kernel their build stage made must still load."""
    import services.cpu_extension as extensions

    monkeypatch.setattr(extensions.shutil, "which", lambda name: None)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **_: pytest.fail("torch's builder was called"))
    module = cpu_extension.__wrapped__()
    assert module is not None and module.__file__.endswith(".so")
    weight, x = torch.randn(64, 32), torch.randn(3, 32)
    torch.testing.assert_close(module.small_row_linear(x, weight, None), F.linear(x, weight))


@needs_kernel
@pytest.mark.parametrize("shape", [(300, 200), (257, 1536), (64, 13)])  # K not a multiple of 8: the tail
def test_kernel_equals_f_linear_for_rows_1_to_64(shape):
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(*shape, generator=gen), torch.randn(shape[0], generator=gen)
    for rows in ROWS:
        x = torch.randn(rows, shape[1], generator=gen)
        got = cpu_extension().small_row_linear(x, weight, bias)
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_kernel_rows_do_not_depend_on_each_other():
    """Bitwise: a row gives the same result alone or among others (greedy verify sees the very
    logits a decode step would)."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(515, 384, generator=gen)
    x = torch.randn(17, 384, generator=gen)
    alone = [cpu_extension().small_row_linear(x[i : i + 1], weight, None)[0] for i in range(len(x))]
    for rows in (2, 3, 5, 8, 13, 17):  # every x block size (1-6 rows) and split
        together = cpu_extension().small_row_linear(x[:rows], weight, None)
        for i in range(rows):
            assert torch.equal(alone[i], together[i])


@needs_kernel
def test_bf16_weights():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(301, 264, generator=gen).bfloat16()
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 264, generator=gen)
        torch.testing.assert_close(
            cpu_extension().small_row_linear(x.bfloat16(), weight, None).float(),
            F.linear(x, weight.float()),
            rtol=2e-2, atol=0.3,  # bf16 output rounding
        )  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("k", [264, 4867])  # K not a multiple of 16: the tail
def test_int8_weights_are_within_the_int16_rounding_of_x(k):
    """int8 W times x rounded to int16 (one scale per row): the error against the dequantized
    product is at most half an x step times sum |W|, rows stay independent of each other."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(301, k, generator=gen)
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and (weight - q.float() * scale[:, None]).abs().max() <= scale.max() / 2 + 1e-6
    dequantized = q.float() * scale[:, None]
    x = torch.randn(9, k, generator=gen) * torch.linspace(0.01, 100, 9)[:, None]  # rows of any magnitude
    x[0, 5] = 400.0  # an outlier channel widens its row's step
    got = cpu_extension().small_row_linear(x, q, None, scale)
    x_step = x.abs().amax(1, keepdim=True) / 32767
    bound = 0.5 * x_step * dequantized.abs().sum(1) + 1e-4 * F.linear(x.abs(), dequantized.abs())
    assert ((got - F.linear(x, dequantized)).abs() <= bound).all()
    for i in range(len(x)):
        assert torch.equal(cpu_extension().small_row_linear(x[i : i + 1], q, None, scale)[0], got[i])
    with pytest.raises(RuntimeError, match="scale"):
        cpu_extension().small_row_linear(x, q, None)


@needs_kernel
def test_int8_products_never_overflow_int32():
    """A long row of maximal weights and inputs: x's int16 range shrinks so no int32 lane overflows."""
    k = 70_000
    q, scale = torch.full((3, k), 127, dtype=torch.int8), torch.ones(3)
    x = torch.ones(2, k)
    torch.testing.assert_close(cpu_extension().small_row_linear(x, q, None, scale), torch.full((2, 3), 127.0 * k))


@needs_kernel
def test_int8_prefill_rows_run_the_same_int8_weights():
    """Past `max_rows` (a draft's prompt prefill) an int8 layer runs torch's quantized GEMM on its
    int8 weights: close to the dequantized product (x rounded to 7 bits per tensor), not the fp32
    weights' F.linear path, and the decode rows still go through the int16 kernel."""
    if prepack_int8(*quantize_int8(torch.ones(8, 8)), None) is None:
        pytest.skip("this torch has no quantized CPU engine")
    gen = torch.Generator().manual_seed(4)
    linear = nn.Linear(264, 301)
    layer = SmallRowLinear(linear, cpu_extension().small_row_linear, max_rows=8, int8=True)
    q, scale = layer.int8
    dequantized = q.float() * scale[:, None]
    x = torch.randn(1, 40, 264, generator=gen)
    with torch.inference_mode():
        got = layer(x)
        want = F.linear(x, dequantized, linear.bias)
        assert got.shape == (1, 40, 301)
        torch.testing.assert_close(got, want, rtol=0, atol=0.03 * float(want.abs().max()))
        assert not torch.equal(got, F.linear(x, linear.weight, linear.bias))  # not the fp32 path
        rows = layer(x[:, :3])  # few rows: the exact int16 kernel
        torch.testing.assert_close(rows, cpu_extension().small_row_linear(x[0, :3], q, linear.bias, scale)[None])


def test_torch_fallback_equals_f_linear():
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    for rows in ROWS:
        x = torch.randn(rows, 40, generator=gen)
        torch.testing.assert_close(weight_stationary_linear(x, weight, bias), F.linear(x, weight, bias))


def test_swap_keeps_parameters_and_outputs(tiny):
    model = load_model(tiny.target).model
    ids = torch.tensor([[5, 9, 30, 2, 44, 7]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        assert use_small_row_linears(model, 4) == 4
        swapped = [m for m in model.modules() if isinstance(m, SmallRowLinear)]
        assert swapped and not any(type(m) is nn.Linear for m in model.modules())
        assert use_small_row_linears(model) == 4  # a second call keeps the first choice
        got_prefill = model(input_ids=ids).logits  # 6 rows > 4: stock F.linear
        got_rows = torch.cat([model(input_ids=ids[:, : i + 1]).logits[:, -1:] for i in range(6)], dim=1)
    assert all(m.weight is not None for m in swapped)
    torch.testing.assert_close(got_prefill, want)
    torch.testing.assert_close(got_rows, want, rtol=1e-4, atol=1e-4)
    assert use_small_row_linears(load_model(tiny.target).model, 0) == 0  # off: left as it is


@needs_kernel
@pytest.mark.parametrize("pipeline", [False, True])
def test_greedy_identical_with_everything_on(tiny, pipeline):
    """Target kernels on for every verify (up to 64 rows), an int8 draft with its kernels, the
    preallocated caches, the node's default K: output equals the target alone running the same kernels."""
    target = load_model(tiny.target)
    use_small_row_linears(target.model, 64)  # the node keeps this choice (auto sees it done)
    pair = start_pair(target, tiny.draft_noisy, weights="int8", small_row_linear="64", pipeline=pipeline)
    try:
        assert pair.target.node.backend.small_row_limit == 64
        for prompt in ("def add(a, b):", "Natalia sold clips"):
            tokens, chunks = collect(pair.draft_stub, prompt=prompt, max_tokens=40)
            assert tokens == target_only_greedy(target, target.tokenizer.encode(prompt), 40), prompt
            assert any(c.stats.accepted_tokens for c in chunks if c.HasField("stats"))
    finally:
        pair.draft.stop(0)
        pair.target.stop(0)
