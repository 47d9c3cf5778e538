"""Whether to draft the next round while the current one is verified (`--pipeline auto`).

Drafting ahead hides the draft's time behind the verify and the link when the two nodes have cores
of their own and the link is slow; on one machine the extra drafting slows the target it waits
for, and a miss wastes it. Which one wins depends on the RTT, the cores and the hit rate, all of
which the draft can measure: the switch runs rounds both ways in blocks, keeps the goodput
(committed tokens / round wall time) of each, uses the better, and re-measures the other every
`probe_every` blocks so it follows a changing link or load. Shared by a node's generations.
"""

from __future__ import annotations

import logging
import threading

from draft_node.controller import ArmStats

log = logging.getLogger(__name__)
MARGIN = 0.05  # the other mode must be this much better to take over (equal modes would flip-flop)


class FixedPipeline:
    def __init__(self, on: bool) -> None:
        self.on = on

    def use(self) -> bool:
        return self.on

    def observe(self, pipelined: bool, committed: int, seconds: float) -> None:
        pass


class PipelineSwitch:
    def __init__(self, block: int = 8, probe_every: int = 8, min_rounds: int = 16, alpha: float = 0.1) -> None:
        self.block, self.probe_every, self.min_rounds, self.alpha = block, probe_every, min_rounds, alpha
        self.stats = {False: ArmStats(), True: ArmStats()}
        self.best = False
        self.rounds = 0
        self._lock = threading.Lock()

    def use(self) -> bool:
        """The mode of the current block: each mode until both have `min_rounds`, then the better
        one, with one probing block of the other every `probe_every` blocks."""
        with self._lock:
            block = self.rounds // self.block
            self.rounds += 1
            unmeasured = [mode for mode in (False, True) if self.stats[mode].rounds < self.min_rounds]
            if unmeasured:
                return unmeasured[0] if block % 2 == 0 or len(unmeasured) == 1 else not unmeasured[0]
            probing = block % self.probe_every == self.probe_every - 1
            return (not self.best) if probing else self.best

    def observe(self, pipelined: bool, committed: int, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            self.stats[pipelined].add(committed, seconds, self.alpha)
            if any(s.rounds < self.min_rounds for s in self.stats.values()):
                return
            current, other = self.stats[self.best].goodput, self.stats[not self.best].goodput
            if other > current * (1 + MARGIN):  # a clear difference, not noise: switch
                log.info(
                    "pipelining %s: %.2f tok/s drafting ahead vs %.2f tok/s not",
                    "off" if self.best else "on",
                    self.stats[True].goodput,
                    self.stats[False].goodput,
                )
                self.best = not self.best
