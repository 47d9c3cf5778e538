"""End to end through the gRPC servers: sampled text has exactly the target's distribution.

A draft that disagrees with the target (total variation about 0.35 on the first token) and the
target run as servers; many seeded generations of 3 tokens are compared with the target's exact
distribution over 3-token continuations (enumerated on the target model) by a chi-square test.
The seeds are fixed and every random number is keyed by (seed, position), so each run of this
test draws the same sample: it cannot flake, and the draw count is shown to be large enough to
catch a 2% shift, and the test to catch a broken residual rule.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from services.model_loading import load_model
from services.rpc.specwire.v1 import draft_pb2, target_pb2
from services.sampling import target_probs
from target_node.kernels import TorchKernels
from target_node.kernels.torch_ref import inverse_cdf
from tests.parallel import run_side_by_side, selected_params
from tests.tiny_models import build_model

PROMPT = "The quick brown fox"
SAMPLING = target_pb2.SamplingParams(temperature=1.0, top_k=3)
LENGTH = 3
DRAWS = 4000
ALPHA_Z = 2.326  # one-sided normal quantile of alpha = 0.01

Outcome = tuple[int, ...]


@pytest.fixture(scope="module")
def draft_disagreeing(tiny, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The target's weights plus noise: same top tokens in part, different probabilities."""
    root = tmp_path_factory.mktemp("disagreeing")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.target)
    return str(build_model(root / "draft", tokenizer, seed=4, perturb_from=Path(tiny.target), noise=0.04))


@torch.inference_mode()
def exact_distribution(model, prompt_ids: list[int], eos: int) -> dict[Outcome, float]:
    """Probability of every continuation of up to LENGTH tokens (ending early at EOS)."""
    frontier: list[tuple[Outcome, float]] = [((), 1.0)]
    done: dict[Outcome, float] = {}
    while frontier:
        outcome, mass = frontier.pop()
        if len(outcome) == LENGTH or (outcome and outcome[-1] == eos):
            done[outcome] = mass
            continue
        logits = model(torch.tensor([prompt_ids + list(outcome)])).logits[0, -1]
        probs = target_probs(logits, SAMPLING)
        frontier += [((*outcome, int(t)), mass * float(probs[t])) for t in probs.nonzero().flatten()]
    return done


def chi_square(counts: Counter, probs: dict[Outcome, float], draws: int) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; outcomes expected fewer than 5 times share a bin."""
    stat, df, rest_expected, rest_seen = 0.0, -1, 0.0, 0
    for outcome, p in probs.items():
        expected = p * draws
        if expected < 5:
            rest_expected, rest_seen = rest_expected + expected, rest_seen + counts[outcome]
            continue
        stat, df = stat + (counts[outcome] - expected) ** 2 / expected, df + 1
    unknown = sum(c for o, c in counts.items() if o not in probs)  # impossible under the target
    if rest_expected > 0 or unknown:
        stat, df = stat + (rest_seen + unknown - rest_expected) ** 2 / max(rest_expected, 1e-9), df + 1
    return stat, df


def critical_value(df: int) -> float:
    """Chi-square quantile at 1 - alpha (Wilson-Hilferty approximation)."""
    h = 2 / (9 * df)
    return df * (1 - h + ALPHA_Z * math.sqrt(h)) ** 3


def fits(counts: Counter, probs: dict[Outcome, float], draws: int) -> bool:
    stat, df = chi_square(counts, probs, draws)
    return stat < critical_value(df)


def draw(pair, draws: int, **request: object) -> Counter:
    """`draws` generations with seeds 0..draws-1, four at a time, as outcomes."""

    def one(seed: int) -> Outcome:
        chunks = pair.draft_stub.Generate(
            draft_pb2.GenerateRequest(
                prompt=PROMPT,
                max_tokens=LENGTH,
                temperature=SAMPLING.temperature,
                top_k=SAMPLING.top_k,
                seed=seed,
                num_speculative_tokens=2,
                **request,
            )
        )
        return tuple(t for chunk in chunks for t in chunk.token_ids)

    with ThreadPoolExecutor(4) as pool:
        return Counter(pool.map(one, range(draws)))


@pytest.fixture(scope="module")
def target_distribution(target_model) -> dict[Outcome, float]:
    probs = exact_distribution(
        target_model.model, target_model.tokenizer.encode(PROMPT), target_model.tokenizer.eos_token_id
    )
    assert abs(sum(probs.values()) - 1) < 1e-5
    return probs


def power(target_distribution: dict[Outcome, float], to_rank: int) -> float:
    """How often DRAWS draws from the target's distribution with 2% of the mass moved from the
    likeliest outcome to the `to_rank`-th likeliest fail the test."""
    outcomes = sorted(target_distribution, key=target_distribution.get, reverse=True)
    shifted = torch.tensor([target_distribution[o] for o in outcomes], dtype=torch.float64)
    shifted[0] -= 0.02
    shifted[to_rank] += 0.02
    gen = torch.Generator().manual_seed(0)
    caught = 0
    for _ in range(200):
        picks = torch.multinomial(shifted, DRAWS, replacement=True, generator=gen).tolist()
        caught += not fits(Counter(outcomes[i] for i in picks), target_distribution, DRAWS)
    return caught / 200


def test_draw_count_detects_a_two_percent_shift(target_distribution):
    """A 2% shift to an outcome of median probability is caught almost always; between the two
    likeliest outcomes (the hardest place to see it) most of the time."""
    assert power(target_distribution, len(target_distribution) // 2) >= 0.95
    assert power(target_distribution, 1) >= 0.6


class ResidualIgnored(TorchKernels):
    """The classic bug: after every child is rejected, draw from p instead of norm(max(p - q, 0))."""

    def tree_rejection_sample(self, probs, trees, draft_q, accept_uniforms, sample_uniforms):
        result = super().tree_rejection_sample(probs, trees, draft_q, accept_uniforms, sample_uniforms)
        end = int(result.path_end[0])
        parents = trees.parents[0, : int(trees.num_nodes[0])].tolist()
        if end in parents:  # the path stopped at a node with children: all of them were rejected
            result.next_token[0] = inverse_cdf(probs[0, end + 1].float(), float(sample_uniforms[0]))
        return result


def sample(
    target: str,
    draft: str,
    draws: int,
    strategy: str,
    overrides: tuple[tuple[str, object], ...],
    broken: bool,
) -> tuple[Counter, float, float]:
    """`draws` generations through a pair of servers of its own (run in a worker process), with
    `ResidualIgnored` as the target's kernels if `broken`: the outcomes, and the target's accepted
    and verified token counts."""
    from tests.conftest import start_pair

    pair = start_pair(load_model(target), draft, **dict(overrides))
    try:
        if broken:
            pair.target.node.backend.kernels = ResidualIgnored()
        counts = draw(pair, draws, strategy=strategy)
        metrics = pair.target.node.metrics
        return counts, metrics.accepted_tokens._value.get(), metrics.nodes_verified._value.get()
    finally:
        pair.draft.stop(0)
        pair.target.stop(0)


def pair_overrides(proposer: str, pipeline: bool) -> tuple[tuple[str, object], ...]:
    overrides = dict(proposer=proposer, pipeline=pipeline)
    if proposer == "vllm":
        overrides.update(num_candidates=3, vllm_max_model_len=512)
    return tuple(overrides.items())


@pytest.fixture(scope="module")
def samples(request: pytest.FixtureRequest, tiny, draft_disagreeing) -> dict:
    """The draws of every selected test below, one pair of servers per core at a time (a pair in
    one process is bound by Python's lock to about one core): the same seeded requests and checks,
    in about half the wall time. Keyed by `sampled` / `broken_call`."""
    cases = selected_params(request, test_sampled_text_has_the_target_distribution)
    calls = [sampled(tiny, draft_disagreeing, **case) for case in cases]  # the longest first
    calls += [
        broken_call(tiny, draft_disagreeing)
        for _ in selected_params(request, test_broken_residual_rule_is_caught)
    ]
    return run_side_by_side(calls)


def sampled(tiny, draft: str, strategy: str, proposer: str, pipeline: bool) -> tuple:
    return sample, (tiny.target, draft, DRAWS, strategy, pair_overrides(proposer, pipeline), False)


def broken_call(tiny, draft: str) -> tuple:
    return sample, (tiny.target, draft, DRAWS // 4, "probabilistic", (("pipeline", True),), True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "proposer", "pipeline"),
    [("probabilistic", "vllm", True), ("probabilistic", "hf", False), ("gumbel", "hf", True)],
    ids=["probabilistic-vllm-N3-pipelined", "probabilistic-N1", "gumbel-N1-pipelined"],
)
def test_sampled_text_has_the_target_distribution(
    tiny, draft_disagreeing, target_distribution, samples, strategy, proposer, pipeline
):
    counts, accepted, verified = samples[sampled(tiny, draft_disagreeing, strategy, proposer, pipeline)]
    stat, df = chi_square(counts, target_distribution, DRAWS)
    assert stat < critical_value(df), (stat, df, counts.most_common(8))
    # the draft was really used: some tokens accepted, some not
    assert 0 < accepted < verified, (accepted, verified)


@pytest.mark.slow
def test_broken_residual_rule_is_caught(tiny, draft_disagreeing, target_distribution, samples):
    counts, _, _ = samples[broken_call(tiny, draft_disagreeing)]
    assert not fits(counts, target_distribution, DRAWS // 4)
