"""What a verifier backend does: prefill a session and judge one round's trie."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from services.candidate_tree import CandidateTree
from services.memory import available_memory_bytes
from target_node.kernels import TorchKernels, VerifyKernels
from target_node.session import Session
from target_node.strategies import Decision


@dataclass
class RoundResult:
    decision: Decision
    node_logprobs: list[float]  # target logprob (temperature 1) of every node's token
    batch_size: int  # verify requests that shared the forward pass
    next_logprob: float | None = None  # target logprob (temperature 1) of the next token, where known


class VerifyBackend(ABC):
    vocab_size: int  # size of the target's logits
    max_context: int  # the model's position limit
    strategies: tuple[str, ...]  # strategy names this backend can run
    kernels: VerifyKernels = TorchKernels()  # verify kernels for tensors on this backend's device

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """Backend, attention and kernel implementation in use (exported as an info metric)."""

    def session_bytes(self, session: Session) -> int:
        """Memory this backend holds for a session (its KV cache)."""
        return 0

    def prefill_bytes(self, num_tokens: int) -> int:
        """Memory a new session of `num_tokens` will hold after its prefill, known before it runs
        (so a target without room refuses the session instead of paying for the prefill)."""
        return 0

    def shared_cache_bytes(self) -> int:
        """Memory held by caches shared across sessions (a prefix cache)."""
        return 0

    def shrink_shared_caches(self, nbytes: int) -> int:
        """Free at least `nbytes` of the shared caches if they hold that much; returns bytes freed."""
        return 0

    def free_memory_bytes(self) -> int:
        """Memory available to this backend's caches now (the default budget is a share of it)."""
        return available_memory_bytes()

    @abstractmethod
    def prefill(self, session: Session) -> int:
        """Run the session's prompt (`session.token_ids`); return the target's first token."""

    @abstractmethod
    def verify(self, session: Session, tree: CandidateTree) -> RoundResult:
        """Judge `pending + tree` on top of the session's context; keep the accepted path's state.

        On failure the session's state must be as before the call.
        """

    def close(self, session: Session) -> None:  # noqa: B027 - optional hook
        """Release per-session state (default: nothing beyond the session object)."""

    def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop background work."""
