"""One tie-break everywhere: the same tied logits give the same accepted path through every kernel,
strategy and the verifier's candidate ranking (`CandidateTree.longest_accepted_path_end`; equal
logits: services.sampling.top1's lowest token id)."""

from __future__ import annotations

import random

import pytest
import torch

from services.candidate_tree import ROOT, CandidateTree
from services.rpc.specwire.v1 import target_pb2
from services.token_noise import TokenNoise
from target_node.backends.base import RoundResult
from target_node.kernels import TorchKernels, load_kernels
from target_node.kernels.torch_ref import longest_path_end, root_paths
from target_node.strategies import make_strategy
from target_node.strategies.base import node_logprobs
from target_node.verifier import candidate_results

VOCAB = 16
GREEDY = target_pb2.SamplingParams(temperature=0)
KERNELS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.gpu),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def kernels_named(name: str):
    if name == "torch":
        return TorchKernels()
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return load_kernels(name, "cuda")


def tied_logits() -> torch.Tensor:
    """Row 0: tokens 3 and 5 tie for the top; every later row: token 7 on top."""
    logits = torch.zeros(5, VOCAB)
    logits[0, 3] = logits[0, 5] = 4.0
    logits[1:, 7] = 4.0
    return logits


def on(kernels_name: str, logits: torch.Tensor) -> torch.Tensor:
    return logits.cuda() if kernels_name != "torch" else logits


@pytest.mark.parametrize("kernels_name", KERNELS)
@pytest.mark.parametrize("strategy", ["deterministic", "gumbel", "probabilistic"])
def test_tied_top_logits_pick_the_lowest_token_on_every_greedy_route(kernels_name, strategy):
    kernels = kernels_named(kernels_name)
    tree = CandidateTree.from_sequences([[5, 7], [3, 7]])
    decision = make_strategy(strategy, GREEDY, kernels=kernels).evaluate_posterior(
        on(kernels_name, tied_logits()), tree, TokenNoise(0), 0
    )
    assert [tree.token_ids[n] for n in decision.accepted_nodes] == [3, 7]
    assert decision.next_token == 7 and decision.next_is_bonus


@pytest.mark.parametrize("kernels_name", KERNELS)
@pytest.mark.parametrize("strategy", ["deterministic", "gumbel", "topk", "threshold", "typical"])
def test_equally_long_paths_end_at_the_lowest_node_on_every_route(kernels_name, strategy):
    """Twin branches (the same tokens twice: a tree from the wire may hold them) are both accepted
    in full; every route ends at the lower node, and the verifier ranks that candidate first."""
    kernels = kernels_named(kernels_name)
    tree = CandidateTree(parents=[ROOT, ROOT, 1, 0], token_ids=[3, 3, 7, 7])
    logits = tied_logits()
    decision = make_strategy(strategy, GREEDY, kernels=kernels).evaluate_posterior(
        on(kernels_name, logits), tree, TokenNoise(0), 0
    )
    assert decision.accepted_nodes == [1, 2] == tree.path_to(tree.longest_accepted_path_end([True] * 4))
    ranked = candidate_results(tree, RoundResult(decision, node_logprobs(logits, tree).tolist(), 1))
    assert [r.leaf_node_id for r in ranked] == [2, 3]


def test_the_kernels_path_rule_is_the_trees():
    """The batched torch rule (used as the Triton/CUDA kernels' reference) against the one rule on
    random tries and acceptance masks."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 12)
        parents = [rng.randint(ROOT, i - 1) for i in range(n)]
        tree = CandidateTree(parents=parents, token_ids=[rng.randrange(VOCAB) for _ in range(n)])
        acceptable = [rng.random() < 0.7 for _ in range(n)]
        width = max(n, 1)
        accepted = torch.zeros(1, width, dtype=torch.bool)
        accepted[0, :n] = torch.tensor(acceptable, dtype=torch.bool)
        valid = torch.arange(width)[None] < n
        padded = torch.full((1, width), ROOT, dtype=torch.int32)
        padded[0, :n] = torch.tensor(parents, dtype=torch.int32)
        reach, depth = root_paths(accepted, padded, valid)
        end, _ = longest_path_end(reach, depth)
        assert int(end[0]) == tree.longest_accepted_path_end(acceptable), (parents, acceptable)


@pytest.mark.parametrize("strategy", ["topk", "threshold", "typical"])
def test_lossy_strategies_break_length_ties_by_node_index_not_likelihood(strategy):
    """Both root children are acceptable; the likelier one (token 5, node 1) loses to node 0, as in
    the kernels (an earlier rule preferred the higher logprob here)."""
    logits = torch.zeros(3, VOCAB)
    logits[0, 3], logits[0, 5] = 3.0, 3.5
    tree = CandidateTree.from_sequences([[3], [5]])
    params = target_pb2.StrategyParams(threshold=0.05, epsilon=0.05)
    decision = make_strategy(strategy, GREEDY, params).evaluate_posterior(logits, tree, TokenNoise(0), 0)
    assert decision.acceptable == [True, True] and decision.accepted_nodes == [0]
    ranked = candidate_results(tree, RoundResult(decision, node_logprobs(logits, tree).tolist(), 1))
    assert [r.leaf_node_id for r in ranked] == [0, 1]
