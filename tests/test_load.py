"""benchmarks/load.py on tiny models: concurrent mixed clients, some cancelling mid-stream, no
errors, every session closed after."""

from __future__ import annotations

import json

from benchmarks.load import main


def test_load_levels_run_clean(tiny, tmp_path):
    out = tmp_path / "load.json"
    report = main(
        ["--clients", "1", "6", "--duration", "1.5", "--max-tokens", "8", "--cancel-every", "3",
         "--target-model", tiny.target, "--draft-model", tiny.draft_noisy, "--out", str(out)]
    )  # fmt: skip
    assert [level["clients"] for level in report["levels"]] == [1, 6]
    assert report["total_errors"] == 0
    for level in report["levels"]:
        assert level["requests"] >= level["clients"] and level["tokens"] > 0 and level["cancelled"] > 0
        assert level["target_sessions_after"] == 0 and level["target_kv_bytes_after"] == 0
        assert level["latency_s_p50"] <= level["latency_s_p99"]
    assert json.loads(out.read_text())["levels"] == report["levels"]
