"""How many tokens the drafts should draft next round, given the load: speculation that adapts.

Alone, a session gains from every draft token the target accepts. Many sessions share each forward,
and there every drafted row makes everyone's round slower, and drafts computed beside the target
(one machine) take its cores: past some load plain decoding rounds (nothing drafted) give more
tokens a second in total (SmartSpec's goodput argument; vLLM users report 1.4-1.8x slowdowns from
speculation at high load). Which load that is depends on the hardware, the link, the models and
where the drafts run, so the target measures it rather than model it: while more than one session
verifies, time is cut into epochs, each with one draft-length cap sent to every draft with its
answers (0: plain rounds; None: no cap, the draft's own rule), and each epoch's total goodput
(committed tokens a second, all sessions together) is kept per cap and per load (sessions
verifying, in powers of two). The best cap for the load now is used, every `probe_every`-th epoch
tries another, so the choice follows changes. A session alone gets no advice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

ACTIVE_WINDOW_S = 1.0  # a session counts as verifying when its last round ended this recently (or
# within two of its rounds' usual spacing, when rounds take longer)
CAPS: tuple[int | None, ...] = (None, 0, 2)  # the draft lengths tried: no cap, plain rounds, short drafts
ALPHA = 0.3  # weight of a new epoch's goodput


class DraftAdvisor:
    def __init__(
        self, epoch_s: float = 2.0, probe_every: int = 4, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.epoch_s, self.probe_every, self.clock = epoch_s, probe_every, clock
        self.goodput: dict[tuple[int, int | None], float] = {}  # (load bucket, cap) -> tokens / s
        self.epochs: dict[tuple[int, int | None], int] = {}
        self.cap: int | None = None  # advised in the current epoch
        self.epoch_start = clock()
        self.epoch_tokens = 0
        self.epoch_load = 0
        self.epoch_count = 0
        self.cycle_s = 0.0  # running mean of the time between a session's answers
        self._last_answer: dict[str, float] = {}  # session -> when its last round was answered
        self._lock = threading.Lock()

    def record_round(self, session_id: str, committed: int) -> None:
        """A round was answered that committed `committed` tokens (accepted + the target's own)."""
        with self._lock:
            now = self.clock()
            answered = self._last_answer.get(session_id)
            if answered is not None:
                self.cycle_s += (0.1 if self.cycle_s else 1.0) * (now - answered - self.cycle_s)
            self._last_answer[session_id] = now
            self.epoch_tokens += committed
            if now - self.epoch_start >= self.epoch_s:
                self._end_epoch(now)

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._last_answer.pop(session_id, None)

    def advise(self) -> int | None:
        """The cap of the current epoch while more than one session verifies; else None."""
        with self._lock:
            return self.cap if self._active(self.clock()) > 1 else None

    def _active(self, now: float) -> int:
        window = max(ACTIVE_WINDOW_S, 2 * self.cycle_s)
        return sum(1 for t in self._last_answer.values() if now - t < window)

    def _end_epoch(self, now: float) -> None:
        """Book the epoch's goodput under its load and cap, and choose the next epoch's cap."""
        if self.epoch_load > 1:
            key = (self.epoch_load, self.cap)
            goodput = self.epoch_tokens / (now - self.epoch_start)
            self.epochs[key] = self.epochs.get(key, 0) + 1
            self.goodput[key] = goodput if key not in self.goodput else (
                self.goodput[key] + ALPHA * (goodput - self.goodput[key])
            )
        active = self._active(now)
        load = 1 << (active - 1).bit_length() if active > 1 else active  # 2, 4, 8, ...
        self.epoch_count += 1
        self.cap = self._choose(load)
        self.epoch_start, self.epoch_tokens, self.epoch_load = now, 0, load

    def _choose(self, load: int) -> int | None:
        unmeasured = [cap for cap in CAPS if self.epochs.get((load, cap), 0) < 2]
        if unmeasured:
            return unmeasured[0]
        best = max(CAPS, key=lambda cap: self.goodput[(load, cap)])
        if self.epoch_count % self.probe_every == 0:  # re-measure another, in turn
            others = [cap for cap in CAPS if cap != best]
            return others[(self.epoch_count // self.probe_every) % len(others)]
        return best
