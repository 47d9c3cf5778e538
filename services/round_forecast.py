"""When each session's next round will arrive, so a forward can wait a little for it.

Rounds come from remote drafts: the moment a round is answered, its draft starts the next, and
that round reaches the target a gap later (the wire, plus drafting). A forward loop that starts
whenever something waits falls into phases: two sessions alternate, each alone in a forward,
and the weights are read twice for what one pass could serve (measured: two plain clients of
one CPU target got no more tokens a second than one). Waiting for a session whose round is due
within half a forward costs the sessions present that wait and saves the returning one a whole
forward, and the machine a weight pass. The gap of each session is measured (the time from an
answer to its next round), never assumed; a session not back well past its gap is not waited for.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable

ALPHA = 0.3  # weight of a new measurement in the running means
WAIT_FRACTION = 0.5  # wait at most this share of a forward for returning rounds


class RoundForecast:
    def __init__(self) -> None:
        self.forward_s = 0.0  # running mean of a forward of rounds only (prompt chunks excluded)
        self._answered: dict[Hashable, float] = {}  # session -> when its last round was answered
        self._gap: dict[Hashable, float] = {}  # session -> running mean of answer -> next arrival
        self._lock = threading.Lock()  # `forget` comes from other threads

    def arrived(self, key: Hashable, now: float) -> None:
        with self._lock:
            answered = self._answered.pop(key, None)
            if answered is not None:
                gap = now - answered
                old = self._gap.get(key)
                self._gap[key] = gap if old is None else old + ALPHA * (gap - old)

    def answered(self, key: Hashable, now: float) -> None:
        with self._lock:
            self._answered[key] = now

    def forget(self, key: Hashable) -> None:
        """The session is closed: no round of it will come."""
        with self._lock:
            self._answered.pop(key, None)
            self._gap.pop(key, None)

    def timed_forward(self, seconds: float) -> None:
        self.forward_s = seconds if not self.forward_s else self.forward_s + ALPHA * (seconds - self.forward_s)

    def wait_until(self, now: float, present: Iterable[Hashable]) -> float | None:
        """How long the next forward should wait (a deadline), or None: nobody worth waiting for.
        Waited for: sessions not present whose round is due within the wait and not overdue."""
        horizon = WAIT_FRACTION * self.forward_s
        if horizon <= 0:
            return None
        present = set(present)
        with self._lock:
            due = [
                answered + self._gap[key]
                for key, answered in self._answered.items()
                if key not in present and key in self._gap
            ]
        if any(now - horizon <= t <= now + horizon for t in due):
            return now + horizon
        return None
