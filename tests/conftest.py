from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU only under the interpreter, and triton.language's own helpers
    # (tl.max with indices, tl.cumsum) take the mode when triton is first imported: before any model.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from draft_node.config import DraftConfig
from draft_node.server import start_draft
from services.grpc_server import RunningServer
from services.model_loading import LoadedModel, load_model
from services.rpc.specwire.v1 import draft_pb2_grpc, target_pb2_grpc
from target_node.config import TargetConfig
from target_node.server import start_target
from target_node.verifier import Verifier
from tests.tiny_gguf import DRAFT_TYPES, build_gguf
from tests.tiny_models import build_model, build_tokenizer


@dataclass
class TinyModels:
    target: str  # directory of the target model
    draft_same: str  # the target's own weights: every draft token is accepted
    draft_noisy: str  # the target plus noise: partial acceptance
    draft_random: str  # unrelated weights, same tokenizer
    other_tokenizer: str  # a model whose tokenizer differs


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(root / "tok")
    target = build_model(root / "target", tokenizer, seed=0)
    noisy = build_model(root / "noisy", tokenizer, seed=1, perturb_from=target, noise=0.02)
    random = build_model(root / "random", tokenizer, seed=2)
    other = build_model(root / "other", build_tokenizer(root / "tok2", vocab_size=380), seed=3)
    return TinyModels(str(target), str(target), str(noisy), str(random), str(other))


@dataclass
class TinyGGUF:
    target: str  # K-quants (Q4_K, Q6_K) like the packaged 1.5B
    draft_noisy: str  # the target's weights plus noise, same blocks
    draft_small: str  # a smaller model in Q5_0 / Q8_0 / Q6_K like the packaged 0.5B (hidden size 128)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    root = tmp_path_factory.mktemp("tiny-gguf")
    tokenizer = build_tokenizer(root / "tok")
    target = build_gguf(root / "target.gguf", tokenizer, seed=0)
    noisy = build_gguf(root / "noisy.gguf", tokenizer, seed=1, perturb_from=target, noise=0.02)
    small = build_gguf(
        root / "small.gguf", tokenizer, seed=2, hidden_size=128, intermediate_size=256, types=DRAFT_TYPES
    )
    return TinyGGUF(str(target), str(noisy), str(small))


@pytest.fixture(scope="session")
def target_model(tiny: TinyModels) -> LoadedModel:
    return load_model(tiny.target)


@dataclass
class Pair:
    target: RunningServer
    draft: RunningServer
    target_stub: target_pb2_grpc.TargetServiceStub
    draft_stub: draft_pb2_grpc.DraftServiceStub


def start_pair(
    target_model: LoadedModel,
    draft_dir: str,
    target_verifier: Verifier | None = None,
    **draft_overrides: object,
) -> Pair:
    target = start_target(
        TargetConfig(model=target_model.model_id, port=0, metrics_port=0, workers=4),
        target_model,
        verifier=target_verifier,
    )
    draft_config = DraftConfig(
        model=draft_dir,
        port=0,
        metrics_port=0,
        http_port=0,
        target=f"127.0.0.1:{target.port}",
        workers=4,
        **draft_overrides,
    )
    draft = start_draft(draft_config, load_model(draft_dir))
    return Pair(
        target,
        draft,
        target_pb2_grpc.TargetServiceStub(grpc.insecure_channel(f"127.0.0.1:{target.port}")),
        draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"127.0.0.1:{draft.port}")),
    )


@pytest.fixture
def pair_factory(target_model: LoadedModel) -> Iterator:
    pairs: list[Pair] = []

    def make(draft_dir: str, **overrides: object) -> Pair:
        pairs.append(start_pair(target_model, draft_dir, **overrides))
        return pairs[-1]

    yield make
    for pair in pairs:
        pair.draft.stop(0)
        pair.target.stop(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need CUDA: skip them, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
