"""Strategies on synthetic logits: exactness of rejection sampling, monotone lossy rules."""

from __future__ import annotations

import pytest
import torch

from services.candidate_tree import ROOT, CandidateTree, SparseProbs
from services.errors import InvalidArgument
from services.rpc.specwire.v1 import target_pb2
from services.sampling import target_probs
from services.token_noise import Stream, TokenNoise
from target_node.strategies import make_strategy
from tests.parallel import run_side_by_side, selected_params

VOCAB = 8
NOISE = TokenNoise(0)
# chi-square critical values at p = 1e-3 for df = 1..7
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def chi_square_fits(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square goodness of fit over the support of `probs` (mass outside it must be 0)."""
    support = probs > 0
    if counts[~support].sum() > 0:
        return False
    if int(support.sum()) == 1:
        return True
    n = counts.sum()
    expected = probs[support] * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat < CHI2_CRIT[int(support.sum()) - 1]


def sample_without_replacement(
    q: torch.Tensor, count: int, gen: torch.Generator
) -> list[tuple[int, torch.Tensor]]:
    """`count` distinct tokens, each with the distribution it was drawn from."""
    drawn = []
    q = q.clone()
    for _ in range(count):
        token = int(torch.multinomial(q, 1, generator=gen))
        drawn.append((token, q.clone()))
        q[token] = 0
        q = q / q.sum()
    return drawn


def sparse(q: torch.Tensor) -> SparseProbs:
    ids = q.nonzero().flatten()
    return SparseProbs(ids.tolist(), q[ids].tolist())


def draft_tree(q_root: torch.Tensor, q_child: dict[int, torch.Tensor], width: int, gen: torch.Generator):
    """A depth-2 trie: `width` root children without replacement, one child each drawn from q_child."""
    tree = CandidateTree()
    for token, q in sample_without_replacement(q_root, width, gen):
        tree.parents.append(ROOT)
        tree.token_ids.append(token)
        tree.draft_probs.append(sparse(q))
        node = len(tree) - 1
        child_token = int(torch.multinomial(q_child[token], 1, generator=gen))
        tree.parents.append(node)
        tree.token_ids.append(child_token)
        tree.draft_probs.append(sparse(q_child[token]))
    return tree


def lossless_draws(name: str, width: int, sampling_bytes: bytes) -> tuple[torch.Tensor, ...]:
    """20,000 rounds of `name` over depth-2 tries of `width` root children (a worker process runs
    this): the logits, and counts of the first token and of the token after each first token."""
    sampling = target_pb2.SamplingParams.FromString(sampling_bytes)
    gen = torch.Generator().manual_seed(width)
    logits_root = torch.randn(VOCAB, generator=gen) * 1.5
    logits_after = {t: torch.randn(VOCAB, generator=gen) * 1.5 for t in range(VOCAB)}
    q_root = torch.randn(VOCAB, generator=gen).softmax(-1)
    q_child = {t: torch.randn(VOCAB, generator=gen).softmax(-1) for t in range(VOCAB)}
    strategy = make_strategy(name, sampling)
    draws = 20_000
    first = torch.zeros(VOCAB)
    second = torch.zeros(VOCAB, VOCAB)  # second[a] counts the token after first token a
    for draw in range(draws):
        tree = draft_tree(q_root, q_child, width, gen)
        rows = [logits_root] + [
            logits_after[t] for t in tree.token_ids
        ]  # a node's row: logits after its token
        decision = strategy.evaluate_posterior(torch.stack(rows), tree, TokenNoise(draw), 0)
        tokens = [tree.token_ids[n] for n in decision.accepted_nodes] + [decision.next_token]
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[0], tokens[1]] += 1
    return logits_root, logits_after, first, second


def point_mass_draws() -> tuple[torch.Tensor, torch.Tensor]:
    """n-gram drafts carry no q: every node is a point mass (20,000 rounds, in a worker process)."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, VOCAB, generator=gen)
    tree = CandidateTree([ROOT, ROOT], [2, 5])
    strategy = make_strategy("probabilistic", target_pb2.SamplingParams(temperature=1.0))
    counts = torch.zeros(VOCAB)
    for draw in range(20_000):
        decision = strategy.evaluate_posterior(logits, tree, TokenNoise(draw), 0)
        counts[([tree.token_ids[n] for n in decision.accepted_nodes] + [decision.next_token])[0]] += 1
    return logits, counts


def lossless_call(name: str, width: int, sampling: target_pb2.SamplingParams) -> tuple:
    return lossless_draws, (name, width, sampling.SerializeToString())


@pytest.fixture(scope="module")
def draws(request: pytest.FixtureRequest) -> dict:
    """The rounds of every selected case below, computed one per core (each is a few seconds of
    pure Python per thousand rounds): the same seeded draws and checks, about half the wall time."""
    lossless = selected_params(request, test_lossless_strategies_reproduce_target_distribution)
    calls = [lossless_call(**params) for params in sorted(lossless, key=lambda params: -params["width"])]
    calls += [(point_mass_draws, ()) for _ in selected_params(request, test_point_mass_drafts_are_lossless)]
    return run_side_by_side(calls)  # the longest first: the widest tries


@pytest.mark.parametrize(
    ("name", "width"), [("probabilistic", 1), ("probabilistic", 2), ("probabilistic", 3), ("gumbel", 3)]
)
@pytest.mark.parametrize(
    "sampling",
    [
        target_pb2.SamplingParams(temperature=1.0),
        target_pb2.SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
    ],
    ids=["t1", "t0.7-k5-p0.9"],
)
def test_lossless_strategies_reproduce_target_distribution(draws, name, width, sampling):
    logits_root, logits_after, first, second = draws[lossless_call(name, width, sampling)]
    assert chi_square_fits(first, target_probs(logits_root, sampling))
    for a in range(VOCAB):
        if second[a].sum() >= 2000:
            assert chi_square_fits(second[a], target_probs(logits_after[a], sampling)), a


def test_point_mass_drafts_are_lossless(draws):
    """n-gram drafts carry no q: every node is a point mass."""
    logits, counts = draws[point_mass_draws, ()]
    assert chi_square_fits(counts, logits[0].softmax(-1))


def test_chi_square_check_has_power():
    """Sampling from the draft's q instead of the target's p must be caught."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(VOCAB, generator=gen).softmax(-1)
    q = torch.randn(VOCAB, generator=gen).softmax(-1)
    counts = torch.bincount(
        torch.multinomial(q, 20_000, replacement=True, generator=gen), minlength=VOCAB
    ).float()
    assert not chi_square_fits(counts, p)
    counts = torch.bincount(
        torch.multinomial(p, 20_000, replacement=True, generator=gen), minlength=VOCAB
    ).float()
    assert chi_square_fits(counts, p)


def test_probabilistic_refuses_q_that_breaks_losslessness():
    strategy = make_strategy("probabilistic", target_pb2.SamplingParams(temperature=1.0))
    logits = torch.zeros(3, VOCAB)
    with_replacement = CandidateTree(
        [ROOT, ROOT], [1, 2], [SparseProbs([1, 2], [0.5, 0.5]), SparseProbs([1, 2], [0.5, 0.5])]
    )
    with pytest.raises(InvalidArgument, match="without replacement"):
        strategy.evaluate_posterior(logits, with_replacement, NOISE, 0)
    missing_own_token = CandidateTree([ROOT], [1], [SparseProbs([2], [1.0])])
    with pytest.raises(InvalidArgument, match="no mass"):
        strategy.evaluate_posterior(logits[:2], missing_own_token, NOISE, 0)


def test_deterministic_is_greedy_and_picks_longest_path():
    logits = torch.full((6, VOCAB), -5.0)
    # rows: 0 pending, 1.. nodes; target's argmax: after pending 3, after node0 (3) 4, after node1 (4) 1
    for row, best in enumerate([3, 4, 1, 0, 6, 2]):
        logits[row, best] = 5.0
    tree = CandidateTree.from_sequences([[3, 4, 7], [3, 2], [5]])  # nodes: 0:3 1:4 2:7 3:2 4:5
    decision = make_strategy("deterministic", target_pb2.SamplingParams()).evaluate_posterior(
        logits, tree, NOISE, 0
    )
    assert decision.accepted_nodes == [0, 1]
    assert decision.next_token == 1 and not decision.next_is_bonus
    assert decision.acceptable == [True, True, False, False, False]


def random_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, VOCAB, (4,), generator=gen).tolist() for _ in range(4)]
    tree = CandidateTree.from_sequences(sequences)
    return torch.randn(len(tree) + 1, VOCAB, generator=gen) * 2, tree


def total_accepted(name: str, params: target_pb2.StrategyParams, cases) -> int:
    strategy = make_strategy(name, target_pb2.SamplingParams(), params)
    return sum(
        len(strategy.evaluate_posterior(logits, tree, NOISE, 0).accepted_nodes)
        for logits, tree in cases
    )


@pytest.mark.parametrize(
    ("name", "sweep", "direction"),
    [
        ("threshold", [target_pb2.StrategyParams(threshold=t) for t in (0.01, 0.05, 0.1, 0.2, 0.4, 0.8)], -1),
        (
            "typical",
            [target_pb2.StrategyParams(epsilon=e, alpha=0.3) for e in (0.01, 0.05, 0.1, 0.3, 0.9)],
            -1,
        ),
        (
            "typical",
            [target_pb2.StrategyParams(epsilon=0.9, alpha=a) for a in (0.01, 0.1, 0.5, 1.0, 5.0)],
            -1,
        ),
        ("topk", [target_pb2.StrategyParams(top_k=k) for k in (1, 2, 3, 5, 8)], +1),
    ],
)
def test_lossy_acceptance_is_monotone_in_threshold(name, sweep, direction):
    cases = [random_case(seed) for seed in range(60)]
    accepted = [total_accepted(name, params, cases) for params in sweep]
    assert all(direction * (b - a) >= 0 for a, b in zip(accepted, accepted[1:], strict=False)), accepted
    assert accepted[0] != accepted[-1], "the sweep should change acceptance"


@pytest.mark.parametrize(
    ("name", "sampling", "params"),
    [
        ("deterministic", target_pb2.SamplingParams(temperature=0.5), None),
        ("probabilistic", target_pb2.SamplingParams(temperature=-1), None),
        ("probabilistic", target_pb2.SamplingParams(temperature=1, top_p=1.5), None),
        ("threshold", target_pb2.SamplingParams(), target_pb2.StrategyParams(threshold=2)),
        ("typical", target_pb2.SamplingParams(), target_pb2.StrategyParams(epsilon=3)),
        ("nope", target_pb2.SamplingParams(), None),
    ],
)
def test_bad_strategy_parameters(name, sampling, params):
    with pytest.raises(InvalidArgument):
        make_strategy(name, sampling, params)


def test_token_noise_is_a_function_of_its_key():
    noise = TokenNoise(11)
    a = noise.uniform(40, Stream.SAMPLE, 5)
    assert torch.equal(a, TokenNoise(11).uniform(40, Stream.SAMPLE, 5))
    assert torch.equal(a[:3], noise.uniform(40, Stream.SAMPLE, 3))  # a prefix of the same list
    for other in (TokenNoise(12).uniform(40, Stream.SAMPLE, 5), noise.uniform(41, Stream.SAMPLE, 5)):
        assert not torch.equal(a, other)
    assert not torch.equal(a, noise.uniform(40, Stream.ACCEPT, 5))
    assert ((a > 0) & (a < 1)).all()


def test_token_noise_samples_exactly():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0, 0.0, 0.0, 0.0])
    counts = torch.zeros(VOCAB)
    for position in range(20_000):
        counts[TokenNoise(3).sample(probs, position)] += 1
    assert chi_square_fits(counts, probs)


def test_gumbel_text_is_the_targets_own_sample_whatever_the_trie():
    """Under `gumbel` the committed tokens are the target's seeded samples: an empty trie (the
    target alone), a chain and a wide trie of any tokens give the same first token, and a chain
    that guesses the target's samples is accepted whole."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, VOCAB, generator=gen)
    strategy = make_strategy("gumbel", target_pb2.SamplingParams(temperature=1.0))
    for seed in range(50):
        noise = TokenNoise(seed)
        alone = strategy.evaluate_posterior(logits[:1], CandidateTree(), noise, 7).next_token
        assert alone == strategy.sample_token(logits[0], noise, 7)
        wide = CandidateTree.from_sequences([[t] for t in range(VOCAB)])
        decision = strategy.evaluate_posterior(logits[:1].expand(VOCAB + 1, -1), wide, noise, 7)
        assert [wide.token_ids[n] for n in decision.accepted_nodes] == [alone]
        wrong = CandidateTree.from_sequences([[(alone + 1) % VOCAB, 0, 0]])
        decision = strategy.evaluate_posterior(logits[:4], wrong, noise, 7)
        assert decision.accepted_nodes == [] and decision.next_token == alone
    # a chain of the target's own samples (row r follows the chain's r-th token) is accepted whole
    noise = TokenNoise(99)
    chain = [strategy.sample_token(logits[r], noise, 7 + r) for r in range(3)]
    decision = strategy.evaluate_posterior(logits[:4], CandidateTree.from_sequences([chain]), noise, 7)
    assert decision.accepted_nodes == [0, 1, 2] and decision.next_is_bonus
    assert decision.next_token == strategy.sample_token(logits[3], noise, 10)
