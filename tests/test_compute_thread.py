"""Every torch forward of a node runs on its one compute thread (services/compute_thread.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from draft_node.config import DraftConfig
from draft_node.proposers import load_drafter
from draft_node.proposers.base import DraftNoise
from services.candidate_tree import CandidateTree
from services.compute_thread import ComputeThread
from services.model_loading import load_model
from services.rpc.specwire.v1 import target_pb2
from target_node.build import build_verifier
from target_node.config import TargetConfig
from tests.test_verifier import open_session, verify


def test_run_returns_raises_and_nests() -> None:
    compute = ComputeThread("test-compute")
    ident = compute.run(threading.get_ident)
    assert ident != threading.get_ident() and compute.run(threading.get_ident) == ident
    assert compute.run(compute.run, lambda: threading.get_ident()) == ident  # no deadlock
    with pytest.raises(ValueError, match="boom"):
        compute.run(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert compute.run(sum, [1, 2], start=3) == 6
    compute.stop()


def record_forward_threads(model: torch.nn.Module) -> list[int]:
    threads: list[int] = []
    model.register_forward_pre_hook(lambda module, args: threads.append(threading.get_ident()))
    return threads


def test_target_prefill_and_verify_forwards_run_on_the_compute_thread(tiny) -> None:
    loaded = load_model(tiny.target)  # its own copy: the hook stays off the shared model
    threads = record_forward_threads(loaded.model)
    verifier = build_verifier(TargetConfig(model="tiny", max_tree_nodes=32), loaded)
    try:
        threads.clear()  # start-up forwards (the tree-attention check) included above
        opened = open_session(verifier, [5, 6, 7, 8])
        for round_id in range(3):
            verify(verifier, opened.session_id, round_id, CandidateTree.from_sequences([[9, 10, 11]]))
        assert len(threads) == 4
        assert set(threads) == {verifier.backend.compute.run(threading.get_ident)}
    finally:
        verifier.stop()


def test_draft_forwards_run_on_the_compute_thread(tiny) -> None:
    loaded = load_model(tiny.draft_noisy)
    threads = record_forward_threads(loaded.model)
    drafter = load_drafter(DraftConfig(model=tiny.draft_noisy, port=0, min_chain_probability=0), loaded)
    try:
        proposers = [drafter.new_proposer(target_pb2.SamplingParams(), DraftNoise.for_strategy(0, "")) for _ in range(2)]
        workers = [threading.Thread(target=p.propose, args=(list(range(5, 20)), 4)) for p in proposers]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert 2 * 4 < len(threads) <= 2 * 5  # 4 steps each, a prompt prefill where the prefix cache lacked it
        assert len(set(threads)) == 1 and threading.get_ident() not in threads
    finally:
        drafter.stop()
