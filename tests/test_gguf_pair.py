"""A draft and a target node on GGUF weights (the CPU default for GGUF models): greedy output is
token-identical to the target alone on the same kernels, alone or with other sessions batched."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from draft_node.config import DraftConfig
from draft_node.server import start_draft
from services.gguf_decoder import GGUFDecoder, greedy_decode
from services.gguf_file import GGUFFile
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc
from target_node.config import TargetConfig
from target_node.server import start_target

PROMPTS = ["def add(a, b):", "Natalia sold clips to 48 of her friends in April", "for i in range(10):", "The quick"]


@pytest.fixture(scope="module")
def gguf_pair(tiny_gguf, tmp_path_factory):
    """A target node on the tiny K-quant model and a draft node per draft file."""
    cache = tmp_path_factory.mktemp("gguf-cache")
    target = start_target(TargetConfig(model=tiny_gguf.target, port=0, metrics_port=0, workers=8, cache_dir=cache))
    drafts = {}
    for name in ("draft_noisy", "draft_small"):
        config = DraftConfig(
            model=getattr(tiny_gguf, name), port=0, metrics_port=0, http_port=-1, target=f"127.0.0.1:{target.port}",
            workers=8, cache_dir=cache, min_chain_probability=0,
        )  # fmt: skip
        drafts[name] = start_draft(config)
    file = GGUFFile(Path(tiny_gguf.target))
    yield target, drafts, GGUFDecoder(file), file.tokenizer(cache)
    for draft in drafts.values():
        draft.stop(0)
    target.stop(0)


def generate(port: int, prompt: str, max_tokens: int = 40, k: int = 4) -> tuple[list[int], list]:
    stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = draft_pb2.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, apply_chat_template=False, num_speculative_tokens=k
    )
    tokens, stats = [], []
    for chunk in stub.Generate(request):
        tokens += chunk.token_ids
        if chunk.HasField("stats"):
            stats.append(chunk.stats)
    return tokens, stats


@pytest.mark.parametrize("draft", ["draft_noisy", "draft_small"])
def test_greedy_pair_equals_the_target_alone(gguf_pair, draft):
    target, drafts, decoder, tokenizer = gguf_pair
    for prompt in PROMPTS:
        tokens, stats = generate(drafts[draft].port, prompt)
        alone = greedy_decode(decoder, tokenizer.encode(prompt), 40, eos_ids=[tokenizer.eos_token_id])
        assert tokens == alone, prompt
        assert sum(s.drafted_tokens for s in stats) > 0
    if draft == "draft_noisy":  # the target's weights plus noise: many of its tokens are accepted
        assert sum(s.accepted_tokens for s in stats) > sum(s.drafted_tokens for s in stats) / 4


def test_concurrent_sessions_share_forwards_and_stay_exact(gguf_pair):
    """Eight generations at once: the target runs their rounds in shared forwards (batch sizes
    above 1), and each text still equals the target alone."""
    target, drafts, decoder, tokenizer = gguf_pair
    prompts = PROMPTS * 2
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate(drafts["draft_noisy"].port, p, 32), prompts))
    for prompt, (tokens, _) in zip(prompts, results, strict=True):
        assert tokens == greedy_decode(decoder, tokenizer.encode(prompt), 32, eos_ids=[tokenizer.eos_token_id])
    batch_sizes = target.node.metrics.batch_size.collect()[0].samples
    largest = max(s.value for s in batch_sizes if s.name.endswith("_sum"))
    count = max(s.value for s in batch_sizes if s.name.endswith("_count"))
    assert largest > count  # some rounds shared a forward
