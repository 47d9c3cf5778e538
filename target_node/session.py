"""Per-generation state on the target (committed tokens, pending token, round counter) and its store.

The store bounds the number of sessions and closes idle ones after a TTL, so a draft that
vanishes never pins memory for long.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
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
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held for a round, and to close it
    closed: bool = False  # removed from the store (closed, expired, evicted): its rounds read NOT_FOUND

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
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes  # KV memory the sessions may hold together (0: no limit)
        self.size_of = size_of
        self._clock = clock
        self._on_remove = on_remove
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(18)

    def add(self, session: Session) -> None:
        self.expire()
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(f"the target holds {self.max_sessions} sessions already; retry later")
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

    def _close(self, session: Session, reason: str) -> None:
        """Release a session taken out of the store, after any round in flight on it (its lock)."""
        with session.lock:
            session.closed = True
            self._on_remove(session, reason)

    def evict_over_budget(self, keep: Session | None = None) -> list[str]:
        """Evict least recently used sessions (never `keep`, never one mid-round) until their KV
        memory fits the budget; their clients get NOT_FOUND and re-prefill elsewhere or later."""
        if not self.budget_bytes:
            return []
        evicted = []
        with self._lock:
            by_age = sorted(self._sessions.values(), key=lambda session: session.last_used)
            sizes = [self.size_of(session) for session in by_age]
            total = sum(sizes)
            for session, size in zip(by_age, sizes, strict=True):
                if total <= self.budget_bytes:
                    break
                if session is keep or session.lock.locked():
                    continue
                total -= size
                del self._sessions[session.session_id]
                evicted.append(session)
        for session in evicted:
            self._close(session, "evicted")
            log.info("session %s evicted: KV memory over the %d-byte budget", session.session_id, self.budget_bytes)
        return [session.session_id for session in evicted]

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
