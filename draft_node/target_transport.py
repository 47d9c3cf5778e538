"""What the draft engine talks to the target through: the gRPC `TargetClient` or the Modal
`ModalTargetClient`, two implementations of one small interface."""

from __future__ import annotations

from typing import Protocol

from services.candidate_tree import CandidateTree
from services.rpc.specwire.v1 import target_pb2


class VerifySession(Protocol):
    """One open target session: a verify call per round."""

    first_token_id: int  # the target's token after the prompt
    advised_draft_tokens: int | None  # the target's advice for the first round (None: none)

    def verify(self, tree: CandidateTree) -> target_pb2.VerifyResponse: ...

    def close(self) -> None: ...


class TargetTransport(Protocol):
    def info(self, wait_s: float | None = None) -> target_pb2.InfoResponse: ...

    def open_session(self, request: target_pb2.OpenSessionRequest) -> VerifySession: ...

    def close(self) -> None: ...


def first_round_advice(opened: target_pb2.OpenSessionResponse) -> int | None:
    """The advice an opened session carries for its first round (later ones come with each answer)."""
    return opened.advised_draft_tokens if opened.HasField("advised_draft_tokens") else None
