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
verifying from when they open, in powers of two). A load not seen yet starts from the cap that was
best at the nearest higher load measured (plain rounds above every load measured: never slower than
the target decoding plainly), then climbs: the caps beside the best so far get an epoch each until
the best has no untried neighbour; after that the best is used and every `probe_every`-th epoch
re-measures a neighbour, so the choice follows changes. Exploring costs (every epoch on a worse cap
is lost goodput), so a cap gets one epoch, not a sample, caps past one that lost are not tried,
none above the best at a lower load is tried at all, and a longer cap must beat the shorter one by
a margin to be the best. A session alone gets no advice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

ACTIVE_WINDOW_S = 1.0  # a session counts as verifying when its last round ended this recently (or
# within two of its rounds' usual spacing, when rounds take longer)
CAPS: tuple[int | None, ...] = (0, 2, None)  # the draft lengths tried: plain rounds, short drafts, no cap
ALPHA = 0.3  # weight of a new epoch's goodput
ROUNDS_PER_EPOCH = 6  # an epoch lasts at least this many of a session's rounds
PAUSE_FACTOR = 1.5  # an epoch this much longer than planned had a pause in it: not booked
MAX_PROBE_GAP = 64  # epochs between probes at most, after probes kept losing
STEP_MARGIN = 0.1  # a cap must give this much more goodput than the next shorter one to be the best


class DraftAdvisor:
    def __init__(
        self, epoch_s: float = 2.0, probe_every: int = 8, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.epoch_s, self.probe_every, self.clock = epoch_s, probe_every, clock
        self.goodput: dict[tuple[int, int | None], float] = {}  # (load bucket, cap) -> tokens / s
        self.cap: int | None = CAPS[0]  # advised in the current epoch
        self.epoch_start = clock()
        self.epoch_tokens = 0
        self.epoch_load = 0
        self.epoch_count = 0
        self.cycle_s = 0.0  # running mean of the time between a session's answers
        self._probe_gap: dict[int, int] = {}  # load -> epochs from one probe to the next
        self._next_probe: dict[int, int] = {}  # load -> the epoch of its next probe
        self._probing = False  # the current epoch re-measures a cap that was not the best
        self._last_answer: dict[str, float] = {}  # session -> when its last round was answered
        self._leaving: list[float] = []  # when sessions closed that no new session has replaced yet
        self._opened: set[str] = set()  # sessions opened that have no round answered yet
        self._lock = threading.Lock()

    def record_round(self, session_id: str, committed: int) -> None:
        """A round was answered that committed `committed` tokens (accepted + the target's own)."""
        with self._lock:
            now = self.clock()
            answered = self._last_answer.get(session_id)
            if answered is not None:
                self.cycle_s += (0.1 if self.cycle_s else 1.0) * (now - answered - self.cycle_s)
            elif session_id in self._opened:
                self._opened.discard(session_id)
            elif self._leaving:  # a new session `opened` did not announce: it takes the place of one that left
                self._leaving.pop(0)
            self._last_answer[session_id] = now
            self.epoch_tokens += committed
            if now - self.epoch_start >= self._epoch_length():
                self._end_epoch(now)

    def opened(self, session_id: str) -> None:
        """A session opened: it counts as verifying from now on, so that clients arriving together
        are not each thought alone (each would draft a full chain at a load that makes it cost
        seconds), and it takes the place of a session that left. An epoch that has gone stale
        (nobody verified), or whose load the arrivals outgrow, starts anew, unbooked, at the
        load of now."""
        with self._lock:
            now = self.clock()
            if self._leaving:
                self._leaving.pop(0)
            self._opened.add(session_id)
            stale = now - self.epoch_start >= PAUSE_FACTOR * self._epoch_length()
            if stale or _bucket(self._active(now)) > self.epoch_load:
                self._start_epoch(now)

    def advise(self) -> int | None:
        """The cap of the current epoch while more than one session verifies, or did when the epoch
        began (a session between two requests of its client does not make the other one alone); else None."""
        with self._lock:
            return self.cap if self.epoch_load > 1 or self._active(self.clock()) > 1 else None

    def _epoch_length(self) -> float:
        """`epoch_s`, or longer where rounds are slow: an epoch of a few rounds per session measures
        mostly where its boundaries fell (a long round answered just after one began counts
        whole), and a cap's rounds must outnumber those the previous cap left in flight."""
        return max(self.epoch_s, ROUNDS_PER_EPOCH * self.cycle_s)

    def closed(self, session_id: str) -> None:
        """The session ended. Its client is likely between two requests: until the next session
        starts verifying, or the window passes, it still counts, so that the others are not
        thought alone meanwhile (a full-length draft then would cost a long verify at the load just
        measured)."""
        with self._lock:
            now, answered = self.clock(), self._last_answer.pop(session_id, None)
            self._opened.discard(session_id)
            if answered is not None and now - answered < self._window():  # (not one that sat idle)
                self._leaving.append(now)

    def _active(self, now: float) -> int:
        """Sessions answered within the window, sessions opened and not answered yet, and sessions
        that closed within the window and have no successor yet."""
        window = self._window()
        recent = [t for t in self._last_answer.values() if now - t < window]
        return len(recent) + len(self._opened) + sum(1 for t in self._leaving if now - t < window)

    def _window(self) -> float:
        return max(ACTIVE_WINDOW_S, 2 * self.cycle_s)

    def _end_epoch(self, now: float) -> None:
        """Book the epoch's goodput under its load and cap, and choose the next epoch's cap."""
        if self.epoch_load > 1 and now - self.epoch_start < PAUSE_FACTOR * self._epoch_length():  # (no pause in it)
            key = (self.epoch_load, self.cap)
            goodput = self.epoch_tokens / (now - self.epoch_start)
            self.goodput[key] = goodput if key not in self.goodput else (
                self.goodput[key] + ALPHA * (goodput - self.goodput[key])
            )
            if self._probing:
                self._schedule_probe(self.epoch_load, lost=self._best(self.epoch_load) != self.cap)
        self._start_epoch(now)

    def _start_epoch(self, now: float) -> None:
        """A new epoch at the load of now, with the cap chosen for it."""
        self._probing = False
        self._leaving = [t for t in self._leaving if now - t < self._epoch_length()]
        load = _bucket(self._active(now))
        self.epoch_count += 1
        self.cap = self._choose(load)
        self.epoch_start, self.epoch_tokens, self.epoch_load = now, 0, load

    def _choose(self, load: int) -> int | None:
        """Climb: tokens a second rise with the draft length up to a peak and fall past it, so only
        the caps beside the best so far are tried, and none above the best at a lower load, not
        even as a probe (speculation pays less as load grows; a draft back from plain rounds first
        prefills every token it missed, so at load an epoch of cap 2 after plain ones measured
        0.25-0.5x their goodput on the 2-core VM). Then the best, with a neighbour re-measured now
        and then: less often while such probes keep losing."""
        if not self._measured(load):
            return self._first_cap(load)
        best = self._best(load)
        at, ceiling = CAPS.index(best), self._ceiling(load)
        neighbours = [CAPS[i] for i in (at - 1, at + 1) if 0 <= i < len(CAPS) and (i < at or i <= ceiling)]
        if untried := [cap for cap in neighbours if (load, cap) not in self.goodput]:
            return untried[0]
        if neighbours and self.epoch_count >= self._next_probe.setdefault(load, self.epoch_count + self.probe_every):
            self._probing = True
            return neighbours[self.epoch_count % len(neighbours)]
        return best

    def _measured(self, load: int) -> list[int | None]:
        return [cap for cap in CAPS if (load, cap) in self.goodput]

    def _best(self, load: int) -> int | None:
        """The cap of the most goodput at `load` (one at least measured there), where each step up
        in draft length must win by `STEP_MARGIN`: goodput swings 2x between 2-second epochs on a
        busy machine, and a longer draft that only seemed to win costs more than a shorter one
        that did (at two clients on the 2-core VM a noise win of cap 2 over plain rounds led to an
        epoch of full drafts at 0.56x plain's goodput)."""
        return max(self._measured(load), key=lambda cap: self.goodput[(load, cap)] / (1 + STEP_MARGIN) ** CAPS.index(cap))

    def _ceiling(self, load: int) -> int:
        """Index in CAPS of the best cap at the nearest lower load measured (the last when none)."""
        lower = [measured for measured, _ in self.goodput if measured < load]
        return CAPS.index(self._best(max(lower))) if lower else len(CAPS) - 1

    def _schedule_probe(self, load: int, lost: bool) -> None:
        gap = min(MAX_PROBE_GAP, 2 * self._probe_gap.get(load, self.probe_every)) if lost else self.probe_every
        self._probe_gap[load] = gap
        self._next_probe[load] = self.epoch_count + gap

    def _first_cap(self, load: int) -> int | None:
        """The best cap at the nearest higher load measured (speculation pays at least as much with
        fewer sessions); plain rounds above every load measured, from where `_choose` climbs no
        further than the best below (a load's first epoch on a cap that lost would cost seconds
        of goodput, and speculation pays less as load grows)."""
        higher = [measured for measured, _ in self.goodput if measured > load]
        return self._best(min(higher)) if higher else CAPS[0]


def _bucket(sessions: int) -> int:
    """The load an epoch is booked under: sessions verifying, rounded up to a power of two."""
    return 1 << (sessions - 1).bit_length() if sessions > 1 else sessions
