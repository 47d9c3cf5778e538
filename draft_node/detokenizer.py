"""Incremental detokenization with stop strings: emit text as tokens arrive, never a partial stop."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
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
            for stop in self.stop:
                for size in range(min(len(stop) - 1, safe), 0, -1):
                    if stop.startswith(text[safe - size : safe]):
                        safe -= size
                        break
        safe = max(safe, self.emitted)
        new, self.emitted = text[self.emitted : safe], safe
        return new
