"""Incremental detokenization with stop strings: emit text as tokens arrive, never a partial stop."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def failure_table(stop: Sequence[str]) -> list[int]:
    """KMP's prefix function: for each i, the length of the longest proper prefix of stop[: i + 1]
    that is also its suffix."""
    table = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


def stop_prefix_at_end(text: Sequence[str], end: int, stop: Sequence[str], failure: list[int] | None = None) -> int:
    """Length of the longest proper prefix of `stop` that text[:end] ends with (0: none): the tail
    to hold back because it could still grow into the stop string. One KMP pass over the last
    len(stop) - 1 characters, O(len(stop)), where trying every prefix length was quadratic."""
    failure = failure_table(stop) if failure is None else failure
    k = 0
    for i in range(max(0, end - len(stop) + 1), end):
        while k and stop[k] != text[i]:
            k = failure[k - 1]
        if stop[k] == text[i]:
            k += 1
    return k


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.failures = [failure_table(s) for s in self.stop]
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Append tokens; return the newly safe text. After a stop string matched, `stopped` is True."""
        self.token_ids.extend(token_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop) + 1))
            if at != -1:
                text, final, self.stopped = text[:at], True, True
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens
                safe = len(text.rstrip("\ufffd"))
            # hold back a tail that could still grow into a stop string
            for stop, failure in zip(self.stop, self.failures, strict=True):
                safe -= stop_prefix_at_end(text, safe, stop, failure)
        safe = max(safe, self.emitted)
        new, self.emitted = text[self.emitted : safe], safe
        return new
