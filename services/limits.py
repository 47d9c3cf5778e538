"""Numeric limits shared by both nodes and their APIs, in one place.

A limit that a client can run into lives here (with why it is that number), so the gRPC servicers,
the HTTP API, the configs and the tests all read the same value.
"""

from __future__ import annotations

MAX_SPECULATIVE_TOKENS = 32
"""K: the most draft tokens a round may ask for (a request, the config, the playground). The verify
forward grows with K and a longer chain is seldom accepted whole; 32 leaves room above the default 16."""

MAX_CANDIDATES = 16
"""N: the most candidate continuations a round may ask for; N x K nodes must still fit the target's
tree limit (64 by default)."""

MAX_STOP_STRINGS = 4
"""Stop strings a request may give: OpenAI's own limit, so every OpenAI client already respects it."""

MAX_STOP_STRING_CHARS = 256
"""Characters per stop string. The stream holds back a tail that could still grow into a stop
string and scans it at every token; 256 covers the delimiters people use (a closing tag, a line of
dashes, a prompt marker) and keeps that scan to about a thousand character steps per token."""

MAX_Q_SUPPORT = 1024
"""Entries of one trie node's sparse draft distribution q. A draft keeps at most `--draft-top-k`
tokens (itself at most this), so an honest q is never larger; checked before any loop over it."""

MAX_HTTP_STREAMS = 64
"""Default bound on completions served over HTTP at once (streamed or not: each holds a worker
thread while its rounds run); one more gets HTTP 429 at once instead of another thread. 64 matches
the target's default session limit, which bounds concurrent generations anyway."""

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (temperature 0) on both nodes, for every strategy and
proposer, as in vLLM (its _SAMPLING_EPS): logits / 1e-39 overflow to inf and give NaN probabilities."""

MEMORY_BUDGET_FRACTION = 0.5
"""The target's default memory budget (session KV caches and the prefix cache together): this
fraction of the memory available at start-up after the model loaded (MemAvailable on a CPU, the
GPU's free memory on CUDA). Half leaves room for activations, the other node of a pair on the same
machine, and the allocator's slack."""


def mb_to_bytes(megabytes: float) -> int:
    """A size given in MiB (the `*_mb` flags) in bytes."""
    return int(megabytes * (1 << 20))
