"""Reference outputs for the tests: what the target alone would produce."""

from __future__ import annotations

import torch

from draft_node.proposers import eos_token_ids
from services.model_loading import LoadedModel
from services.rpc.specwire.v1 import draft_pb2, draft_pb2_grpc, target_pb2
from target_node.verifier import Verifier


def target_only_greedy(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF `generate` greedy on the target alone, cut before the first EOS."""
    eos = sorted(eos_token_ids(loaded.tokenizer, loaded.model.generation_config))
    device = loaded.model.device
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt_ids], device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
        )
    tokens = out[0, len(prompt_ids) :].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut]


def collect(
    stub: draft_pb2_grpc.DraftServiceStub, **request: object
) -> tuple[list[int], list[draft_pb2.GenerateChunk]]:
    """Run one Generate call; return all token ids and the chunks."""
    chunks = list(stub.Generate(draft_pb2.GenerateRequest(**request)))
    return [t for c in chunks for t in c.token_ids], chunks


def forget_sessions_at(verifier: Verifier, rounds: set[int]) -> None:
    """Make the target "restart" (drop every session) just before its n-th verify, for n in `rounds`."""
    original, count = verifier.verify, [0]

    def forgetful(request: target_pb2.VerifyRequest, *owner: str) -> target_pb2.VerifyResponse:
        count[0] += 1
        if count[0] in rounds:
            verifier.sessions.stop()
        return original(request, *owner)

    verifier.verify = forgetful  # type: ignore[method-assign]
