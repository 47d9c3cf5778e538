"""The checked-in gRPC stubs must equal what the pinned grpcio-tools generates from proto/."""

from __future__ import annotations

from pathlib import Path

from services.rpc import codegen


def test_generated_stubs_are_fresh(tmp_path: Path):
    generated = codegen.generate(tmp_path)
    assert generated, "no proto files found"
    checked_in = sorted(p.relative_to(codegen.OUT_DIR) for p in codegen.OUT_DIR.glob(codegen.GENERATED_GLOB))
    assert sorted(p.relative_to(tmp_path) for p in generated) == checked_in, "run `make proto`"
    for path in generated:
        committed = codegen.OUT_DIR / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"
