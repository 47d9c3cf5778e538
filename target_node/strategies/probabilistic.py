"""Lossless sampling: recursive rejection sampling over siblings (SpecInfer / Leviathan-Chen / RSD).

At each accepted node the children are tried in order: child x (drafted from q) is accepted with
probability min(1, p(x) / q(x)); on rejection p <- norm(max(p - q, 0)) and the next sibling is
tried with its own q. When every child is rejected the next token is sampled from what is left
of p; when a leaf is reached, from the target's p at the leaf (the bonus token). The output then
has exactly the target's distribution, provided each node's q is the distribution its token was
drafted from (siblings without replacement); a node without q is a point mass.
"""

from __future__ import annotations

import torch

from services.candidate_tree import ROOT, CandidateTree, SparseProbs
from services.errors import InvalidArgument
from services.sampling import sample, target_probs
from target_node.strategies.base import Decision, Strategy


def dense_q(q: SparseProbs | None, token: int, vocab_size: int) -> torch.Tensor:
    dense = torch.zeros(vocab_size)
    if q is None:
        dense[token] = 1.0
    else:
        dense.index_put_(
            (torch.tensor(q.token_ids, dtype=torch.long),), torch.tensor(q.probs), accumulate=True
        )
    return dense


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


class ProbabilisticStrategy(Strategy):
    name = "probabilistic"
    lossless = True

    def evaluate_posterior(
        self, logits: torch.Tensor, tree: CandidateTree, generator: torch.Generator
    ) -> Decision:
        check_draft_q(tree)
        vocab_size = logits.shape[-1]
        children: dict[int, list[int]] = {}
        for node, parent in enumerate(tree.parents):
            children.setdefault(parent, []).append(node)
        path: list[int] = []
        node = ROOT
        while True:
            p = target_probs(logits[node + 1], self.sampling)
            kids = children.get(node, [])
            for child in kids:
                token = tree.token_ids[child]
                q = dense_q(tree.draft_probs[child] if tree.draft_probs else None, token, vocab_size)
                if torch.rand((), generator=generator) * q[token] < p[token]:  # u < p/q without dividing
                    path.append(child)
                    node = child
                    break
                residual = (p - q).clamp_min(0)
                total = residual.sum()
                p = residual / total if total > 0 else p
            else:
                acceptable = [False] * len(tree)
                for accepted in path:
                    acceptable[accepted] = True
                return Decision(
                    path, sample(p, generator), next_is_bonus=bool(path) and not kids, acceptable=acceptable
                )
