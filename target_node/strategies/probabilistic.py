"""Lossless sampling: recursive rejection sampling over siblings (SpecInfer / Leviathan-Chen / RSD).

At each accepted node the children are tried in order: child x (drafted from q) is accepted with
probability min(1, p(x) / q(x)); on rejection p <- norm(max(p - q, 0)) and the next sibling is
tried with its own q. When every child is rejected the next token is sampled from what is left
of p; when a leaf is reached, from the target's p at the leaf (the bonus token). The output then
has exactly the target's distribution, provided each node's q is the distribution its token was
drafted from (siblings without replacement); a node without q is a point mass. The walk itself is
the `tree_rejection_sample` kernel. Its uniforms are keyed by token position (services.token_noise):
a node's accept test by the position it would fill and its rank among its siblings, the final draw
by the round's first position, so a replayed round (resume) draws the same numbers. The text still
depends on the trie shapes (K, N); the `gumbel` strategy does not.
"""

from __future__ import annotations

import torch

from services.candidate_tree import CandidateTree
from services.errors import InvalidArgument
from services.sampling import target_probs
from services.token_noise import Stream, TokenNoise
from target_node.kernels import pack_draft_q, pack_trees
from target_node.strategies.base import Decision, Strategy, decision_for


def check_draft_q(tree: CandidateTree) -> None:
    """Refuse q that cannot be what the node was drafted from (the output would not be lossless)."""
    seen_siblings: dict[int, list[int]] = {}
    for node, (parent, token) in enumerate(zip(tree.parents, tree.token_ids, strict=True)):
        earlier = seen_siblings.setdefault(parent, [])
        if tree.draft_probs:
            q = dict(zip(tree.draft_probs[node].token_ids, tree.draft_probs[node].probs, strict=True))
            if q.get(token, 0.0) <= 0:
                raise InvalidArgument(f"node {node}: its token {token} has no mass in its draft q")
            if any(q.get(t, 0.0) > 1e-6 for t in earlier):
                raise InvalidArgument(
                    f"node {node}: draft q gives mass to an earlier sibling's token; the probabilistic "
                    "strategy needs siblings drafted without replacement"
                )
        earlier.append(token)


def accept_uniforms_for(tree: CandidateTree, noise: TokenNoise, position: int) -> torch.Tensor:
    """One uniform per node (one for an empty trie): the node at depth d that is the r-th child of
    its parent reads entry r of the ACCEPT stream at `position + d - 1`, the position it fills."""
    if not len(tree):
        return torch.zeros(1)
    rank: dict[int, int] = {}
    by_depth: dict[int, torch.Tensor] = {}
    uniforms = []
    depths = tree.depths()
    for parent, depth in zip(tree.parents, depths, strict=True):
        r = rank[parent] = rank.get(parent, -1) + 1
        if depth not in by_depth:
            width = depths.count(depth)
            by_depth[depth] = noise.uniform(position + depth - 1, Stream.ACCEPT, width)
        uniforms.append(by_depth[depth][r])
    return torch.stack(uniforms).float()


class ProbabilisticStrategy(Strategy):
    name = "probabilistic"
    lossless = True

    def evaluate_posterior(
        self, logits: torch.Tensor, tree: CandidateTree, noise: TokenNoise, position: int
    ) -> Decision:
        check_draft_q(tree)
        probs = target_probs(logits[: len(tree) + 1], self.sampling)
        accept_uniforms = accept_uniforms_for(tree, noise, position)[None]
        sample_uniforms = noise.uniform(position, Stream.RESIDUAL, 1).float()
        device = probs.device
        result = self.kernels.tree_rejection_sample(
            probs[None],
            pack_trees([tree], device),
            pack_draft_q([tree], device),
            accept_uniforms.to(device),
            sample_uniforms.to(device),
        )
        end = int(result.path_end[0])
        path = set(tree.path_to(end))
        return decision_for(tree, end, int(result.next_token[0]), [n in path for n in range(len(tree))])
