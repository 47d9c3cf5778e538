from __future__ import annotations

import math

import pytest

from services.candidate_tree import ROOT, CandidateTree, SparseProbs
from services.errors import InvalidArgument


def test_from_sequences_merges_shared_prefixes():
    tree = CandidateTree.from_sequences([[5, 6, 7], [5, 6, 8], [9]])
    assert tree.token_ids == [5, 6, 7, 8, 9]
    assert tree.parents == [ROOT, 0, 1, 1, ROOT]
    assert tree.depths() == [1, 2, 3, 3, 1]
    assert tree.path_to(3) == [0, 1, 3]


def test_proto_round_trip():
    tree = CandidateTree([ROOT, 0], [3, 4], [SparseProbs([3, 1], [0.75, 0.25]), SparseProbs([4], [1.0])])
    assert CandidateTree.from_proto(tree.to_proto()) == tree


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (CandidateTree([ROOT], [1, 2]), "parents"),
        (CandidateTree([0], [1]), "parent 0"),  # self-loop / cycle
        (CandidateTree([ROOT, 1], [1, 2]), "parent 1"),  # forward reference
        (CandidateTree([ROOT, -2], [1, 2]), "parent -2"),
        (CandidateTree([ROOT], [100]), "outside the vocabulary"),
        (CandidateTree([ROOT] * 9, [1] * 9), "limit is 8"),
        (CandidateTree([ROOT, 0], [1, 2], [SparseProbs([1], [1.0])]), "draft distributions"),
        (CandidateTree([ROOT], [1], [SparseProbs([1, 2], [1.0])]), "probs"),
        (CandidateTree([ROOT], [1], [SparseProbs([1], [-0.1])]), "negative"),
        (CandidateTree([ROOT], [1], [SparseProbs([1], [math.nan])]), "non-finite"),
        (CandidateTree([ROOT], [1], [SparseProbs([1, 2], [0.8, 0.7])]), "sums to"),
        (CandidateTree([ROOT], [1], [SparseProbs([1, 2], [0.5, 0.3])]), "sums to 0.8"),  # truncated q: biased
        (CandidateTree([ROOT], [1], [SparseProbs([100], [1.0])]), "outside the vocabulary"),
    ],
)
def test_validate_rejects_malformed_trees(tree, message):
    with pytest.raises(InvalidArgument, match=message):
        tree.validate(vocab_size=100, max_nodes=8)


def test_validate_accepts_empty_and_valid_trees():
    CandidateTree().validate(vocab_size=10, max_nodes=8)
    CandidateTree.from_sequences([[1, 2], [1, 3]]).validate(vocab_size=10, max_nodes=8)
