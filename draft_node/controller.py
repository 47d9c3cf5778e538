"""Choosing K (tokens per candidate) and N (candidates) each round.

`AdaptiveController` maximises measured goodput = committed tokens / round wall time per (K, N),
estimated as EWMA(tokens) / EWMA(seconds) (a plain mean until an arm has 1/alpha samples, so one
lucky round cannot dominate). It hill-climbs: every `probe_every` rounds it tries a neighbour (K±1, N±1) so it notices when network RTT or acceptance change; after a switch it
waits `cooldown` rounds before switching again. Every change is logged with its reason and counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
Arm = tuple[int, int]  # (K, N)


class FixedController:
    def __init__(self, k: int, n: int = 1) -> None:
        self.arm = (k, n)

    def choose(self) -> Arm:
        return self.arm

    def observe(self, arm: Arm, committed: int, seconds: float) -> None:
        pass


@dataclass
class ArmStats:
    tokens: float = 0.0  # EWMA of committed tokens per round
    seconds: float = 0.0  # EWMA of round wall time
    rounds: int = 0
    last_round: int = -1

    @property
    def goodput(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, tokens: int, seconds: float, alpha: float) -> None:
        self.rounds += 1
        weight = max(alpha, 1 / self.rounds)
        self.tokens += weight * (tokens - self.tokens)
        self.seconds += weight * (seconds - self.seconds)


class AdaptiveController:
    def __init__(
        self,
        k_range: tuple[int, int],
        n_range: tuple[int, int],
        start: Arm,
        alpha: float = 0.1,
        probe_every: int = 2,
        cooldown: int = 4,
        min_samples: int = 3,
        on_change: Callable[[Arm, Arm, str], None] = lambda old, new, why: None,
    ) -> None:
        self.k_range, self.n_range = k_range, n_range
        self.current = (
            min(max(start[0], k_range[0]), k_range[1]),
            min(max(start[1], n_range[0]), n_range[1]),
        )
        self.alpha, self.probe_every, self.cooldown, self.min_samples = (
            alpha,
            probe_every,
            cooldown,
            min_samples,
        )
        self.on_change = on_change
        self.stats: dict[Arm, ArmStats] = {}
        self.round = 0
        self.switched_at = -cooldown
        self._lock = threading.Lock()  # shared by concurrent generations

    def neighbours(self, arm: Arm) -> list[Arm]:
        k, n = arm
        candidates = [(k - 1, n), (k + 1, n), (k, n - 1), (k, n + 1)]
        return [
            (a, b)
            for a, b in candidates
            if self.k_range[0] <= a <= self.k_range[1] and self.n_range[0] <= b <= self.n_range[1]
        ]

    def choose(self) -> Arm:
        with self._lock:
            self.round += 1
            if self.round % self.probe_every == 0:
                # probe the neighbour tried longest ago (never-tried first)
                return min(
                    self.neighbours(self.current),
                    key=lambda a: self.stats.get(a, ArmStats()).last_round,
                    default=self.current,
                )
            return self.current

    def observe(self, arm: Arm, committed: int, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            stats = self.stats.setdefault(arm, ArmStats())
            stats.add(committed, seconds, self.alpha)
            stats.last_round = self.round
            # hill-climb: only the current arm and its measured neighbours compete, so estimates
            # of far arms made under old conditions (another RTT) cannot pull the choice away
            known = [
                a
                for a in (self.current, *self.neighbours(self.current))
                if a in self.stats and (self.stats[a].rounds >= self.min_samples or a == self.current)
            ]
            if not known:  # another generation just moved to an arm nobody has measured yet
                return
            best = max(known, key=lambda a: self.stats[a].goodput)
            current = self.stats.get(self.current)
            if best == self.current or self.round - self.switched_at < self.cooldown:
                return
            if current is not None and self.stats[best].goodput <= current.goodput:
                return
            old, self.current, self.switched_at = self.current, best, self.round
            reason = (
                f"goodput {self.stats[best].goodput:.2f} tok/s at K={best[0]} N={best[1]} beats "
                f"{current.goodput if current else 0.0:.2f} tok/s at K={old[0]} N={old[1]}"
            )
            log.info("K/N %s -> %s: %s", old, best, reason)
            self.on_change(old, best, reason)
