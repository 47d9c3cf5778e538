"""The candidate trie a draft sends each round: parent index + token per node, optional sparse q.

N sampled continuations share prefixes; merging them into a trie means the target computes each
shared prefix once. Node order is topological (a parent precedes its children).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.errors import InvalidArgument
from services.limits import MAX_Q_SUPPORT
from services.rpc.specwire.v1 import target_pb2

ROOT = -1  # parent index of the nodes that follow the pending token


@dataclass
class SparseProbs:
    token_ids: list[int]
    probs: list[float]


@dataclass
class CandidateTree:
    parents: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    draft_probs: list[SparseProbs] = field(default_factory=list)  # empty, or one per node

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> CandidateTree:
        """Merge candidate token sequences into a trie (identical prefixes become one path)."""
        tree = cls()
        children: dict[tuple[int, int], int] = {}
        for sequence in sequences:
            parent = ROOT
            for token in sequence:
                node = children.get((parent, token))
                if node is None:
                    node = len(tree.token_ids)
                    tree.parents.append(parent)
                    tree.token_ids.append(int(token))
                    children[(parent, token)] = node
                parent = node
        return tree

    def depths(self) -> list[int]:
        """Depth of each node (children of the pending token have depth 1)."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent == ROOT else depths[parent] + 1)
        return depths

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root's child down to `node`."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def leading_path(self) -> list[int]:
        """The first candidate's nodes (lowest-index child at each step): the proposer's most likely path."""
        path: list[int] = []
        for node, parent in enumerate(self.parents):
            if parent == (path[-1] if path else ROOT):
                path.append(node)
        return path

    def longest_accepted_path_end(self, acceptable: Sequence[bool]) -> int:
        """End node of the longest root path whose nodes are all acceptable (ROOT if none): THE
        tie-break of every verify path (strategies, backends, the torch/Triton/CUDA kernels, the
        verifier's candidate ranking): among equally long paths, the lowest end node index."""
        best, best_depth = ROOT, 0
        depth: list[int] = []  # depth of the node's fully acceptable root path, 0 where there is none
        for node, parent in enumerate(self.parents):
            above = 0 if parent == ROOT else depth[parent]
            reachable = acceptable[node] and (parent == ROOT or above > 0)
            depth.append(above + 1 if reachable else 0)
            if depth[node] > best_depth:  # strictly longer: an equal one found later has a higher index
                best, best_depth = node, depth[node]
        return best

    def truncated(self, max_depth: int) -> CandidateTree:
        """The trie without nodes deeper than `max_depth` (a prefix of the node order stays valid)."""
        depths = self.depths()
        keep = [i for i in range(len(self)) if depths[i] <= max_depth]
        index = {old: new for new, old in enumerate(keep)}
        return CandidateTree(
            [ROOT if self.parents[i] == ROOT else index[self.parents[i]] for i in keep],
            [self.token_ids[i] for i in keep],
            [self.draft_probs[i] for i in keep] if self.draft_probs else [],
        )

    def subtree(self, root: int) -> CandidateTree:
        """The candidates below node `root`, re-indexed so that its children hang off ROOT."""
        index = {root: ROOT}
        sub = CandidateTree()
        for node, parent in enumerate(self.parents):
            if parent in index and node != root:
                index[node] = len(sub)
                sub.parents.append(index[parent])
                sub.token_ids.append(self.token_ids[node])
                if self.draft_probs:
                    sub.draft_probs.append(self.draft_probs[node])
        return sub

    def validate(self, vocab_size: int, max_nodes: int) -> None:
        """Raise InvalidArgument for any malformed trie; afterwards the trie is safe to index."""
        check_tree_sizes(self, max_nodes)
        n = len(self.token_ids)
        if len(self.parents) != n:
            raise InvalidArgument(f"tree has {len(self.parents)} parents but {n} tokens")
        for i, (parent, token) in enumerate(zip(self.parents, self.token_ids, strict=True)):
            if not ROOT <= parent < i:
                raise InvalidArgument(f"node {i}: parent {parent} must be -1 or an earlier node (0..{i - 1})")
            if not 0 <= token < vocab_size:
                raise InvalidArgument(f"node {i}: token id {token} outside the vocabulary [0, {vocab_size})")
        if self.draft_probs and len(self.draft_probs) != n:
            raise InvalidArgument(f"tree has {len(self.draft_probs)} draft distributions for {n} nodes")
        for i, q in enumerate(self.draft_probs):
            if len(q.token_ids) != len(q.probs):
                raise InvalidArgument(
                    f"node {i}: draft q has {len(q.token_ids)} ids but {len(q.probs)} probs"
                )
            if any(not 0 <= t < vocab_size for t in q.token_ids):
                raise InvalidArgument(f"node {i}: draft q has a token id outside the vocabulary")
            if any(not math.isfinite(p) or p < 0 for p in q.probs):
                raise InvalidArgument(f"node {i}: draft q has a negative or non-finite probability")
            if abs(sum(q.probs) - 1) > 1e-3:  # a truncated q biases rejection sampling: it must be whole
                raise InvalidArgument(
                    f"node {i}: draft q sums to {sum(q.probs):.6f}; send the whole distribution the token was "
                    "drawn from (a top-k/top-p truncated q renormalised over its support)"
                )

    def to_proto(self) -> target_pb2.CandidateTree:
        return target_pb2.CandidateTree(
            parents=self.parents,
            token_ids=self.token_ids,
            draft_probs=[
                target_pb2.SparseDistribution(token_ids=q.token_ids, probs=q.probs) for q in self.draft_probs
            ],
        )

    @classmethod
    def from_proto(cls, message: target_pb2.CandidateTree) -> CandidateTree:
        return cls(
            parents=list(message.parents),
            token_ids=list(message.token_ids),
            draft_probs=[SparseProbs(list(q.token_ids), list(q.probs)) for q in message.draft_probs],
        )


def check_tree_sizes(tree: CandidateTree | target_pb2.CandidateTree, max_nodes: int) -> None:
    """Refuse a trie (a CandidateTree or its message: they share field names) with more nodes than
    `max_nodes` or a q with more entries than MAX_Q_SUPPORT. Only lengths are read, so a huge
    message is refused before any loop over it."""
    nodes = max(len(tree.token_ids), len(tree.parents), len(tree.draft_probs))
    if nodes > max_nodes:
        raise InvalidArgument(f"tree has {nodes} nodes; the limit is {max_nodes}")
    for i, q in enumerate(tree.draft_probs):
        if max(len(q.token_ids), len(q.probs)) > MAX_Q_SUPPORT:
            raise InvalidArgument(
                f"node {i}: draft q has {max(len(q.token_ids), len(q.probs))} entries; the limit is {MAX_Q_SUPPORT}"
            )
