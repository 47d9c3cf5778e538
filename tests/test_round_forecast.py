"""Forwards wait for rounds due back soon: sessions that alternate get batched together."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from services.forward_loop import ForwardLoop
from services.round_forecast import RoundForecast


def test_nobody_is_waited_for_before_their_gap_is_measured():
    forecast = RoundForecast()
    forecast.timed_forward(0.1)
    forecast.answered("a", 0.0)
    assert forecast.wait_until(0.0, present=["b"]) is None


def test_a_session_due_within_half_a_forward_is_waited_for_and_no_longer():
    forecast = RoundForecast()
    forecast.timed_forward(0.1)
    forecast.answered("a", 0.0)
    forecast.arrived("a", 0.01)  # gap 10 ms
    forecast.answered("a", 1.0)
    assert forecast.wait_until(1.0, present=["b"]) == 1.05  # due at 1.01: wait at most half a forward
    assert forecast.wait_until(1.0, present=["a", "b"]) is None  # it is here already
    assert forecast.wait_until(1.2, present=["b"]) is None  # overdue: its draft is busy or gone
    forecast.forget("a")
    assert forecast.wait_until(1.0, present=["b"]) is None


def test_a_session_whose_gap_is_longer_than_half_a_forward_is_not_waited_for():
    forecast = RoundForecast()
    forecast.timed_forward(0.1)
    forecast.answered("a", 0.0)
    forecast.arrived("a", 0.2)  # drafting takes 200 ms: its round would wait for a forward anyway
    forecast.answered("a", 1.0)
    assert forecast.wait_until(1.0, present=["b"]) is None


@dataclass
class FakeRows:
    token_ids: list[int]


class SlowDecoder:
    """A forward costs the same for one sequence or several (weights read once), like a decode step."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def forward(self, batch: list[FakeRows]) -> list[torch.Tensor]:
        time.sleep(0.05)
        self.batches.append(len(batch))
        return [torch.zeros(len(rows.token_ids), 4) for rows in batch]


class Round:
    def __init__(self, key: str) -> None:
        self.session_key, self.batch_size, self.result = key, 1, None

    def next_rows(self) -> FakeRows:
        return FakeRows([1])

    def take(self, logits: torch.Tensor) -> bool:
        self.result = self.batch_size
        return True


def alternate(loop: ForwardLoop, rounds: int) -> None:
    """Two sessions, each sending its next round 5 ms after its answer (a draft decoding plainly)."""

    def session(key: str) -> None:
        for _ in range(rounds):
            loop.run(Round(key))
            time.sleep(0.005)

    threads = [threading.Thread(target=session, args=(key,)) for key in ("a", "b")]
    threads[0].start()
    time.sleep(0.02)  # b starts in the middle of a's first forward: out of phase
    threads[1].start()
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("wait", [True, False], ids=["waiting", "not waiting"])
def test_two_sessions_out_of_phase_end_up_in_one_forward(monkeypatch, wait):
    """Not waiting is the failure the forecast is for: each session alone in every other forward."""
    if not wait:
        monkeypatch.setattr("services.round_forecast.WAIT_FRACTION", 0.0)
    loop: ForwardLoop = ForwardLoop(SlowDecoder, "test-loop")
    try:
        alternate(loop, 20)
        late = loop.decoder.batches[len(loop.decoder.batches) // 2 :]
        assert late.count(2 if wait else 1) >= 0.8 * len(late), loop.decoder.batches
    finally:
        loop.stop()
