"""A generation's target session that survives target failures.

UNAVAILABLE (target down or restarting) is retried with jittered exponential backoff until a
deadline; NOT_FOUND (the target lost the session: a restart, or the TTL) is not retried as is.
In both cases the session is reopened by re-prefilling every committed token, with the pending
token carried over, and the round is replayed, so greedy output stays identical to an
uninterrupted run. RESOURCE_EXHAUSTED (a target or container full for now) is retried as is, with
the same backoff, waiting at least as long as the target's retry hint. Other errors (bad input)
are raised at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from draft_node.target_transport import TargetTransport
from services.candidate_tree import CandidateTree
from services.errors import retry_hint_s, rpc_status
from services.rpc.specwire.v1 import target_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)


@dataclass
class RetryPolicy:
    deadline_s: float = 30.0  # give up after this long without a successful call
    base_s: float = 0.1
    cap_s: float = 2.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (1-based): base * 2^(attempt-1), capped, +-50% jitter."""
        return min(self.cap_s, self.base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


class ResumableSession:
    def __init__(
        self,
        client: TargetTransport,
        prompt_ids: list[int],
        fingerprint: str,
        strategy: str,
        sampling: target_pb2.SamplingParams,
        retry: RetryPolicy,
        ignores_advice: bool = False,
    ) -> None:
        """`ignores_advice`: this generation will not follow the target's load advice (told to the
        target, which then leaves it out of what it measures)."""
        self.client, self.fingerprint, self.strategy, self.sampling, self.retry = (
            client,
            fingerprint,
            strategy,
            sampling,
            retry,
        )
        self.ignores_advice = ignores_advice
        self.context = list(prompt_ids)  # committed tokens; after opening, its last one is the pending token
        self.resumes = 0
        self.session = self._retrying(
            lambda: self.client.open_session(self._open_request(prompt_ids))
        )
        self.first_token_id = self.session.first_token_id
        self.context.append(self.first_token_id)

    @property
    def advised_draft_tokens(self) -> int | None:
        """The target's advice for the first round, given when the session opened."""
        return self.session.advised_draft_tokens

    def verify(self, tree: CandidateTree) -> target_pb2.VerifyResponse:
        response = self._retrying(
            lambda: self.session.verify(tree), resume=True
        )  # self.session may be reopened
        self.context += [*response.accepted_token_ids, response.next_token_id]
        return response

    def close(self) -> None:
        self.session.close()

    def _open_request(
        self, prompt_ids: list[int], resume_pending_token_id: int | None = None
    ) -> target_pb2.OpenSessionRequest:
        return target_pb2.OpenSessionRequest(
            prompt_token_ids=prompt_ids,
            tokenizer_fingerprint=self.fingerprint,
            strategy=self.strategy,
            sampling=self.sampling,
            resume_pending_token_id=resume_pending_token_id,
            ignores_advice=self.ignores_advice,
        )

    def _reopen(self) -> None:
        old = self.session
        self.session = self.client.open_session(
            self._open_request(self.context[:-1], resume_pending_token_id=self.context[-1])
        )
        self.resumes += 1
        log.warning("target session resumed (%d committed tokens re-prefilled)", len(self.context) - 1)
        old.close()

    def _retrying(self, call: Callable[[], T], resume: bool = False) -> T:
        deadline = time.monotonic() + self.retry.deadline_s
        attempt = 0
        needs_reopen = False
        while True:
            try:
                if needs_reopen:
                    self._reopen()
                    needs_reopen = False
                return call()
            except grpc.RpcError as exc:
                code, details = rpc_status(exc)
                full = code == grpc.StatusCode.RESOURCE_EXHAUSTED  # the same call may succeed later
                if not full and (code not in RESUMABLE or (code == grpc.StatusCode.NOT_FOUND and not resume)):
                    raise
                attempt += 1
                if time.monotonic() >= deadline:
                    log.error(
                        "target still failing after %.0fs: %s %s", self.retry.deadline_s, code.name, details
                    )
                    raise
                needs_reopen = needs_reopen if full else resume
                if code != grpc.StatusCode.NOT_FOUND:
                    wait = max(self.retry.delay(attempt), retry_hint_s(exc) or 0.0)
                    self.retry.sleep(min(wait, max(0.0, deadline - time.monotonic())))
