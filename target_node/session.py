"""Per-generation state on the target (committed tokens, pending token, round counter) and its store.

The store bounds the number of sessions and closes idle ones after a TTL, so a draft that
vanishes never pins memory for long. It also keeps one memory budget over the sessions' KV caches
and the backend's shared caches (the prefix cache): a new session is admitted before its prefill
only if its bytes fit, after the shared caches and then idle sessions (least recently used first)
gave way; otherwise it is refused at once, so a full target never pays for a prefill it refuses.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from services.errors import NotFound, ResourceExhausted
from services.token_noise import TokenNoise
from target_node.strategies import Strategy

log = logging.getLogger(__name__)


ANONYMOUS = "anonymous"  # the caller when neither API keys nor client certificates are in use


@dataclass
class Session:
    session_id: str
    token_ids: list[int]  # committed context: prompt + accepted tokens (the pending token excluded)
    strategy: Strategy  # holds the session's sampling and strategy parameters
    noise: TokenNoise  # every random number the session draws, keyed by token position
    pending_token: int = -1  # chosen by the target, not yet part of the context
    cache: Any = None  # backend state (HF: the DynamicCache over `token_ids`)
    cached_prefix: int = 0  # prompt tokens the prefill took from the prefix cache instead of computing
    next_round: int = 0
    owner: str = ANONYMOUS  # caller identity that opened it (services.security.caller_identity)
    lineage: str = ""  # rebuilt on a serverless replica: the id of the generation's first session
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held for a round, and to close it
    closed: bool = False  # removed from the store (closed, expired, evicted): its rounds read NOT_FOUND
    follows_advice: bool = True  # its draft follows the load advice (target_node/draft_advice.py)

    @property
    def context_length(self) -> int:
        return len(self.token_ids)


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_remove: Callable[[Session, str], None] = lambda session, reason: None,
        budget_bytes: int = 0,
        size_of: Callable[[Session], int] = lambda session: 0,
        shared_bytes: Callable[[], int] = lambda: 0,
        shrink_shared: Callable[[int], int] = lambda nbytes: 0,
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes  # memory the sessions and shared caches may hold together (0: no limit)
        self.size_of = size_of
        self.shared_bytes = shared_bytes  # what the backend's shared caches hold now
        self.shrink_shared = shrink_shared  # free at least that many bytes of them; returns what it freed
        self._clock = clock
        self._on_remove = on_remove
        self._sessions: dict[str, Session] = {}
        self._admitted = 0  # sessions admitted whose prefill is still running
        self._reserved = 0  # bytes those prefills will hold
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(18)

    @contextmanager
    def admit(self, nbytes: int) -> Iterator[None]:
        """Hold room for one more session that will take `nbytes` (its prefill runs inside), or raise
        ResourceExhausted at once: all sessions are taken, or its bytes do not fit the budget even
        after the shared caches and every idle session gave way."""
        self.expire()
        with self._lock:
            if len(self._sessions) + self._admitted >= self.max_sessions:
                raise ResourceExhausted(
                    f"the target holds {self.max_sessions} sessions already; retry later", self._retry_after_s()
                )
            evicted = self._make_room(nbytes, keep=None, refuse=True)
            self._admitted += 1
            self._reserved += nbytes
        self._close_evicted(evicted)
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1
                self._reserved -= nbytes

    def add(self, session: Session) -> None:
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(
                    f"the target holds {self.max_sessions} sessions already; retry later", self._retry_after_s()
                )
            session.last_used = self._clock()
            self._sessions[session.session_id] = session

    def get(self, session_id: str, owner: str = ANONYMOUS) -> Session:
        """The session, if `owner` opened it; another caller's session reads as unknown."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:
                raise NotFound(f"unknown or expired session {session_id!r}")
            session.last_used = self._clock()
            return session

    def remove(self, session_id: str, owner: str = ANONYMOUS) -> bool:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:
                return False
            del self._sessions[session_id]
        self._close(session, "closed")
        return True

    def remove_lineage(self, lineage: str, owner: str = ANONYMOUS) -> int:
        """Close `owner`'s sessions of one generation: the one first opened with id `lineage` and
        those rebuilt from it on this replica. Returns how many were closed."""
        with self._lock:
            found = [
                s for s in self._sessions.values() if s.owner == owner and lineage in (s.session_id, s.lineage)
            ]
            for session in found:
                del self._sessions[session.session_id]
        for session in found:
            self._close(session, "closed")
        return len(found)

    def _close(self, session: Session, reason: str) -> None:
        """Release a session taken out of the store, after any round in flight on it (its lock)."""
        with session.lock:
            session.closed = True
            self._on_remove(session, reason)

    def evict_over_budget(self, keep: Session | None = None) -> list[str]:
        """Evict least recently used sessions (never `keep`, never one mid-round) until their KV
        memory and the shared caches fit the budget, the shared caches first; evicted clients get
        NOT_FOUND and re-prefill elsewhere or later."""
        with self._lock:
            evicted = self._make_room(0, keep, refuse=False)
        self._close_evicted(evicted)
        return [session.session_id for session in evicted]

    def _make_room(self, nbytes: int, keep: Session | None, refuse: bool) -> list[Session]:
        """Under the lock: take idle sessions out of the store (least recently used first, after
        shrinking the shared caches) until everything plus `nbytes` fits the budget. With `refuse`,
        raise ResourceExhausted without touching anything when that cannot be done."""
        if not self.budget_bytes:
            return []
        by_age = sorted(self._sessions.values(), key=lambda session: session.last_used)
        sizes = {session.session_id: self.size_of(session) for session in by_age}
        shared = self.shared_bytes()
        excess = sum(sizes.values()) + shared + self._reserved + nbytes - self.budget_bytes
        if excess <= 0:
            return []
        idle = [s for s in by_age if s is not keep and not s.lock.locked()]
        if refuse and excess > shared + sum(sizes[s.session_id] for s in idle):
            raise ResourceExhausted(  # no hint: the sessions in use free up when their rounds end
                f"the target's memory budget ({self.budget_bytes} bytes) is taken by sessions in use; retry later"
            )
        excess -= self.shrink_shared(excess)
        evicted = []
        for session in idle:
            if excess <= 0:
                break
            excess -= sizes[session.session_id]
            del self._sessions[session.session_id]
            evicted.append(session)
        return evicted

    def _close_evicted(self, evicted: list[Session]) -> None:
        for session in evicted:
            self._close(session, "evicted")
            log.info("session %s evicted: memory over the %d-byte budget", session.session_id, self.budget_bytes)

    def _retry_after_s(self) -> float:
        """When the least recently used session would expire: a hint for a caller refused because
        every session is taken."""
        if not self._sessions:
            return 1.0
        oldest = min(session.last_used for session in self._sessions.values())
        return min(self.ttl_s, max(1.0, oldest + self.ttl_s - self._clock()))

    def snapshot(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def expire(self) -> list[str]:
        """Drop sessions idle for longer than the TTL; return their ids."""
        deadline = self._clock() - self.ttl_s
        with self._lock:
            expired = [s for s in self._sessions.values() if s.last_used < deadline and not s.lock.locked()]
            for session in expired:
                del self._sessions[session.session_id]
        for session in expired:
            self._close(session, "ttl")
            log.info("session %s expired after %.0fs idle", session.session_id, self.ttl_s)
        return [session.session_id for session in expired]

    def start_reaper(self) -> None:
        """Expire idle sessions in the background even when no request arrives."""

        def loop() -> None:
            while not self._stop.wait(min(self.ttl_s / 4, 30.0)):
                self.expire()

        self._reaper = threading.Thread(target=loop, name="session-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            self._close(session, "shutdown")
