"""Where the nodes run: `--device auto|cpu|cuda[:N]`; on a CUDA machine the target verifies there
with every strategy and stays greedy-identical to the target alone on the same device."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import ValidationError

import tests.test_verifier as verifier_tests
from draft_node.config import DraftConfig
from services.candidate_tree import CandidateTree
from services.model_loading import load_model, resolve_device
from services.rpc.specwire.v1 import target_pb2
from target_node.build import build_verifier
from target_node.config import TargetConfig
from target_node.strategies import STRATEGIES


def test_auto_takes_the_gpu_only_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="sees 1 CUDA device"):
        resolve_device("cuda:1")


def test_device_flag_on_both_nodes(monkeypatch):
    assert TargetConfig.from_cli(["--device", "cpu"], "t").device == "cpu"
    monkeypatch.setenv("SPECWIRE_DRAFT_DEVICE", "cuda:0")
    assert DraftConfig(target="x:1").device == "cuda:0"
    assert TargetConfig().device == "auto"
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(ValidationError):
            TargetConfig(device=bad)


def test_target_loads_on_the_configured_device(tiny):
    verifier = build_verifier(TargetConfig(model=tiny.target, device="cpu"))
    assert verifier.backend.describe()["device"] == "cpu"
    verifier.stop()


@pytest.fixture(scope="module")
def cuda_target(tiny):
    return load_model(tiny.target, device="cuda")


@pytest.fixture(scope="module")
def cuda_verifier(tiny):
    verifier = build_verifier(TargetConfig(model=tiny.target, max_tree_nodes=32, max_context_tokens=200))
    yield verifier
    verifier.stop()


@pytest.mark.gpu
@pytest.mark.parametrize("num_candidates", [1, 4])
def test_cuda_target_is_greedy_identical(cuda_target, cuda_verifier, num_candidates):
    """`--device auto` put the target on the GPU; its tree verification equals the target alone there."""
    assert cuda_verifier.backend.describe()["device"].startswith("cuda")
    verifier_tests.test_tree_verification_equals_target_greedy(cuda_target, cuda_verifier, num_candidates)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_verifies_on_cuda(cuda_target, cuda_verifier, strategy):
    greedy = strategy == "deterministic"
    opened = verifier_tests.open_session(
        cuda_verifier,
        cuda_target.tokenizer.encode("def add(a, b):"),
        strategy=strategy,
        sampling=target_pb2.SamplingParams(temperature=0.0 if greedy else 1.0, seed=7),
    )
    rng = random.Random(0)
    for round_id in range(4):
        tree = CandidateTree.from_sequences([[rng.randrange(300) for _ in range(3)] for _ in range(2)])
        result = verifier_tests.verify(cuda_verifier, opened.session_id, round_id, tree)
        assert 0 <= result.next_token_id < cuda_verifier.vocab_size
        assert list(result.accepted_node_ids) == (
            tree.path_to(result.accepted_node_ids[-1]) if result.accepted_node_ids else []
        )
