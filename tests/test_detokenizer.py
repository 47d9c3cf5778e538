from __future__ import annotations

from draft_node.detokenizer import IncrementalDetokenizer


def stream(tokenizer, ids, stop=(), step=1):
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    if not detok.stopped:
        pieces.append(detok.add([], final=True))
    return pieces, detok


def test_streamed_text_equals_full_decode(target_model):
    tok = target_model.tokenizer
    ids = tok.encode("def add(a, b):\n    return a + b  # é ü 🙂")
    for step in (1, 2, 3):
        pieces, _ = stream(tok, ids, step=step)
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_and_never_leaks(target_model):
    tok = target_model.tokenizer
    ids = tok.encode("for i in range(10):\n    print(i)")
    pieces, detok = stream(tok, ids, stop=["range(1"])
    assert "".join(pieces) == "for i in "
    assert detok.stopped
    # no emitted prefix ever contained part of the stop string past the cut
    assert all("ran" not in p for p in pieces)


def test_unmatched_stop_string_releases_held_text(target_model):
    tok = target_model.tokenizer
    ids = tok.encode("print(i)")
    pieces, detok = stream(tok, ids, stop=["i)zzz"])
    assert "".join(pieces) == "print(i)" and not detok.stopped


class CountingSequence:
    """A string seen one character at a time, counting every character read."""

    def __init__(self, text):
        self.text, self.reads = text, 0

    def __len__(self):
        return len(self.text)

    def __getitem__(self, index):
        self.reads += 1
        return self.text[index]


def test_the_hold_back_scan_is_linear_in_the_stop_length():
    """The longest stop-string prefix the text ends with is found in O(len(stop)) character reads
    (KMP), where trying every prefix length was O(len(stop)^2) on text like "aaa...a" vs "aa...ab"."""
    from draft_node.detokenizer import failure_table, stop_prefix_at_end

    for length in (10, 100, 1000):
        failure = failure_table("a" * (length - 1) + "b")
        text, stop = CountingSequence("a" * length), CountingSequence("a" * (length - 1) + "b")
        assert stop_prefix_at_end(text, len(text), stop, failure) == length - 1
        assert text.reads + stop.reads <= 4 * length
    assert stop_prefix_at_end("xxabab", 6, "ababc") == 4
    assert stop_prefix_at_end("xxabab", 5, "ababc") == 3
    assert stop_prefix_at_end("abc", 3, "d") == 0
