"""Per-generation state on the target (KV cache, pending token, round counter) and its store.

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

import torch
from transformers import DynamicCache

from services.errors import NotFound, ResourceExhausted
from target_node.strategies import Strategy

log = logging.getLogger(__name__)


@dataclass
class Session:
    session_id: str
    cache: DynamicCache
    pending_token: int  # chosen by the target, not yet in `cache`
    strategy: Strategy  # holds the session's sampling and strategy parameters
    generator: torch.Generator
    next_round: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context_length(self) -> int:
        return self.cache.get_seq_length()


class SessionStore:
    def __init__(self, max_sessions: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
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

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise NotFound(f"unknown or expired session {session_id!r}")
            session.last_used = self._clock()
            return session

    def remove(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def expire(self) -> list[str]:
        """Drop sessions idle for longer than the TTL; return their ids."""
        deadline = self._clock() - self.ttl_s
        with self._lock:
            expired = [
                sid for sid, s in self._sessions.items() if s.last_used < deadline and not s.lock.locked()
            ]
            for sid in expired:
                del self._sessions[sid]
        for sid in expired:
            log.info("session %s expired after %.0fs idle", sid, self.ttl_s)
        return expired

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
            self._sessions.clear()
