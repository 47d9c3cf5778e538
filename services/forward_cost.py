"""What a forward costs by its number of rows, measured as the node runs.

Rows are grouped in powers of two (1, 2-3, 4-7, ...); each group keeps an exponentially weighted
mean of its rows and seconds, and a cost between groups is read off the line through the two
nearest measured ones. A node learns its own curve (CPU or GPU, with whatever shares its cores)
instead of trusting a table measured elsewhere.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

ALPHA = 0.1  # weight of a new measurement


@dataclass
class _Group:
    rows: float
    seconds: float
    count: int = 1

    def add(self, rows: int, seconds: float) -> None:
        self.count += 1
        weight = max(ALPHA, 1 / self.count)
        self.rows += weight * (rows - self.rows)
        self.seconds += weight * (seconds - self.seconds)


class ForwardCost:
    def __init__(self) -> None:
        self._groups: dict[int, _Group] = {}
        self._lock = threading.Lock()

    def record(self, rows: int, seconds: float) -> None:
        if rows < 1 or seconds <= 0:
            return
        key = rows.bit_length()
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                self._groups[key] = _Group(rows, seconds)
            else:
                group.add(rows, seconds)

    def seconds(self, rows: int) -> float | None:
        """Estimated seconds of a forward over `rows` rows; None until two sizes were measured."""
        with self._lock:
            points = sorted((g.rows, g.seconds) for g in self._groups.values())
        if len(points) < 2:
            return None
        below = [p for p in points if p[0] <= rows]
        above = [p for p in points if p[0] > rows]
        (r0, s0), (r1, s1) = (
            (below[-1], above[0]) if below and above else (points[:2] if not below else points[-2:])
        )
        slope = max(0.0, (s1 - s0) / (r1 - r0)) if r1 != r0 else 0.0
        return max(1e-6, s0 + slope * (rows - r0))
