"""How many tokens the drafts should draft next round, given the load: speculation that adapts.

Alone, a session gains from every draft token the target accepts. Many sessions share each
forward, and there every drafted row makes everyone's round slower: past some load a plain decoding
round (nothing drafted) gives more tokens a second in total (SmartSpec's goodput argument). The
target sees what it needs to choose: what its forwards cost by rows (measured), how many sessions
verify now, how often draft tokens are accepted, and how long a draft takes between its rounds
(drafting and the link). It picks, for the load now, the K that maximises

    goodput(K) = B * (1 + a + a^2 + ... + a^K) / (forward(B * (K + 1)) + gap(K))

(B sessions, per-token acceptance a, gap(K) = g0 + g1 * K fitted to the measured gaps) and sends
it with every round's answer; the draft drafts at most that many (0: a plain round). A lone
session gets no advice: the draft's own rule (chain probability, its controller) is in charge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from services.forward_cost import ForwardCost

ALPHA = 0.05  # weight of a new round in the running sums
ACTIVE_WINDOW_S = 1.0
MAX_ADVISED_DRAFT_TOKENS = 16  # longest draft the advice considers (the drafts' own K caps it too)  # a session counts as verifying when its last round ended this recently


class DraftAdvisor:
    def __init__(self, cost: ForwardCost, k_max: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.cost, self.k_max, self.clock = cost, k_max, clock
        self.accepted = 0.0  # running sums for the per-token acceptance estimate
        self.rejected = 0.0
        self.gap = [0.0, 0.0, 0.0, 0.0, 0.0]  # weighted sums of 1, k, gap, k*gap, k*k
        self._last_answer: dict[str, float] = {}  # session -> when its last round was answered
        self.cycle_s = 0.0  # running mean of the time between a session's answers
        self._lock = threading.Lock()

    def record_round(self, session_id: str, drafted: int, accepted: int, received_at: float) -> None:
        """A round of `drafted` draft positions (the trie's depth), `accepted` of them accepted,
        that arrived at `received_at` (clock time)."""
        with self._lock:
            if drafted:
                self.accepted = (1 - ALPHA) * self.accepted + accepted
                self.rejected = (1 - ALPHA) * self.rejected + (accepted < drafted)
            answered = self._last_answer.get(session_id)
            if answered is not None:
                gap = max(0.0, received_at - answered)
                self.gap = [(1 - ALPHA) * s for s in self.gap]
                for i, value in enumerate((1, drafted, gap, drafted * gap, drafted * drafted)):
                    self.gap[i] += value
            now = self.clock()
            if answered is not None:
                self.cycle_s += (ALPHA if self.cycle_s else 1.0) * (now - answered - self.cycle_s)
            self._last_answer[session_id] = now

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._last_answer.pop(session_id, None)

    def active_sessions(self) -> int:
        now = self.clock()
        window = max(ACTIVE_WINDOW_S, 2 * self.cycle_s)
        with self._lock:
            return sum(1 for t in self._last_answer.values() if now - t < window)

    def acceptance(self) -> float:
        """Per-token acceptance: accepted / (accepted + first rejections), the geometric estimate."""
        total = self.accepted + self.rejected
        return self.accepted / total if total else 0.0

    def gap_seconds(self, k: int) -> float:
        """The draft's time between an answer and its next round, for K draft tokens: g0 + g1 * K by
        weighted least squares; with one K only seen, the gap is split evenly over its K + 1 tokens."""
        n, sk, sg, skg, skk = self.gap
        if n <= 0:
            return 0.0
        mean_k, mean_g = sk / n, sg / n
        variance = skk / n - mean_k**2
        if variance > 0.25:
            g1 = max(0.0, (skg / n - mean_k * mean_g) / variance)
            g0 = max(0.0, mean_g - g1 * mean_k)
        else:
            g0 = g1 = mean_g / (mean_k + 1)
        return g0 + g1 * k

    def advise(self) -> int | None:
        """The K that maximises total goodput at the current load; None while there is no advice
        to give (one session, or the costs not measured yet)."""
        sessions = self.active_sessions()
        if sessions <= 1:
            return None
        a = self.acceptance()
        best, best_goodput = None, 0.0
        with self._lock:
            for k in range(self.k_max + 1):
                forward = self.cost.seconds(sessions * (k + 1))
                if forward is None:
                    return None
                tokens = sum(a**i for i in range(k + 1))
                goodput = sessions * tokens / (forward + self.gap_seconds(k))
                if goodput > best_goodput:
                    best, best_goodput = k, goodput
        return best
